"""Which module to build for a checkpoint, and how its tensor names map onto ours (one rule per family)."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TEXT_MODEL_TYPES, TextConfig, read_config_json
from .decoder import CausalLM
from .errors import CheckpointError
from .loader import empty_weights, load_into, read_tensors


def rename_text(name: str) -> str | None:
    """Text LMs: checkpoint names are ours."""
    return name


def build_model(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    raw = read_config_json(path)
    mt = raw.get("model_type")
    if mt in TEXT_MODEL_TYPES:
        cfg = TextConfig.parse(raw)
        with empty_weights():
            net = CausalLM(cfg)
        load_into(net, read_tensors(path), rename_text, dtype, device, source=str(path))
        return net.eval(), mt
    raise CheckpointError(f"{path}: model_type {mt!r} is not supported (supported: {sorted(TEXT_MODEL_TYPES)})")
