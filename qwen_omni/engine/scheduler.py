"""Continuous batching: one scheduler thread owns the model and decodes every active request in one forward pass.

Design
- `BatchScheduler(assistant)` starts a daemon thread. Callers `submit()` prepared inputs (media decoding and the
  template run in the caller's thread, `Assistant.prepare`) and get a `Generation` handle that yields token ids;
  `chat()` is the `Assistant.chat`-shaped convenience on top (text pieces, `stats`).
- Each loop iteration: drop cancelled requests (their slot is freed before the next step), admit newcomers,
  then ONE `decode_step` over all active rows of the `SlotPool` (tokens (B,) -> logits (B, V); rows have their
  own lengths, and for a Thinker their own rope deltas). Newcomers that arrived together are prefilled together
  (`group_prefill`: one padded pass, the weights read once), as many as there are free rows while their prompts
  add up to at most `prefill_tokens`; one such group per iteration while others are decoding, so a burst of long
  prompts stalls the batch boundedly.
- Prefix reuse is per request, before its prefill: the `PrefixCache` gives the batch-1 cache of the longest
  matching earlier conversation; only the new tokens are prefilled (media already in the cache are not encoded
  again). The scheduler installs a `SharedPrefixCache`, which copies a partial match (say, a shared system
  prompt) instead of taking another conversation's state away. The batch-1 cache is copied into a pool row; at
  the end the generated positions are copied back and the cache goes back to the `PrefixCache` for the next turn.
- Sampling is per row with the request's own `SamplingParams` and seeded `torch.Generator`, through the same
  `apply_repetition_penalty` / `sample` calls as `generate()`, so a greedy (or seeded) request gives the tokens
  `Assistant.chat` gives for the same prompt.
- Bounded: at most `max_batch` rows decode and `max_queue` requests wait; beyond that `submit` raises
  `QueueFullError` at once (the server answers 429).
- Events go to a per-request `sink(kind, value)`, called on the scheduler thread: ("token", id), ("end", reason)
  with reason "stop" | "length" | "cancelled", or ("error", exception). The default sink is a queue that the
  `Generation` iterator reads; the server passes one that hands events to its event loop.
- `exclusive()` pauses batching: the loop holds `model_lock` around each iteration's model work (admissions and
  the decode step), so a caller holding it (a spoken reply, whose thinker hooks would record any other forward
  pass) has the model to itself; batched rows wait between two steps and go on afterwards.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import ContextOverflowError, QwenOmniError
from ..models.group_prefill import prefill_prompts
from ..models.kv_cache import copy_prefix
from .generate import make_generator
from .sampling import SamplingParams, apply_repetition_penalty, sample
from .shared_prefix import SharedPrefixCache
from .slot_pool import SlotPool
from .tokenizer import StreamDecoder

log = logging.getLogger("qwen_omni.engine.scheduler")
Sink = Callable[[str, Any], None]


class QueueFullError(QwenOmniError):
    """Every slot is busy and the waiting queue is full; retry later."""


class SchedulerClosedError(QwenOmniError):
    """The scheduler was shut down."""


@dataclass(eq=False)
class Generation:
    """One request: its inputs and settings, the scheduler's bookkeeping, and the caller's handle."""
    inputs: dict
    budget: int
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    sink: Sink | None = None
    stats: dict = field(default_factory=dict)
    # scheduler-side state
    out: list[int] = field(default_factory=list)
    cache: Any = None  # the batch-1 KVCache of the prompt (goes back to the PrefixCache at the end)
    next_token: int = -1  # sampled, not yet fed
    seen: torch.Tensor | None = None  # (1, n) prompt ids + generated ones, for the repetition penalty
    finish_reason: str | None = None
    cancelled: bool = False
    _events: "queue.Queue | None" = None
    _scheduler: "BatchScheduler | None" = None

    def __post_init__(self):
        if self.sink is None:
            self._events = queue.Queue()
            self.sink = lambda kind, value: self._events.put((kind, value))

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next decode step."""
        if not self.cancelled and self.finish_reason is None:
            self.cancelled = True
            if self._scheduler is not None:
                self._scheduler.wake()

    def __iter__(self) -> Iterator[int]:
        """Token ids as they are produced (default sink only); leaving the loop early cancels the request."""
        if self._events is None:
            raise RuntimeError("this Generation reports through its own sink")
        try:
            while True:
                kind, value = self._events.get()
                if kind == "token":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()


class BatchScheduler:
    def __init__(self, assistant, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefill_tokens: int = 1024):
        self.assistant, self.model = assistant, assistant.model
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.max_len = min(max_len or assistant.context_window, assistant.context_window)
        if not isinstance(assistant.prefix_cache, SharedPrefixCache):  # many conversations: share, do not steal
            assistant.prefix_cache = SharedPrefixCache(lambda n: self.model.new_cache(1, n),
                                                       assistant.prefix_cache.capacity)
        self.pool = SlotPool(self.model, max_batch, self.max_len)
        self.rows: list[Generation] = []  # rows[i] decodes in pool row i
        self.waiting: deque[Generation] = deque()
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.prefill_groups = 0  # prefill passes run (a group of newcomers shares one)
        self._cv = threading.Condition()
        self._closed = False
        self.model_lock = threading.RLock()  # held by the loop around its model work; see exclusive()
        self._thread = threading.Thread(target=self._loop, name="qwen-omni-scheduler", daemon=True)
        self._thread.start()

    # ---- caller side -----------------------------------------------------------------------------------------
    def submit(self, inputs: dict, *, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               ignore_eos: bool = False, sink: Sink | None = None) -> Generation:
        """Queue prepared inputs (`Assistant.prepare`); raises QueueFullError / ContextOverflowError at once."""
        n = inputs["input_ids"].shape[1]
        if n >= self.max_len:
            raise ContextOverflowError(
                f"the prompt is {n} tokens (media placeholders included) but this server's context length is "
                f"{self.max_len}; shorten the conversation, or send smaller or fewer images/audio/video")
        room = self.max_len - n
        budget = room if max_new_tokens is None else min(max_new_tokens, room)
        g = Generation(inputs, budget, SamplingParams(temperature, top_k, top_p, repetition_penalty),
                       make_generator(seed), frozenset() if ignore_eos else frozenset(self.assistant.stop_ids), sink)
        g.stats.update(prompt_tokens=n, submitted=time.perf_counter())
        with self._cv:
            if self._closed:
                raise SchedulerClosedError("the scheduler has been shut down")
            if len(self.waiting) >= self.max_queue + self.pool.free:  # free rows take newcomers at once
                raise QueueFullError(f"the server is busy: {len(self.rows)} requests are generating and "
                                     f"{len(self.waiting)} are waiting (the limit); retry shortly")
            g._scheduler = self
            self.waiting.append(g)
            self._cv.notify()
        return g

    def chat(self, messages: list[dict], *, max_new_tokens: int = 512, stream: bool = False,
             stats: dict | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, seed: int | None = None, **options: Any):
        """`Assistant.chat`, batched with whatever else is running."""
        t0 = time.perf_counter()
        inputs = self.assistant.prepare(messages, **options)
        g = self.submit(inputs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, seed=seed)
        g.stats["prepare_time"] = time.perf_counter() - t0
        pieces = self._pieces(g, stats)
        return pieces if stream else "".join(pieces)

    def _pieces(self, g: Generation, stats: dict | None) -> Iterator[str]:
        decoder = StreamDecoder(self.assistant.tokenizer)
        try:
            for tok in g:
                if piece := decoder.push(tok):
                    yield piece
            if tail := decoder.flush():
                yield tail
        finally:
            g.cancel()
            if stats is not None:
                stats.update(g.stats)

    def load(self) -> dict:
        """{"active", "waiting", "free_slots"}: a consistent snapshot."""
        with self._cv:
            return {"active": len(self.rows), "waiting": len(self.waiting), "free_slots": self.pool.free}

    def exclusive(self) -> threading.RLock:
        """`with scheduler.exclusive():` the model is the caller's alone (batching pauses between two steps)."""
        return self.model_lock

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- scheduler thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():  # cheaper per op than no_grad (no view / version tracking)
            while True:
                with self._cv:
                    while not self._closed and not self.waiting and not self.rows:
                        self._cv.wait()
                    if self._closed:
                        break
                    for g in [g for g in self.waiting if g.cancelled]:
                        self.waiting.remove(g)
                        self._finish(g, "cancelled")
                with self.model_lock:
                    for row in reversed(range(len(self.rows))):  # high to low: removal moves the last row down
                        if self.rows[row].cancelled:
                            self._release(row, "cancelled")
                    admitted = 0
                    while self.pool.free and (admitted == 0 or not self.rows):
                        group = self._next_group()
                        if not group:
                            break
                        self._admit(group)
                        admitted += len(group)
                    if self.rows:
                        self._step()
        self._shutdown()

    def _next_group(self) -> list[Generation]:
        """The waiting requests to prefill together: as many as there are free rows, while their prompts add up
        to at most `prefill_tokens` (the first is always taken), so one admission stalls the batch boundedly."""
        group, tokens = [], 0
        with self._cv:
            while self.waiting and len(group) < self.pool.free:
                n = self.waiting[0].inputs["input_ids"].shape[1]
                if group and tokens + n > self.prefill_tokens:
                    break
                group.append(self.waiting.popleft())
                tokens += n
        return group

    def _admit(self, group: list[Generation]) -> None:
        """Prefill newcomers together (each reusing its cached prefix), sample their first tokens, give rows."""
        ready, prompts = [], []
        for g in group:  # embedding encodes the media and checks placeholders: a bad one fails alone
            g.stats["queue_time"] = time.perf_counter() - g.stats["submitted"]
            try:
                prompts.append(self.model.prompt(g.inputs, self._take_cache(g)))
                ready.append(g)
            except Exception as e:  # noqa: BLE001 - reported to this request; the others carry on
                self._fail_prefill(g, e)
        if not ready:
            return
        try:
            logits = prefill_prompts(self.model, prompts, [g.cache for g in ready])  # (k, V)
        except Exception as e:  # noqa: BLE001 - a bug: fail this group, keep serving
            for g in ready:
                self._fail_prefill(g, e)
            return
        self.prefill_groups += 1
        now = time.perf_counter()
        for i, g in enumerate(ready):
            g.stats["time_to_first_token"] = now - g.stats["submitted"]
            try:
                tok = self._sample(g, logits[i:i + 1])
                if tok not in g.stop_ids and g.budget > 1:  # it goes on: take the row before anyone sees the token
                    self.pool.insert(g.cache, g.inputs["input_ids"].shape[1])
                    self.rows.append(g)
                if self._take(g, tok):
                    g.next_token = tok
            except Exception as e:  # noqa: BLE001
                self._fail_prefill(g, e)

    def _take_cache(self, g: Generation) -> int:
        """Give g a batch-1 cache holding the longest reusable prefix of its prompt; return that prefix's length."""
        ids = g.inputs["input_ids"]
        n = ids.shape[1]
        cache, reused, _ = self.assistant.prefix_cache.take(g.inputs.get("cache_key") or ids[0].tolist())
        if cache is None or cache.max_len < n:
            old, cache = cache, self.model.new_cache(1, n)
            reused = copy_prefix(old, cache, reused) if old is not None else 0
        g.cache, g.seen, g.stats["reused_tokens"] = cache, ids, reused
        return reused

    def _fail_prefill(self, g: Generation, e: Exception) -> None:
        if not isinstance(e, QwenOmniError):
            log.exception("prefill failed")
        g.cache = None  # the cache may be half-written: do not keep it
        self._finish(g, None, error=e)

    def _step(self) -> None:
        """One decode step over all active rows."""
        tokens = torch.tensor([g.next_token for g in self.rows], dtype=torch.long)
        try:
            logits = self.model.decode_step(tokens, self.pool.view())  # (B, V)
        except Exception as e:  # noqa: BLE001 - a bug: fail the batch, keep serving
            log.exception("decode step failed")
            for g in self.rows:
                g.cache = None
                self._finish(g, None, error=e)
            self.rows.clear()
            self.pool.clear()
            return
        self.steps += 1
        if all(g.params.temperature == 0 and g.params.repetition_penalty == 1.0 for g in self.rows):
            picked = logits.float().argmax(-1).tolist()  # all greedy: one argmax, one host sync
        else:
            picked = [self._sample(g, logits[i:i + 1]) for i, g in enumerate(self.rows)]
        done = []
        for row, (g, tok) in enumerate(zip(self.rows, picked)):
            if self._take(g, tok):
                g.next_token = tok
            else:
                done.append(row)
        for row in reversed(done):
            self._release(row, self.rows[row].finish_reason)

    def _sample(self, g: Generation, logits: torch.Tensor) -> int:
        if g.params.repetition_penalty != 1.0 and g.out:
            g.seen = torch.cat([g.seen, torch.tensor([[g.out[-1]]], dtype=torch.long)], dim=1)
        logits = apply_repetition_penalty(logits.float(), g.seen.to(logits.device), g.params.repetition_penalty)
        return int(sample(logits, g.params, g.generator)[0])

    def _take(self, g: Generation, tok: int) -> bool:
        """Record a sampled token; False when the request is over (the token then is not fed)."""
        if tok in g.stop_ids:
            g.finish_reason = "stop"
        else:
            g.out.append(tok)
            g.sink("token", tok)
            if len(g.out) >= g.budget:
                g.finish_reason = "length"
        if g.finish_reason is not None and g not in self.rows:
            self._finish(g, g.finish_reason)  # ended at its first token: it never got a row
        return g.finish_reason is None

    def _release(self, row: int, reason: str) -> None:
        """Finish the request in `row`: keep its conversation for reuse, free the row (the last one moves in)."""
        g = self.rows[row]
        n = g.inputs["input_ids"].shape[1]
        end = self.pool.length(row)  # prompt + the generated tokens that were fed
        if g.cache is not None:
            if g.cache.max_len < end:
                old, g.cache = g.cache, self.model.new_cache(1, end)
                copy_prefix(old, g.cache, n)
            self.pool.copy_out(row, g.cache, n, end)
        moved = self.pool.remove(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
        self.rows.pop()
        self._finish(g, reason, fed=end - n)

    def _finish(self, g: Generation, reason: str | None, error: Exception | None = None, fed: int = 0) -> None:
        if g.cache is not None:  # the prompt plus the generated tokens that are in the cache
            key = g.inputs.get("cache_key") or g.inputs["input_ids"][0].tolist()
            held = list(key) + g.out[:fed]
            g.cache.truncate(len(held))
            self.assistant.prefix_cache.put(held, g.cache)
            g.cache = None
        g.finish_reason = g.finish_reason or reason or "error"
        now = time.perf_counter()
        st = g.stats
        ttft = st.get("time_to_first_token")
        total = now - st["submitted"]
        st.update(completion_tokens=len(g.out), total_time=total, finish_reason=g.finish_reason,
                  tokens_per_second=(len(g.out) - 1) / (total - ttft) if ttft and len(g.out) > 1 and total > ttft
                  else None)
        g.sink("error", error) if error is not None else g.sink("end", g.finish_reason)

    def _shutdown(self) -> None:
        err = SchedulerClosedError("the server is shutting down")
        with self._cv:
            pending = list(self.waiting) + list(self.rows)
            self.waiting.clear()
            self.rows.clear()
        for g in pending:
            g.cache = None
            self._finish(g, None, error=err)
        self.pool.clear()
