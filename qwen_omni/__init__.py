"""qwen-omni: a readable, fast re-implementation of the Qwen-Omni family (and Qwen2/Qwen3 text models)."""
from .assistant import Assistant, load
from .errors import CheckpointError, ContextOverflowError, InputError, QwenOmniError

__all__ = ["load", "Assistant", "QwenOmniError", "CheckpointError", "ContextOverflowError", "InputError"]
