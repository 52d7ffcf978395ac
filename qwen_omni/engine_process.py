"""`serve --engine-process`: the model and its batch scheduler in a child process, the HTTP server in this one.

Why: in one process the scheduler thread and the server's event loop share one GIL. Between two decode steps the
loop writes an SSE event per client (JSON, the ASGI send, the socket write), and each of those holds the GIL that
the next step needs; a CPU decode step of a small model is itself mostly Python between short kernels, so the two
serialise. With the model in its own process, decode steps and HTTP work run on two cores at once.

Design
- `ProcessEngine` has the interface of `engines.LocalEngine` (`start`, `load`, `close`, `name`, ...), so the
  server does not know which one it has. It starts the child with the "spawn" method (a fresh interpreter: no
  forked threads or locks), which loads the model and answers `("ready", info)` or `("failed", message)`.
- The child runs a `LocalEngine`'s scheduler, media cache and prefix cache unchanged. Requests go down one pipe as
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

from .batching import SchedulerClosedError
from .engines import Job, LocalJob, Mailbox, submit_args
from .errors import QwenOmniError
from .openai_api import ChatRequest
from .reasoning import mode as reasoning_mode
from .tokenizer import Tokenizer


class ProcessJob(LocalJob):
    """A `LocalJob` (text from token ids, counts) whose generation runs in the child: its counts arrive as "meta"."""

    def __init__(self, loop, tokenizer, engine: "ProcessEngine", jid: int, mailbox: Mailbox):
        super().__init__(loop, tokenizer, mailbox)
        self.engine, self.jid = engine, jid
        self._cancel_sent = False

    def _piece(self, kind: str, value: Any) -> str:
        if kind == "meta":  # sent before the first token or the end, so LocalJob never looks for `gen`
            self.prompt_tokens, self.cached_tokens = value["prompt_tokens"], value["reused_tokens"]
            return ""
        return super()._piece(kind, value)

    def cancel(self) -> None:
        # The server cancels every job once it is over, too: only a job the child still runs costs a message.
        if not self._cancel_sent and not self.done and self.engine._running(self.jid):
            self._cancel_sent = True
            self.engine._send(("cancel", self.jid))


class ProcessEngine:
    backend = "local"

    def __init__(self, model: str, load_kwargs: dict, engine_args: tuple, threads: int | None = None,
                 log_level: str = "warning", start_timeout: float = 600.0):
        """Start the child and wait for its model (the server calls this in its loading thread)."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_conn, model, load_kwargs, engine_args, threads,
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

def _child_main(conn, model: str, load_kwargs: dict, engine_args: tuple, threads: int | None,
                log_level: str) -> None:
    import torch

    from .assistant import load
    from .engines import LocalEngine

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        engine = LocalEngine(load(model, **load_kwargs), *engine_args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails its start-up
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    sched = engine.scheduler
    conn.send(("ready", {"name": engine.name, "context_window": engine.context_window, "defaults": engine.defaults,
                         "path": str(engine.assistant.path), "max_batch": sched.max_batch}))
    out: list[tuple] = []
    cv = threading.Condition()
    lock = threading.Lock()  # guards the three below
    gens: dict[int, Any] = {}  # submitted and not finished
    pending: set[int] = set()  # received, still being prepared
    cancelled: set[int] = set()  # pending ones whose client already left
    done = threading.Event()

    def emit(jid: int, kind: str, value: Any) -> None:
        if kind == "error":
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - e.g. an exception holding a lock or a tensor view
                value = QwenOmniError(f"{type(value).__name__}: {value}")
        with cv:
            out.append((jid, kind, value))
            cv.notify()

    def sender() -> None:
        while True:
            with cv:
                while not out and not done.is_set():
                    cv.wait()
                if not out:
                    return
                batch = out[:]
                out.clear()
            with lock:
                for jid, kind, _ in batch:
                    if kind in ("end", "error"):
                        gens.pop(jid, None)
            try:
                conn.send((batch, sched.load()))
            except (OSError, ValueError):
                return

    def start(jid: int, messages: list, use_audio_in_video: bool | None, submit: dict) -> None:
        try:
            inputs = engine.prepare(messages, use_audio_in_video)
            n = inputs["input_ids"].shape[1]
            first, submitted, box = [True], threading.Event(), {}

            def sink(kind: str, value: Any) -> None:  # on the scheduler thread
                if first[0] and kind != "error":  # counts first: the server sets its headers from them
                    first[0] = False
                    submitted.wait()  # `submit` may not have returned yet
                    emit(jid, "meta", {"prompt_tokens": n, "reused_tokens": box["g"].stats.get("reused_tokens", 0)})
                emit(jid, kind, value)
            try:
                box["g"] = g = sched.submit(inputs, sink=sink, **submit)
            finally:
                submitted.set()
            with lock:
                if g.finish_reason is None:  # else its end is already on its way
                    gens[jid] = g
                if jid in cancelled:
                    g.cancel()
        except Exception as e:  # noqa: BLE001 - bad input, queue full, context overflow: the request's error
            emit(jid, "error", e)
        finally:
            with lock:
                pending.discard(jid)
                cancelled.discard(jid)

    threading.Thread(target=sender, name="qwen-omni-engine-sender", daemon=True).start()
    pool = ThreadPoolExecutor(2, thread_name_prefix="qwen-omni-prepare")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server process is gone
            break
        if msg[0] == "start":
            with lock:
                pending.add(msg[1])
            pool.submit(start, *msg[1:])
        elif msg[0] == "cancel":
            with lock:
                g = gens.get(msg[1])
                if g is None and msg[1] in pending:
                    cancelled.add(msg[1])
            if g is not None:
                g.cancel()
        elif msg[0] == "close":
            break
    pool.shutdown(wait=True)
    sched.close()
    done.set()
    with cv:
        cv.notify()
