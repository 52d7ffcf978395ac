"""The networks and what builds them: configs parsed from config.json, the decoder layers (dense and MoE), the
Omni thinker, the KV cache, int8 weights, safetensors loading and the checkpoint -> module registry. Imports
errors and encoders only."""
