"""Rotary position embeddings for the text decoders: plain 1-D RoPE and 3-axis MRoPE.

MRoPE gives each token a (T, H, W) position; the head_dim/2 frequency slots are shared out between the three
axes by `mrope_section`. Qwen2.5-Omni gives each axis a contiguous run of slots ([16, 24, 24]: T first);
Qwen3-Omni interleaves them (slot i takes H when i % 3 == 1 and i < 3*sec[1], W when i % 3 == 2 and
i < 3*sec[2], T otherwise). Positions may be fractional (Qwen3 video times), so they are float throughout.
"""
from __future__ import annotations

import torch

from .config import RopeConfig


def slot_axes(half_dim: int, section: list[int], interleaved: bool) -> torch.Tensor:
    """(half_dim,) long: which of the axes T=0, H=1, W=2 feeds each frequency slot."""
    if sum(section) != half_dim:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {half_dim}")
    if not interleaved:
        return torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])
    axes = torch.zeros(half_dim, dtype=torch.long)
    for axis in (1, 2):
        axes[axis:section[axis] * 3:3] = axis
    return axes


class Rotary(torch.nn.Module):
    """Computes (cos, sin) of shape (B, S, head_dim) in float32 from positions (B, S) or (3, B, S)."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        inv_freq = 1.0 / (rope.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope = rope.mrope_section is not None
        if self.mrope:
            axes = slot_axes(head_dim // 2, rope.mrope_section, rope.mrope_interleaved)
            self.register_buffer("axes", axes, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mrope:
            if positions.dim() == 2:  # text-only: the same position on all three axes
                positions = positions.unsqueeze(0).expand(3, -1, -1)
            freqs = positions.float()[..., None] * self.inv_freq  # (3, B, S, half)
            # pick, per slot, the frequency of that slot's axis -> (B, S, half)
            idx = self.axes.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
            freqs = freqs.gather(0, idx)[0]
        else:
            if positions.dim() == 3:
                positions = positions[0]
            freqs = positions.float()[..., None] * self.inv_freq  # (B, S, half)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, S, head_dim); cos/sin: (B, S, head_dim) already in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
