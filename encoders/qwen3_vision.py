"""Qwen3-Omni vision encoder (Qwen3-VL style ViT with DeepStack mergers).

Design: pixel patches (already flattened and laid out in spatial-merge-block order by the Qwen2-VL image
processor) are embedded by a Conv3d whose kernel equals its stride, i.e. one linear map per patch. A learned
square position table (num_position_embeddings = side^2) is resampled bilinearly, align_corners=True, to each
item's (h, w) patch grid and added. Blocks are pre-LN (LayerNorm eps 1e-6): fused-qkv attention with 2-D
axial RoPE (fp32) that is full within each temporal patch (one attention block per frame, cu_seqlens), then a
gelu-tanh MLP. The final merger LayerNorms each patch, concatenates merge^2 neighbours and projects to
out_hidden_size; DeepStack mergers tap the hidden states after the blocks listed in deepstack_visual_indexes
and LayerNorm *after* the concatenation ("post-shuffle").

Parameter names equal the checkpoint's `thinker.visual.*` names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import (ACTIVATIONS, PatchEmbed, rotate_half, varlen_attention, vision_position_ids,
                     vision_rotary_cos_sin)

@dataclass
class Qwen3VisionConfig:
    """`vision_config` of a Qwen3-Omni-MoE thinker (HF `Qwen3OmniMoeVisionEncoderConfig` field names)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    rope_parameters: dict[str, Any] | None = None  # only rope_theta is read (default 10000)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))


def _bilinear_taps(pos: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps and weights per target index along one axis, align_corners=True.

    pos, size: (N,) target index and target axis length; the source axis has `side` entries. Target index i
    maps to i * (side-1)/(size-1) (size 1 maps to 0). Returns (N, 2) long taps and (N, 2) float32 weights.
    """
    src = pos.float() * (side - 1) / (size - 1).clamp(min=1).float()
    lo = src.floor()
    frac = src - lo
    taps = torch.stack([lo, lo + 1], dim=-1).long().clamp(max=side - 1)
    # At the last source row frac is 0, so the clamped second tap carries zero weight.
    return taps, torch.stack([1 - frac, frac], dim=-1)


class _PatchMerger(nn.Module):
    """LayerNorm + merge^2 concat + MLP. post_shuffle=True norms the concatenated vector (DeepStack)."""

    def __init__(self, cfg: Qwen3VisionConfig, post_shuffle: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.post_shuffle = post_shuffle
        self.ln_q = nn.LayerNorm(self.merged if post_shuffle else cfg.hidden_size, eps=1e-6)
        # Sequential keeps the checkpoint names mlp.0 / mlp.2 (index 1 is the parameter-free GELU).
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, hidden) in merge-block order, so each run of merge^2 rows is one output token.
        if self.post_shuffle:
            x = self.ln_q(x.reshape(-1, self.merged))
        else:
            x = self.ln_q(x).reshape(-1, self.merged)
        return self.mlp(x)  # (N / merge^2, out_hidden_size)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)  # each (N, heads, head_dim)
        # RoPE in float32 whatever the activation dtype; cos/sin: (N, head_dim) -> broadcast over heads.
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = _Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = _MLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen3VisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} not divisible by {cfg.num_heads} heads")
        self.cfg = cfg
        self.side = int(round(cfg.num_position_embeddings ** 0.5))
        if self.side * self.side != cfg.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {cfg.num_position_embeddings} is not a square")
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                                      cfg.hidden_size, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.merger = _PatchMerger(cfg, post_shuffle=False)
        self.merger_list = nn.ModuleList(_PatchMerger(cfg, post_shuffle=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def _position_embedding(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, hidden) float32: pos_embed table resampled to every item's (h, w) grid, merge-block order."""
        rows, cols = vision_position_ids(grid_thw, self.cfg.spatial_merge_size).unbind(-1)
        counts = grid_thw.prod(-1)
        heights = torch.repeat_interleave(grid_thw[:, 1], counts)
        widths = torch.repeat_interleave(grid_thw[:, 2], counts)
        h_taps, h_wts = _bilinear_taps(rows, heights, self.side)  # (N, 2) each
        w_taps, w_wts = _bilinear_taps(cols, widths, self.side)
        idx = (h_taps[:, :, None] * self.side + w_taps[:, None, :]).flatten(1)  # (N, 4) table rows
        wts = (h_wts[:, :, None] * w_wts[:, None, :]).flatten(1)  # (N, 4) bilinear weights
        return (self.pos_embed(idx).float() * wts[:, :, None]).sum(1)

    def forward(self, pixel_values: torch.Tensor,
                grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values: (N, C*T*P*P) patches in merge-block order; grid_thw: (n, 3) long (t, h, w) in patches.

        Returns merged (N / merge^2, out_hidden_size) and one tensor of the same shape per DeepStack index.
        """
        cfg = self.cfg
        grid_thw = grid_thw.to(device=pixel_values.device, dtype=torch.long)
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        n_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (n_patches, patch_dim):
            raise ValueError(f"pixel_values must be ({n_patches}, {patch_dim}) for grid_thw {grid_thw.tolist()}, "
                             f"got {tuple(pixel_values.shape)}")
        m = cfg.spatial_merge_size
        if bool(((grid_thw[:, 1:] % m) != 0).any()):
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size {m}: {grid_thw.tolist()}")

        x = self.patch_embed(pixel_values)
        x = x + self._position_embedding(grid_thw).to(x.dtype)
        cos, sin = vision_rotary_cos_sin(grid_thw, cfg.hidden_size // cfg.num_heads, m, cfg.rope_theta)
        # One full-attention block per temporal patch (frame) of every item.
        frame_lens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(frame_lens.cumsum(0), (1, 0)).to(torch.int32)

        deepstack = []
        taps = {layer: k for k, layer in enumerate(cfg.deepstack_visual_indexes)}
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens, cos, sin)
            if i in taps:
                deepstack.append(self.merger_list[taps[i]](x))
        return self.merger(x), deepstack
