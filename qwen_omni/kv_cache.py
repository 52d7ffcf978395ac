"""An explicit, preallocated key/value cache, passed down the decoder calls.

One tensor per layer for keys and one for values, shaped (B, kv_heads, max_len, head_dim), plus the number of
valid positions of each row (`lengths`, shape (B,)). Rows may hold different lengths, which is what
multi-turn reuse and continuous batching need: a step appends S new positions to every row at that row's own
offset. Nothing is concatenated per step, so a decode step costs no allocation.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def positions(self, step: int) -> torch.Tensor:
        """(B, step) absolute cache slots that the next `step` tokens of each row will occupy."""
        return self.lengths[:, None] + torch.arange(step, device=self.lengths.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, kv_heads, S, D) after each row's current length; return the visible prefix.

        The returned views cover slots [0, max(lengths) + S); the caller masks what a row may not see.
        `lengths` itself advances in `advance()`, once per forward pass, after every layer has written.
        """
        S = k.shape[2]
        end = int(self.lengths.max()) + S
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} positions, allocated {self.max_len}")
        if bool((self.lengths == self.lengths[0]).all()):  # common case: one shared offset, a plain slice copy
            start = int(self.lengths[0])
            self.k[layer][:, :, start:start + S] = k
            self.v[layer][:, :, start:start + S] = v
        else:
            slots = self.positions(S)  # (B, S)
            rows = torch.arange(self.batch, device=k.device)[:, None]
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attention_mask(self, step: int) -> torch.Tensor | None:
        """(B, 1, step, max_len_visible) bool mask for `step` new queries, or None when plain causal works."""
        end = int(self.lengths.max()) + step
        q_pos = self.positions(step)  # (B, S): absolute slot of each new query
        k_pos = torch.arange(end, device=q_pos.device)
        return (k_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)

    def advance(self, step: int | torch.Tensor) -> None:
        self.lengths += step

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget rows (all by default); their tensors are overwritten by the next writes."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def truncate(self, length: int, row: int = 0) -> None:
        """Roll a row back to its first `length` positions (e.g. keep a shared prompt prefix)."""
        self.lengths[row] = min(int(self.lengths[row]), length)
