"""Which module to build for a checkpoint, and how its tensor names map onto ours (one rule per family)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import TEXT_MODEL_TYPES, TextConfig, read_config_json
from .decoder import CausalLM
from .loader import empty_weights, load_into, read_tensors
from .omni_config import FULL_TYPES, THINKER_TYPES, ThinkerConfig
from .thinker import Thinker

# Parts of a full Omni checkpoint that the thinker does not load (speech output loads them separately).
SPEECH_PREFIXES = ("talker.", "token2wav.", "code2wav.")


def rename_text(name: str) -> str | None:
    """Text LMs: checkpoint names are ours."""
    return name


def rename_thinker(name: str) -> str | None:
    """Omni thinkers: full checkpoints prefix everything with `thinker.`; thinker-only ones do not."""
    if name.startswith(SPEECH_PREFIXES):
        return None
    return name.removeprefix("thinker.")


def build_model(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    """Build and load the model of a checkpoint directory: (module in eval mode, model_type)."""
    raw = read_config_json(path)
    mt = raw.get("model_type")
    if mt in TEXT_MODEL_TYPES:
        cfg = TextConfig.parse(raw)
        with empty_weights():
            net = CausalLM(cfg)
        load_into(net, read_tensors(path), rename_text, dtype, device, source=str(path))
        return net.eval(), mt
    if mt in FULL_TYPES or mt in THINKER_TYPES:
        cfg = ThinkerConfig.parse(raw)
        with empty_weights():
            net = Thinker(cfg)
        load_into(net, read_tensors(path), rename_thinker, dtype, device, source=str(path))
        return net.eval(), cfg.model_type
    supported = sorted(TEXT_MODEL_TYPES | set(FULL_TYPES) | THINKER_TYPES)
    raise CheckpointError(f"{path}: model_type {mt!r} is not supported (supported: {supported})")
