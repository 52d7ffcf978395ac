"""Qwen2.5-Omni speech output: config, talker, token2wav (DiT + ECAPA speaker encoder + BigVGAN), its
streaming samplers, and the pipeline that ties them to the thinker."""
