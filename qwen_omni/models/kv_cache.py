"""An explicit, preallocated key/value cache, passed down the decoder calls.

One tensor per layer for keys and one for values, shaped (B, kv_heads, max_len, head_dim), plus the number of
valid positions of each row (`lengths`, shape (B,)). Rows may hold different lengths, which is what
multi-turn reuse and continuous batching need: a step appends S new positions to every row at that row's own
offset. Nothing is concatenated per step, so a decode step costs no allocation.

Where a step's positions go depends only on `lengths` and the step size, so it is worked out once per forward
pass (`begin`, called by the decoder before its layers) rather than once per layer: on a CPU decode step those
per-layer host reads of `lengths` were a measurable share of the Python overhead. `advance`, `reset` and
`truncate` forget that plan; `write` without a current plan makes one (callers that never call `begin`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class StepPlan(NamedTuple):
    step: int  # S new positions per row
    end: int  # max(lengths) + S: the visible prefix of the cache tensors
    start: int | None  # the shared offset when all rows have one length (a plain slice copy), else None
    slots: torch.Tensor | None  # (B, S) absolute slots when rows differ, else None


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.plan: StepPlan | None = None

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def positions(self, step: int) -> torch.Tensor:
        """(B, step) absolute cache slots that the next `step` tokens of each row will occupy."""
        return self.lengths[:, None] + torch.arange(step, device=self.lengths.device)

    def begin(self, step: int) -> StepPlan:
        """Plan where the next `step` positions of every row go (one host read of `lengths`)."""
        lengths = self.lengths.tolist()
        end = max(lengths) + step
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} positions, allocated {self.max_len}")
        uniform = min(lengths) == max(lengths)
        self.plan = StepPlan(step, end, lengths[0] if uniform else None, None if uniform else self.positions(step))
        return self.plan

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, kv_heads, S, D) after each row's current length; return the visible prefix.

        The returned views cover slots [0, max(lengths) + S); the caller masks what a row may not see.
        `lengths` itself advances in `advance()`, once per forward pass, after every layer has written.
        """
        S = k.shape[2]
        plan = self.plan if self.plan is not None and self.plan.step == S else self.begin(S)
        if plan.start is not None:  # common case: one shared offset, a plain slice copy
            self.k[layer][:, :, plan.start:plan.start + S] = k
            self.v[layer][:, :, plan.start:plan.start + S] = v
        else:
            rows = torch.arange(self.batch, device=k.device)[:, None]
            self.k[layer][rows, :, plan.slots] = k.transpose(1, 2)
            self.v[layer][rows, :, plan.slots] = v.transpose(1, 2)
        return self.k[layer][:, :, :plan.end], self.v[layer][:, :, :plan.end]

    def attention_mask(self, step: int) -> torch.Tensor | None:
        """(B, 1, step, max_len_visible) bool mask for `step` new queries, or None when plain causal works."""
        end = int(self.lengths.max()) + step
        q_pos = self.positions(step)  # (B, S): absolute slot of each new query
        k_pos = torch.arange(end, device=q_pos.device)
        return (k_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)

    def advance(self, step: int | torch.Tensor) -> None:
        self.lengths += step
        self.plan = None

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget rows (all by default); their tensors are overwritten by the next writes."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0
        self.plan = None

    def truncate(self, length: int, row: int = 0) -> None:
        """Roll a row back to its first `length` positions (e.g. keep a shared prompt prefix)."""
        self.lengths[row] = min(int(self.lengths[row]), length)
        self.plan = None


def copy_prefix(src: KVCache, dst: KVCache, n: int) -> int:
    """Copy the first n cached positions of row 0 from one cache into a larger one."""
    for layer in range(len(src.k)):
        dst.k[layer][:, :, :n] = src.k[layer][:, :, :n]
        dst.v[layer][:, :, :n] = src.v[layer][:, :, :n]
    dst.lengths[:] = n
    return n
