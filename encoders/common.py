"""Small pieces shared by every encoder and by the decoder.

Design: configs are plain dataclasses that keep Hugging Face field names and are filled from a checkpoint's
`config.json` with `from_hf_dict`; keys we do not model are kept in `extra` (never silently dropped) so a
round trip or a later feature can still read them. Required fields have no default: a released value must
come from the checkpoint, not from us.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")


# Activation names used by the checkpoints' configs -> functions.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def from_hf_dict(cls: type[T], d: dict[str, Any], **override: Any) -> T:
    """Build dataclass `cls` from a config dict: known fields set, unknown ones kept in `.extra`."""
    names = {f.name for f in dataclasses.fields(cls)}
    d = {**d, **override}
    kwargs = {k: v for k, v in d.items() if k in names and k != "extra"}
    extra = {k: v for k, v in d.items() if k not in names}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.name != "extra"
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__}: config.json lacks required field(s) {missing}")
    obj = cls(**kwargs)
    if "extra" in names:
        obj.extra = extra  # type: ignore[attr-defined]
    elif extra:
        log.debug("%s: keeping no record of keys %s", cls.__name__, sorted(extra))
    return obj


class RMSNorm(nn.Module):
    """RMSNorm with the statistics in float32, cast back before the weight (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class PatchEmbed(nn.Module):
    """(N, C*T*P*P) flattened patches -> (N, hidden). The checkpoints hold a Conv3d whose kernel equals its
    stride, i.e. one linear map per patch. In float32 it runs as a matmul, several times faster on CPU than the
    convolution, backward included (docs/training-notes.md); in half precision it
    stays a convolution, whose rounding matches the reference's bit for bit."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, hidden: int, bias: bool):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # (hidden, C, T, P, P)
        x = x.to(w.dtype)
        if w.dtype != torch.float32:
            return self.proj(x.view(-1, *w.shape[1:])).view(x.shape[0], -1)
        return F.linear(x, w.view(w.shape[0], -1), self.proj.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper-style fixed position table (length, channels): cat(sin, cos)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Block-diagonal attention over packed sequences.

    q, k, v: (N, heads, head_dim) for N packed tokens; cu_seqlens: (n_blocks + 1,) cumulative lengths.
    Each run of consecutive equal-length blocks (a video's frames, a batch of same-size images, an audio
    clip's full windows) is one SDPA call on a strided view, so there is no loop over tokens and no gather or
    scatter copy (under autograd those were a tenth of a vision training step). Returns (N, heads, head_dim).
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    runs: list[list[int]] = []  # [block length, number of blocks]
    for n in lens:
        if n == 0:
            continue
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    sizes = [n * count for n, count in runs]
    if int(cu_seqlens[0]) != 0 or sum(sizes) != q.shape[0]:
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} do not cover the {q.shape[0]} packed tokens")
    # split, not narrow: under autograd the backward of split is one cat, that of each narrow a full-size zeros.
    outs = []
    for (n, count), qb, kb, vb in zip(runs, q.split(sizes), k.split(sizes), v.split(sizes)):
        qb, kb, vb = (t.view(count, n, *t.shape[1:]).transpose(1, 2) for t in (qb, kb, vb))
        o = F.scaled_dot_product_attention(qb, kb, vb)  # (blocks, heads, n, head_dim)
        outs.append(o.transpose(1, 2).reshape(n * count, *q.shape[1:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def vision_position_ids(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, laid out the way Qwen vision processors emit them.

    grid_thw: (n, 3) long, (t, h, w) in patches per item. Patches of each frame come in spatial-merge-block
    order: block rows, block cols, then the merge_size x merge_size patches inside a block (row-major); every
    frame of an item repeats the same layout. Returns (N, 2) long with N = sum(t*h*w). Vectorised over all
    patches (only the per-item sizes are expanded), so there is no per-token loop.
    """
    grid_thw = grid_thw.long()
    t, h, w = grid_thw.unbind(-1)
    frame = h * w
    counts = t * frame
    heights = torch.repeat_interleave(h, counts)
    widths = torch.repeat_interleave(w, counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    idx = (torch.arange(int(counts.sum()), device=grid_thw.device) - first) % (heights * widths)
    m = merge_size
    blocks_per_row = widths // m
    in_col, in_row = idx % m, (idx // m) % m
    block = idx // (m * m)
    row = (block // blocks_per_row) * m + in_row
    col = (block % blocks_per_row) * m + in_col
    return torch.stack([row, col], dim=-1)


def vision_rotary_cos_sin(grid_thw: torch.Tensor, head_dim: int, merge_size: int,
                          theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D axial rotary tables for Qwen2.5-VL / Qwen3-VL style vision encoders, float32.

    A quarter of head_dim frequencies, inv_freq[i] = theta^(-2i / (head_dim/2)), rotate by the patch row and
    the same frequencies by the patch column; the half-dim angle vector is cat(row_angles, col_angles) and it
    is duplicated to pair with `rotate_half`. Returns cos, sin of shape (N, head_dim) in merge-block order
    (see `vision_position_ids`).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=grid_thw.device) / half))
    pos = vision_position_ids(grid_thw, merge_size).float()  # (N, 2)
    angles = (pos[:, :, None] * inv_freq).flatten(1)  # (N, head_dim/2): [row freqs | col freqs]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class AudioAttention(nn.Module):
    """Bidirectional multi-head attention over packed audio chunks (Whisper-style projections).

    Qwen2.5-Omni's k_proj has no bias (as in Whisper); Qwen3-Omni's has one.
    """

    def __init__(self, dim: int, heads: int, k_bias: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model {dim} is not divisible by encoder_attention_heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]  # x: (N packed frames, dim)
        q, k, v = (p(x).view(n, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class AudioEncoderLayer(nn.Module):
    """Pre-LN Whisper layer: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, activation: str, k_bias: bool):
        super().__init__()
        self.self_attn = AudioAttention(d_model, heads, k_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu_seqlens)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # the reference clamps to keep fp16 residuals finite
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x
