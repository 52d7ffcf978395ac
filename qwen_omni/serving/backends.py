"""What the HTTP server talks to: a local model behind the `BatchScheduler`, or a remote OpenAI-compatible server.

Design
- `backend.start(request)` (a coroutine) does the blocking preparation in a worker thread (templating, media
  decoding; the remote backend opens its HTTP stream there), queues the work, and returns a `Job`. Errors a
  client caused surface here, before any response header is sent, so they get a proper status code.
- A `Job` hands events from the producing thread to the event loop (through a `Mailbox`, into an
  `asyncio.Queue`); `await job.next()` returns every text piece available now (a slow client gets a few tokens
  per SSE chunk instead of falling behind), or raises the request's error. `job.cancel()` stops the work: the
  local scheduler frees the slot before its next decode step; the remote worker closes its HTTP stream.
- `api_error(exc)` maps library exceptions onto OpenAI-shaped `APIError`s (400 bad input, 429 queue full,
  502 upstream failure, 503 shutting down); anything else is a 500 with the details kept in the log.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, AsyncIterator

import anyio

from ..engine.media_cache import CachingProcessor
from ..engine.scheduler import BatchScheduler, QueueFullError, SchedulerClosedError
from ..engine.tokenizer import StreamDecoder
from ..errors import ContextOverflowError, QwenOmniError
from .openai_api import APIError, ChatRequest, StopText
from .remote import RemoteAssistant, RemoteError, RemoteRequestError, RemoteUnsupportedError

log = logging.getLogger("qwen_omni.serving.server")


def api_error(e: BaseException, req: ChatRequest | None = None) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, SchedulerClosedError):
        return APIError(503, str(e), "service_unavailable", code="shutting_down")
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, RemoteRequestError):
        return APIError(e.status, e.message)
    if isinstance(e, RemoteError):
        status = e.status if e.status in (429, 503) else 502
        return APIError(status, str(e), "upstream_error", code="upstream_error")
    if isinstance(e, RemoteUnsupportedError):
        return APIError(400, str(e))
    if isinstance(e, (QwenOmniError, ValueError)):  # InputError, MediaError, bad sampling values
        msg = req.name_error(str(e)) if req is not None else str(e)
        return APIError(400, msg, param=msg.split(":")[0] if msg.startswith("messages[") else None)
    log.error("request failed", exc_info=e)
    return APIError(500, "internal server error (logged on the server)", "server_error")


def submit_args(req: ChatRequest, defaults: dict) -> dict:
    """`BatchScheduler.submit` keyword arguments of a request (sampling falls back to the model's defaults)."""
    return dict(max_new_tokens=req.max_tokens, ignore_eos=req.ignore_eos, **req.sampling(defaults))


class Mailbox:
    """Events from producing threads to one event loop, with one wake-up for however many events arrive before
    the loop gets to them. A batched decode step posts a token for each of its rows: one
    `call_soon_threadsafe` each meant as many self-pipe writes and loop iterations per step, all competing with
    the scheduler thread for the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, q: asyncio.Queue, event: tuple) -> None:
        """From any thread. Raises RuntimeError when the loop is closed."""
        with self._lock:
            wake = not self._items
            self._items.append((q, event))
        if wake:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for q, event in items:
            q.put_nowait(event)


class Job:
    """One generation as the event loop sees it: text pieces, then a finish reason and token counts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, mailbox: Mailbox | None = None):
        self._mailbox, self._q = mailbox or Mailbox(loop), asyncio.Queue()
        self.done = False
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.cached_tokens: int | None = None

    def post(self, kind: str, value: Any) -> None:
        """From any thread: ("text" | "token", value), ("end", reason) or ("error", exception)."""
        try:
            self._mailbox.post(self._q, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutdown): nobody is listening
            self.cancel()

    async def next(self) -> list[str]:
        """Every piece available now (waiting for at least one event); [] and `done` once finished."""
        events = [await self._q.get()]
        while not self._q.empty():
            events.append(self._q.get_nowait())
        pieces = []
        for kind, value in events:
            if kind == "error":
                self.done = True
                raise value
            if kind == "end":
                self.done = True
                self._end(value)
                if tail := self._flush():
                    pieces.append(tail)
            else:
                pieces.append(self._piece(kind, value))
        return [p for p in pieces if p]

    def _piece(self, kind: str, value: Any) -> str:
        return value

    def _flush(self) -> str:
        return ""

    def _end(self, reason: str) -> None:
        self.finish_reason = reason

    def cancel(self) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------ local

class LocalJob(Job):
    def __init__(self, loop, tokenizer, mailbox: Mailbox | None = None):
        super().__init__(loop, mailbox)
        self.decoder = StreamDecoder(tokenizer)
        self.gen = None

    def _piece(self, kind: str, tok: int) -> str:
        self.completion_tokens += 1
        if self.cached_tokens is None:  # set by the scheduler before the first token was sent
            self.cached_tokens = self.gen.stats.get("reused_tokens", 0)
        return self.decoder.push(tok)

    def _flush(self) -> str:
        return self.decoder.flush()

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        if self.cached_tokens is None:
            self.cached_tokens = self.gen.stats.get("reused_tokens", 0)

    def cancel(self) -> None:
        if self.gen is not None:
            self.gen.cancel()


class LocalBackend:
    kind = "local"

    def __init__(self, assistant, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefix_cache_size: int | None = None):
        self.assistant = assistant
        if assistant.processor is not None:  # follow-up turns re-send their media: keep the features
            assistant.processor = CachingProcessor(assistant.processor)
        if prefix_cache_size is not None:
            assistant.prefix_cache.capacity = prefix_cache_size
        self.scheduler = BatchScheduler(assistant, max_batch, max_queue, max_len)
        self.name = assistant.path.name
        self.reasoning = assistant.reasoning_mode  # how replies split into reasoning_content / content
        self.context_window = self.scheduler.max_len
        gen_cfg = assistant.path / "generation_config.json"
        cfg = json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else {}
        self.defaults = {k: cfg[k] for k in ("temperature", "top_p", "top_k") if cfg.get(k) is not None}
        self._mailbox: Mailbox | None = None  # shared by this backend's jobs: one wake-up per decode step

    async def start(self, req: ChatRequest) -> Job:
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        inputs = await anyio.to_thread.run_sync(self.prepare, req.messages, req.use_audio_in_video)
        job = LocalJob(loop, self.assistant.tokenizer, self._mailbox)
        job.gen = self.scheduler.submit(inputs, sink=job.post, **submit_args(req, self.defaults))
        job.prompt_tokens = inputs["input_ids"].shape[1]
        return job

    def prepare(self, messages: list[dict], use_audio_in_video: bool | None = None) -> dict:
        """`Assistant.prepare` with the request's options (blocking: media decoding, the template)."""
        opts = {}
        if self.assistant.processor is not None and use_audio_in_video is not None:
            opts["use_audio_in_video"] = use_audio_in_video
        return self.assistant.prepare(messages, **opts)

    def load(self) -> dict:
        return self.scheduler.load()

    def close(self) -> None:
        self.scheduler.close()


# ------------------------------------------------------------------------------------------------------ remote

class RemoteJob(Job):
    def __init__(self, loop):
        super().__init__(loop)
        self.cancelled = False
        self.stats: dict = {}

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.prompt_tokens = self.stats.get("prompt_tokens") or 0
        self.completion_tokens = self.stats.get("completion_tokens") or 0
        self.cached_tokens = self.stats.get("reused_tokens")

    def cancel(self) -> None:
        self.cancelled = True


class RemoteBackend:
    """Forwards to an OpenAI-compatible server through `RemoteAssistant`, one worker thread per request."""
    kind = "openai"

    def __init__(self, remote: RemoteAssistant, max_batch: int = 8, max_queue: int = 64):
        self.remote, self.max_batch, self.max_queue = remote, max_batch, max_queue
        self.name = remote.model
        self.reasoning = None  # the remote server splits reasoning itself (vLLM's --reasoning-parser)
        self.context_window = remote.context_window
        self.defaults: dict = {}
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_batch)
        self._active = self._waiting = 0

    async def start(self, req: ChatRequest) -> Job:
        with self._lock:
            if self._waiting >= self.max_queue and self._active >= self.max_batch:
                raise QueueFullError(f"the server is busy: {self._active} requests are generating and "
                                     f"{self._waiting} are waiting (the limit); retry shortly")
            self._waiting += 1
        job = RemoteJob(asyncio.get_running_loop())
        threading.Thread(target=self._work, args=(job, req), daemon=True, name="qwen-omni-remote").start()
        return job

    def _work(self, job: RemoteJob, req: ChatRequest) -> None:
        with self._slots:
            with self._lock:
                self._waiting -= 1
                self._active += 1
            try:
                s = req.sampling()
                pieces = self.remote.chat(
                    req.messages, stream=True, stats=job.stats, max_new_tokens=req.max_tokens,
                    temperature=req.temperature, top_p=req.top_p, top_k=s["top_k"],
                    repetition_penalty=s["repetition_penalty"], seed=req.seed, stop=req.stop,
                    ignore_eos=req.ignore_eos, use_audio_in_video=req.use_audio_in_video)
                try:
                    for piece in pieces:
                        if job.cancelled:
                            break
                        job.post("text", piece)
                finally:
                    pieces.close()  # closes the HTTP stream: the upstream stops generating
                job.post("end", job.stats.get("finish_reason") or "stop")
            except Exception as e:  # noqa: BLE001 - handed to the request
                job.post("error", e)
            finally:
                with self._lock:
                    self._active -= 1

    def load(self) -> dict:
        with self._lock:
            return {"active": self._active, "waiting": self._waiting, "free_slots": self.max_batch - self._active}

    def close(self) -> None:
        self.remote.close()


async def stop_at_strings(job: Job, stops: list[str], first: list) -> AsyncIterator[tuple[str, Any]]:
    """A job's output as ("text", str) and ("audio", chunk) pairs, with the request's stop strings applied to the
    text: at a match the job is cancelled and its finish_reason becomes "stop". Items of `first` and of each
    `job.next()` batch are text (str) or (kind, value) pairs; a batch's consecutive texts go out as one piece (a
    slow client gets a few tokens per chunk instead of falling behind)."""
    stopper, batch = StopText(stops), first
    while True:
        runs: list[tuple[str, Any]] = []
        for item in batch:
            kind, value = ("text", item) if isinstance(item, str) else item
            if kind == "text" and runs and runs[-1][0] == "text":
                runs[-1] = ("text", runs[-1][1] + value)
            else:
                runs.append((kind, value))
        for kind, value in runs:
            if kind != "text":
                yield kind, value
                continue
            if text := stopper.push(value):
                yield "text", text
            if stopper.stopped:
                job.cancel()
                job.finish_reason = "stop"
                return
        if job.done:
            if tail := stopper.flush():
                yield "text", tail
            return
        batch = await job.next()


async def cancel_on_disconnect(request, job: Job, every: float = 0.5) -> None:
    """Cancel a job whose HTTP client has left (a non-streaming request has no generator to notice it)."""
    while not job.done:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(every)
