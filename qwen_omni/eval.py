"""`python -m qwen_omni.eval`: held-out evaluation of a checkpoint on the synthetic world (qwen_omni/train/evaluate.py)."""
from .train.evaluate import main

if __name__ == "__main__":
    main()
