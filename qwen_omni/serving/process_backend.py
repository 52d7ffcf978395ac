"""`serve --engine-process`: the model and its batch scheduler in a child process, the HTTP server in this one.

Why: in one process the scheduler thread and the server's event loop share one GIL. Between two decode steps the
loop writes an SSE event per client (JSON, the ASGI send, the socket write), and each of those holds the GIL that
the next step needs; a CPU decode step of a small model is itself mostly Python between short kernels, so the two
serialise. With the model in its own process, decode steps and HTTP work run on two cores at once.

Design
- `ProcessBackend` has the interface of `backends.LocalBackend` (`start`, `load`, `close`, `name`, ...), so the
  server does not know which one it has. It starts the child with the "spawn" method (a fresh interpreter: no
  forked threads or locks), which loads the model and answers `("ready", info)` or `("failed", message)`.
- The child runs a `LocalBackend`'s scheduler, media cache and prefix cache unchanged. Requests go down one pipe as
  `("start", job id, messages, options, submit kwargs)` and `("cancel", job id)`; templating and media decoding
  (`Assistant.prepare`) run in a small thread pool there, as they do in a worker thread of the server otherwise.
- Events come back as lists of `(job id, kind, value)`, one pipe message per batch: the scheduler's sink only
  appends, and a sender thread ships whatever has accumulated, so a decode step over 8 rows is one write, not 8.
  Kinds are those of `BatchScheduler` ("token" id, "end" reason, "error" exception), plus "meta" (prompt and
  reused token counts) right before a request's first token. Each message also carries the scheduler's load, for
  `/health`. Token ids are turned into text here (`ProcessJob` is a `LocalJob`), next to the stop strings.
- Failures: an exception that cannot be pickled crosses as a `QwenOmniError` with its message; if the child dies,
  every open request fails with `SchedulerClosedError` (503) and so does every later one.
- The pipe carries pickles between this module and the child it started, never data from disk or the network.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio

from ..engine.reasoning import mode as reasoning_mode
from ..engine.scheduler import SchedulerClosedError
from ..engine.tokenizer import Tokenizer
from ..errors import QwenOmniError
from .backends import Job, LocalBackend, LocalJob, Mailbox, submit_args
from .openai_api import ChatRequest


class ProcessJob(LocalJob):
    """A `LocalJob` (text from token ids, counts) whose generation runs in the child: its counts arrive as "meta"."""

    def __init__(self, loop, tokenizer, backend: "ProcessBackend", jid: int, mailbox: Mailbox):
        super().__init__(loop, tokenizer, mailbox)
        self.backend, self.jid = backend, jid
        self._cancel_sent = False

    def _piece(self, kind: str, value: Any) -> str:
        if kind == "meta":  # sent before the first token or the end, so LocalJob never looks for `gen`
            self.prompt_tokens, self.cached_tokens = value["prompt_tokens"], value["reused_tokens"]
            return ""
        return super()._piece(kind, value)

    def cancel(self) -> None:
        # The server cancels every job once it is over, too: only a job the child still runs costs a message.
        if not self._cancel_sent and not self.done and self.backend._running(self.jid):
            self._cancel_sent = True
            self.backend._send(("cancel", self.jid))


class ProcessBackend:
    kind = "local"

    def __init__(self, model: str, load_kwargs: dict, backend_args: tuple, threads: int | None = None,
                 log_level: str = "warning", start_timeout: float = 600.0):
        """Start the child and wait for its model (the server calls this in its loading thread)."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_conn, model, load_kwargs, backend_args, threads,
                                                           log_level), name="qwen-omni-engine", daemon=True)
        self._proc.start()
        child_conn.close()
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise RuntimeError(f"the model process did not load within {start_timeout:.0f} s")
        kind, info = self._conn.recv()
        if kind != "ready":
            self._proc.join(5)
            raise RuntimeError(f"the model process failed to load the model: {info}")
        self.name, self.context_window, self.defaults = info["name"], info["context_window"], info["defaults"]
        self.tokenizer = Tokenizer.from_dir(info["path"])
        self.reasoning = reasoning_mode(self.tokenizer)  # how replies split into reasoning_content / content
        self._load = {"active": 0, "waiting": 0, "free_slots": info["max_batch"]}
        self._jobs: dict[int, ProcessJob] = {}
        self._ids = itertools.count()
        self._send_lock, self._jobs_lock = threading.Lock(), threading.Lock()
        self._mailbox: Mailbox | None = None
        self._dead: str | None = None
        threading.Thread(target=self._read, name="qwen-omni-engine-reader", daemon=True).start()

    async def start(self, req: ChatRequest) -> Job:
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        job = ProcessJob(loop, self.tokenizer, self, next(self._ids), self._mailbox)
        with self._jobs_lock:  # atomic with the reader's "child exited": no job is registered after it
            if self._dead:
                raise SchedulerClosedError(self._dead)
            self._jobs[job.jid] = job
        submit = submit_args(req, self.defaults)
        # a worker thread: pickling and writing megabytes of media would stall the event loop
        await anyio.to_thread.run_sync(self._send, ("start", job.jid, req.messages, req.use_audio_in_video, submit))
        return job

    def load(self) -> dict:
        return dict(self._load)

    def close(self) -> None:
        self._send(("close",))
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()

    def _running(self, jid: int) -> bool:
        with self._jobs_lock:
            return jid in self._jobs

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):  # the child is gone: the reader fails the open requests
            pass

    def _read(self) -> None:
        """Reader thread: hand each event to its job; when the child exits, fail whatever is still open."""
        while True:
            try:
                events, self._load = self._conn.recv()
            except (EOFError, OSError):
                break
            for jid, kind, value in events:
                with self._jobs_lock:
                    job = self._jobs.pop(jid, None) if kind in ("end", "error") else self._jobs.get(jid)
                if job is not None:
                    job.post(kind, value)
        self._proc.join(2)  # for its exit status
        with self._jobs_lock:
            self._dead = f"the model process exited (status {self._proc.exitcode}); restart the server"
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.post("error", SchedulerClosedError(self._dead))


# ------------------------------------------------------------------------------------------------------ child

def _child_main(conn, model: str, load_kwargs: dict, backend_args: tuple, threads: int | None,
                log_level: str) -> None:
    """The spawned process: load the model, answer ("ready", info) or ("failed", message), then serve the pipe."""
    import torch

    from ..assistant import load

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[model process]: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        backend = LocalBackend(load(model, **load_kwargs), *backend_args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails its start-up
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"name": backend.name, "context_window": backend.context_window, "defaults": backend.defaults,
                         "path": str(backend.assistant.path), "max_batch": backend.scheduler.max_batch}))
    ModelProcess(conn, backend).serve()


class ModelProcess:
    """The child's side of the pipe: prepares and submits requests, cancels them, and ships their events back."""

    def __init__(self, conn, backend: LocalBackend):
        self.conn, self.backend, self.sched = conn, backend, backend.scheduler
        self.out: list[tuple] = []  # events not yet sent: (job id, kind, value)
        self.cv = threading.Condition()  # guards `out`; wakes the sender
        self.lock = threading.Lock()  # guards the three below
        self.gens: dict[int, Any] = {}  # submitted and not finished
        self.pending: set[int] = set()  # received, still being prepared
        self.cancelled: set[int] = set()  # pending ones whose client already left
        self.done = threading.Event()

    def serve(self) -> None:
        """Read commands until the server closes the pipe or says "close"; then stop the scheduler."""
        threading.Thread(target=self._sender, name="qwen-omni-model-sender", daemon=True).start()
        pool = ThreadPoolExecutor(2, thread_name_prefix="qwen-omni-prepare")
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the server process is gone
                break
            if msg[0] == "start":
                with self.lock:
                    self.pending.add(msg[1])
                pool.submit(self._start, *msg[1:])
            elif msg[0] == "cancel":
                self._cancel(msg[1])
            elif msg[0] == "close":
                break
        pool.shutdown(wait=True)
        self.sched.close()
        self.done.set()
        with self.cv:
            self.cv.notify()

    def _emit(self, jid: int, kind: str, value: Any) -> None:
        if kind == "error":
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - e.g. an exception holding a lock or a tensor view
                value = QwenOmniError(f"{type(value).__name__}: {value}")
        with self.cv:
            self.out.append((jid, kind, value))
            self.cv.notify()

    def _sender(self) -> None:
        """Ship whatever has accumulated as one pipe message (a decode step over 8 rows is one write, not 8)."""
        while True:
            with self.cv:
                while not self.out and not self.done.is_set():
                    self.cv.wait()
                if not self.out:
                    return
                batch = self.out[:]
                self.out.clear()
            with self.lock:
                for jid, kind, _ in batch:
                    if kind in ("end", "error"):
                        self.gens.pop(jid, None)
            try:
                self.conn.send((batch, self.sched.load()))
            except (OSError, ValueError):
                return

    def _start(self, jid: int, messages: list, use_audio_in_video: bool | None, submit: dict) -> None:
        """Prepare (in the pool) and submit one request; its errors become the request's "error" event."""
        try:
            inputs = self.backend.prepare(messages, use_audio_in_video)
            n = inputs["input_ids"].shape[1]
            first, submitted, box = [True], threading.Event(), {}

            def sink(kind: str, value: Any) -> None:  # on the scheduler thread
                if first[0] and kind != "error":  # counts first: the server sets its headers from them
                    first[0] = False
                    submitted.wait()  # `submit` may not have returned yet
                    self._emit(jid, "meta", {"prompt_tokens": n,
                                             "reused_tokens": box["g"].stats.get("reused_tokens", 0)})
                self._emit(jid, kind, value)
            try:
                box["g"] = g = self.sched.submit(inputs, sink=sink, **submit)
            finally:
                submitted.set()
            with self.lock:
                if g.finish_reason is None:  # else its end is already on its way
                    self.gens[jid] = g
                if jid in self.cancelled:
                    g.cancel()
        except Exception as e:  # noqa: BLE001 - bad input, queue full, context overflow: the request's error
            self._emit(jid, "error", e)
        finally:
            with self.lock:
                self.pending.discard(jid)
                self.cancelled.discard(jid)

    def _cancel(self, jid: int) -> None:
        with self.lock:
            g = self.gens.get(jid)
            if g is None and jid in self.pending:
                self.cancelled.add(jid)  # `_start` cancels it once submitted
        if g is not None:
            g.cancel()
