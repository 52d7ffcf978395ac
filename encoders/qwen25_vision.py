"""Qwen2.5-Omni vision encoder (the Qwen2.5-VL ViT), loadable from `thinker.visual.*` checkpoint weights.

Design: the processor hands over flattened patches (one row = C x temporal_patch x patch x patch values)
in merge-block order: the `merge x merge` patches that become one decoder token are consecutive rows.
Patches are embedded by a Conv3d whose kernel equals its stride, then get 2-D axial rotary positions
(row angles on one quarter of each half of the head, column angles on the other).

Most blocks attend inside windows of `window_size` pixels (4 x 4 merge units for the released config);
the blocks listed in `fullatt_block_indexes` attend over a whole frame. To make every window contiguous
the merge units are reordered once, window by window, before the first block (rotary tables too); the
merger then turns each merge unit into one token and the reorder is undone on the merged tokens.
Each frame of a video (temporal patch) is its own attention sequence.

Reference numerics (transformers `Qwen2_5OmniVisionEncoder`): RMSNorm eps 1e-6 in fp32, rotary applied
in fp32, SwiGLU MLP with biases, merger GELU is exact erf.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import ACTIVATIONS, PatchEmbed, RMSNorm, rotate_half, varlen_attention, vision_rotary_cos_sin

@dataclass
class Qwen25VisionConfig:
    """`thinker_config.vision_config` of a Qwen2.5-Omni checkpoint (HF field names).

    Sizes are required; the structural constants default to the values every released checkpoint uses.
    """
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    rope_parameters: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))


def window_order(grid_thw: torch.Tensor, merge_size: int, window_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder merge units window by window.

    Returns `order` (N_units,): the merge unit placed at each new position, and `cu_window_seqlens`
    (n_windows + 1,) in patches. Windows of `window_units x window_units` merge units tile each frame from
    the top-left; edge windows are smaller. Frame by frame, windows row-major, units row-major inside.
    """
    orders, sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():  # loop over images/videos only
        gh, gw = h // merge_size, w // merge_size
        r = torch.arange(gh)[:, None]
        c = torch.arange(gw)[None, :]
        n_win_w = -(-gw // window_units)
        window = (r // window_units) * n_win_w + c // window_units  # (gh, gw)
        key = window * window_units**2 + (r % window_units) * window_units + c % window_units
        frame_order = torch.argsort(key.flatten())  # keys are unique
        frame_sizes = torch.bincount(window.flatten())  # ceil tiling: no window is empty
        frames = torch.arange(t)[:, None] * (gh * gw)
        orders.append((frame_order[None, :] + frames).flatten() + offset)
        sizes.append(frame_sizes.repeat(t))
        offset += t * gh * gw
    order = torch.cat(orders).to(grid_thw.device)
    cu = F.pad(torch.cumsum(torch.cat(sizes) * merge_size**2, 0), (1, 0)).to(grid_thw.device)
    return order, cu


class VisionAttention(nn.Module):
    """Bidirectional MHA with 2-D rotary on q, k (applied in fp32) over packed sequences."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, -1) for p in (self.q, self.k, self.v))
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, then each merge unit (merge^2 consecutive rows) -> one token via a 2-layer MLP."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.unit_dim, self.unit_dim), nn.GELU(),
                                 nn.Linear(self.unit_dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.unit_dim))


class Qwen25VisionEncoder(nn.Module):
    """Flattened patches + grids -> one embedding per merge unit (see module docstring)."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size,
                                      bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.window_units = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # merge units per side
        if self.window_units < 1:
            raise ValueError(f"window_size {cfg.window_size} is smaller than one merge unit")

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N, C*T*P*P); grid_thw: (n, 3) long in patches -> (N / merge^2, out_hidden_size)."""
        cfg = self.cfg
        m = cfg.spatial_merge_size
        row_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be (n, 3), got {tuple(grid_thw.shape)}")
        if (grid_thw[:, 1:] % m).any():
            raise ValueError(f"grid heights/widths {grid_thw[:, 1:].tolist()} must be multiples of merge size {m}")
        n_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (n_patches, row_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match grid_thw "
                             f"({n_patches} patches of {row_dim} values)")

        x = self.patch_embed(pixel_values)  # (N, hidden), merge-block order
        head_dim = cfg.hidden_size // cfg.num_heads
        cos, sin = vision_rotary_cos_sin(grid_thw, head_dim, m, cfg.rope_theta)

        # Gather whole merge units window by window: (N/m^2, m^2, .) rows reindexed by `order`.
        order, cu_windows = window_order(grid_thw, m, self.window_units)
        x, cos, sin = (t.view(-1, m * m, t.shape[-1])[order].view(n_patches, -1) for t in (x, cos, sin))
        # Windows never straddle frames, so frames stay contiguous and full attention is per frame.
        frame_lens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_frames = F.pad(torch.cumsum(frame_lens, 0), (1, 0))

        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_frames if i in full else cu_windows, cos, sin)

        merged = self.merger(x)  # (N/m^2, out_hidden), window order
        out = torch.empty_like(merged)
        out[order] = merged  # back to merge-block (processor) order
        return out
