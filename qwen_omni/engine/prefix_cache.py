"""A bounded LRU store of conversation KV states keyed by the token prefix they hold.

A follow-up turn re-sends the whole conversation; the store finds the cached state sharing the longest prefix
with the new prompt, rolls it back to that prefix, and only the new tokens are prefilled. Because media
placeholders are part of the ids and their encoded features live in the cache, earlier images, audio and video
are not encoded again. A state is taken out while a request uses it and put back with its new ids afterwards,
so two requests never write into the same cache.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..models.kv_cache import KVCache


class PrefixCache:
    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[list[int], KVCache, object]] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0

    def take(self, ids: list[int]) -> tuple[KVCache | None, int, object]:
        """Remove and return (cache, reusable prefix length, extra state) of the best match, or (None, 0, None).

        At least one prompt token is always left to prefill (its logits start generation).
        """
        with self._lock:
            best, best_len = self._best_match(ids)
            if best is None:
                return None, 0, None
            _, cache, extra = self._entries.pop(best)
        best_len = min(best_len, len(ids) - 1)
        cache.truncate(best_len)
        return cache, best_len, extra

    def _best_match(self, ids: list[int]) -> tuple[int | None, int]:
        """(key, shared length) of the entry sharing the longest prefix with ids, or (None, 0); hold the lock."""
        best, best_len = None, 0
        for key, (cached_ids, _, _) in self._entries.items():
            n = common_prefix(cached_ids, ids)
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def put(self, ids: list[int], cache: KVCache, extra: object = None) -> None:
        with self._lock:
            self._entries[self._next] = (list(ids), cache, extra)
            self._next += 1
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
