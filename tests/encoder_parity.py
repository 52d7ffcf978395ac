"""Helpers shared by the encoder parity tests (Qwen2.5-Omni and Qwen3-Omni): re-drawn random weights and the
(transformers module, ours) pair built from one tiny config.

Every parameter, norm gains included, is re-drawn from a seeded normal at a scale that keeps activations O(1)
through every layer, so a wrong wire cannot hide behind near-identity init and an absolute tolerance means
something. The state dict is loaded strictly into ours: a renamed or missing parameter fails the build.
"""
from __future__ import annotations

import math

import torch

from encoders.common import from_hf_dict


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) weights (a position table: N(0, 1)), N(0, 0.1) biases, 1 + N(0, 0.1) norm gains."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                fan_in = p[0].numel() if "pos_embed" not in name else 1
                p.copy_(noise / math.sqrt(fan_in))
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def encoder_pair(hf_class, hf_config, our_class, our_config_class, seed: int):
    """(transformers encoder, ours) in eval mode, float32, with the same randomized weights."""
    hf = hf_class._from_config(hf_config).float().eval()
    randomize(hf, seed)
    ours = our_class(from_hf_dict(our_config_class, hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
