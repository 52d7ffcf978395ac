"""Small pieces the benchmarks share: a token clock for transformers' `generate` and a parallel-clients runner."""
from __future__ import annotations

import threading
import time
from typing import Callable


class TokenClock:
    """A transformers streamer that timestamps each `put` (the prompt first, then every new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_clients(client: Callable[[int], None], clients: int) -> float:
    """Run client(0) .. client(clients - 1) in parallel threads; the wall time in seconds until all are done."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0
