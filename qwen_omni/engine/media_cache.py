"""Remember the preprocessed features of recently seen images and videos, so a follow-up turn skips decoding.

A chat client re-sends the whole conversation every turn, media included. The KV prefix cache already skips
encoding and prefilling the history; what is left is decoding and resizing the same picture or video again
(for a large image, tens of milliseconds - more than the prefill of a short question). `CachingProcessor` wraps
the processor's per-item steps (`image`, `video`) with an LRU keyed by the content hash of the raw bytes, bounded
by entry count and by bytes of features. Only in-memory bytes are cached (what the server hands over): their
hash is their identity, whereas a file path can change on disk. Cached tensors are never modified downstream
(the processor concatenates them into new tensors, or hands a lone item on as it is, read-only). Audio is
decoded by the processor outside these steps and is cheap next to images and video; it is not cached.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from .processor import Processor


class CachingProcessor(Processor):
    def __init__(self, base: Processor, max_items: int = 64, max_bytes: int = 256 << 20):
        super().__init__(base.cfg, base.p, base.budgets)
        self.max_items, self.max_bytes = max_items, max_bytes
        self._memo: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def image(self, src):
        return self._cached(src, ("image",), lambda: super(CachingProcessor, self).image(src))

    def video(self, src, use_audio: bool):
        return self._cached(src, ("video", bool(use_audio)),
                            lambda: super(CachingProcessor, self).video(src, use_audio))

    def _cached(self, src, kind: tuple, compute: Callable[[], Any]):
        if not isinstance(src, (bytes, bytearray, memoryview)):
            return compute()
        key = (*kind, hashlib.sha1(src).hexdigest())
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                self.hits += 1
                return hit[0]
        value = compute()  # outside the lock: other requests keep preparing meanwhile
        size = sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else getattr(v, "nbytes", 0)
                   for v in value)
        with self._lock:
            self.misses += 1
            if key not in self._memo and size <= self.max_bytes:
                self._memo[key] = (value, size)
                self._bytes += size
                while len(self._memo) > self.max_items or self._bytes > self.max_bytes:
                    _, (_, dropped) = self._memo.popitem(last=False)
                    self._bytes -= dropped
        return value
