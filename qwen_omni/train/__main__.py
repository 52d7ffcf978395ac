"""`python -m qwen_omni.train`: see qwen_omni/train/loop.py."""
from .loop import main

main()
