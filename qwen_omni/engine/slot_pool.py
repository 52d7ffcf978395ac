"""A fixed pool of KV-cache rows ("slots") that the batch scheduler decodes over in one forward pass.

Design
- One `KVCache` of `rows` x `max_len` positions, made by the model's own `new_cache` (so a Thinker's pool carries
  per-row `rope_deltas` (rows, 1) next to the per-row `lengths` (rows,)). It is allocated once; requests never
  allocate during decoding.
- The rows in use are always the contiguous block [0, active): a decode step runs on `view()`, a `KVCache`
  whose tensors are views of the first `active` rows (first-dimension slices, so writes land in the pool and no
  data is copied). When a row leaves, the last active row is moved into its place (`remove`), which costs one
  copy of that row's valid positions and keeps the batch dense.
- A newcomer is prefilled alone in its own batch-1 cache (that is what `PrefixCache` stores and reuses), then
  `insert` copies its valid K/V positions into the next free row. When it finishes, `copy_out` brings the
  positions generated in the pool back into a batch-1 cache, so the conversation can be reused next turn.
"""
from __future__ import annotations

import copy

import torch

from ..models.kv_cache import KVCache


class SlotPool:
    def __init__(self, model: torch.nn.Module, rows: int, max_len: int):
        self.cache: KVCache = model.new_cache(rows, max_len)
        self.rows, self.max_len = rows, max_len
        self.active = 0
        self._view: KVCache | None = None  # rebuilt only when `active` changes

    @property
    def has_deltas(self) -> bool:
        return hasattr(self.cache, "rope_deltas")

    @property
    def free(self) -> int:
        return self.rows - self.active

    def view(self) -> KVCache:
        """The first `active` rows as a KVCache (views into the pool: writes and `advance` land in the pool)."""
        if self._view is None or self._view.batch != self.active:
            v = copy.copy(self.cache)  # same class and attributes; the per-row tensors are replaced by views
            v.k = [t[:self.active] for t in self.cache.k]
            v.v = [t[:self.active] for t in self.cache.v]
            v.lengths = self.cache.lengths[:self.active]
            if self.has_deltas:
                v.rope_deltas = self.cache.rope_deltas[:self.active]
            self._view = v
        return self._view

    def length(self, row: int) -> int:
        return int(self.cache.lengths[row])

    def insert(self, src: KVCache, n: int) -> int:
        """Copy positions [0, n) of batch-1 cache `src` into the next free row; return that row."""
        if self.active >= self.rows:
            raise RuntimeError("internal: no free slot")
        if n > self.max_len:
            raise RuntimeError(f"internal: {n} positions do not fit a {self.max_len}-position slot")
        row = self.active
        for dst_k, dst_v, k, v in zip(self.cache.k, self.cache.v, src.k, src.v):
            dst_k[row, :, :n] = k[0, :, :n]  # (kv_heads, n, head_dim)
            dst_v[row, :, :n] = v[0, :, :n]
        self.cache.lengths[row] = n
        if self.has_deltas:
            self.cache.rope_deltas[row] = src.rope_deltas[0]
        self.active += 1
        return row

    def copy_out(self, row: int, dst: KVCache, start: int, end: int) -> None:
        """Copy positions [start, end) of `row` into batch-1 cache `dst` and set its length to `end`."""
        for k, v, src_k, src_v in zip(dst.k, dst.v, self.cache.k, self.cache.v):
            k[0, :, start:end] = src_k[row, :, start:end]
            v[0, :, start:end] = src_v[row, :, start:end]
        dst.lengths[0] = end

    def remove(self, row: int) -> int | None:
        """Free `row`; the last active row moves into it. Returns the row that moved (None if none did)."""
        last = self.active - 1
        moved = None
        if row != last:
            n = self.length(last)
            for k, v in zip(self.cache.k, self.cache.v):
                k[row, :, :n] = k[last, :, :n]
                v[row, :, :n] = v[last, :, :n]
            self.cache.lengths[row] = n
            if self.has_deltas:
                self.cache.rope_deltas[row] = self.cache.rope_deltas[last]
            moved = last
        self.cache.lengths[last] = 0
        self.active -= 1
        return moved

    def clear(self) -> None:
        self.cache.reset()
        self.active = 0
