"""A `PrefixCache` for many concurrent conversations: a partial match is copied, not taken away.

`PrefixCache.take` removes the best-matching entry and rolls it back to the shared prefix. With one user that
is exactly right (the best match is the conversation's own previous turn). With many, the best match of a new
conversation is often someone else's state that shares only the system prompt: taking it would make that other
conversation's next turn prefill everything again. `SharedPrefixCache.take` hands an entry over only when the
prompt extends all of it (the conversation continues); otherwise it copies the shared positions into a fresh
cache and leaves the entry where it is. Same interface; the batch scheduler installs it on its assistant.
"""
from __future__ import annotations

from typing import Callable

from ..models.kv_cache import KVCache, copy_prefix
from .prefix_cache import PrefixCache


class SharedPrefixCache(PrefixCache):
    def __init__(self, new_cache: Callable[[int], KVCache], capacity: int = 16):
        """new_cache(n): an empty batch-1 cache of n positions (the model's `new_cache(1, n)`)."""
        super().__init__(capacity)
        self._new_cache = new_cache

    def take(self, ids: list[int]) -> tuple[KVCache | None, int, object]:
        with self._lock:
            best, best_len = self._best_match(ids)
            n = min(best_len, len(ids) - 1)  # at least one prompt token is left to prefill
            if best is None or n <= 0:
                return None, 0, None
            cached_ids, cache, extra = self._entries[best]
            if best_len == len(cached_ids):  # this prompt continues that conversation: hand the state over
                del self._entries[best]
                cache.truncate(n)
                return cache, n, extra
            self._entries.move_to_end(best)  # still useful to its own conversation: keep it, copy the prefix
            copy = self._new_cache(len(ids))
            copy_prefix(cache, copy, n)
            return copy, n, extra
