"""`python -m qwen_omni.train`: the training loop, its learning-rate schedule, data, losses, attention
supervision, the vision stage, the tiny model's files and the held-out evaluation. Imports assistant and
below."""
