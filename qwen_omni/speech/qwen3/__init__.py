"""Qwen3-Omni speech output: config, the MoE talker with its code predictor, Code2Wav, and the pipeline that
ties them to the thinker."""
