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
    Blocks of equal length are batched into one SDPA call, so there is no loop over tokens and at most one
    call per distinct block length. Returns (N, heads, head_dim).
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    starts = cu_seqlens[:-1].tolist()
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for s, n in zip(starts, lens):
        if n > 0:
            by_len.setdefault(n, []).append(s)
    for n, ss in by_len.items():
        idx = (torch.tensor(ss)[:, None] + torch.arange(n)[None, :]).reshape(-1)
        qb, kb, vb = (t[idx].view(len(ss), n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb)  # (blocks, heads, n, head_dim)
        out[idx] = o.transpose(1, 2).reshape(len(ss) * n, *q.shape[1:])
    return out
