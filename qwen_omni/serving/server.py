"""`python -m qwen_omni serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batch scheduler.

Endpoints: `POST /v1/chat/completions` (JSON or SSE streaming, `data: [DONE]` last; spoken replies with
`modalities: ["text", "audio"]`, speech_api.py), `POST /v1/audio/speech`, `WS /v1/realtime` (realtime.py),
`GET /v1/models` (with the voices), `GET /health` (200 when ready, 503 while loading; with the scheduler's load).

Design
- The server answers at once and loads the model (or connects to the remote backend) in a background thread;
  until then chat requests get 503 with `Retry-After`. A failed load ends the process with status 1.
- Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for bad input (the message
  names the part, "messages[0].content[1]: ..."), 401 without the right bearer token (`--api-key`), 404 for an
  unknown model or route, 413 above `--max-body-mb` (checked on Content-Length and while reading), 429 when
  the scheduler's queue is full, 503 while loading.
- The endpoint parses in a worker thread (base64 and JSON of large bodies would otherwise stall the event loop),
  then `backend.start()` prepares and queues the request, and the first event is awaited before any header is
  sent: errors from preparation or prefill still get a real status, and `x-qwen-omni-cached-tokens` (prompt
  tokens reused from an earlier turn, also in `usage.prompt_tokens_details.cached_tokens`) is known.
- Stop strings are applied here, to the text (`StopText`), for both backends; the job is cancelled at a match.
  A client that disconnects cancels its job: the streaming generator's `finally`, or a watcher for plain
  requests.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`, imported lazily
# inside create_app so the CLI does not pay for FastAPI) at definition time.
import argparse
import asyncio
import hmac
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.reasoning import Splitter, split
from .backends import Job, LocalBackend, RemoteBackend, api_error, cancel_on_disconnect, stop_at_strings
from .openai_api import APIError, ChatRequest, MediaPolicy, chunk, completion, completion_id, \
    parse_chat_request, usage
from .process_backend import ProcessBackend
from .realtime import install_realtime
from .remote import RemoteAssistant, RemoteError
from .speech_api import TranscriptStore, voices_of
from .speech_http import chat_audio, local_speech, parse_speech_request, remote_speech, speech_response

log = logging.getLogger("qwen_omni.serving.server")
MB = 1 << 20


@dataclass
class ServeConfig:
    api_key: str | None = None
    max_body_bytes: int = 64 * MB
    served_model_name: str | None = None
    policy: MediaPolicy = field(default_factory=MediaPolicy)


class State:
    def __init__(self):
        self.backend = None
        self.error: str | None = None
        self.transcripts = TranscriptStore()  # audio id -> transcript of spoken replies (follow-up turns)


def create_app(cfg: ServeConfig, load_backend: Callable[[], Any], on_load_error: Callable[[str], None] | None = None):
    """The FastAPI app; `load_backend()` runs in a background thread at start-up."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    state = State()

    def loader():
        try:
            state.backend = load_backend()
            log.info("ready: %s (%s backend)", model_name(), state.backend.kind)
        except Exception as e:  # noqa: BLE001 - reported through /health and the exit status
            state.error = f"{type(e).__name__}: {e}"
            log.error("loading failed: %s", state.error)
            if on_load_error is not None:
                on_load_error(state.error)

    async def lifespan(app):
        threading.Thread(target=loader, daemon=True, name="qwen-omni-loader").start()
        yield
        if state.backend is not None:
            await asyncio.to_thread(state.backend.close)

    app = FastAPI(title="qwen-omni", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwen = state

    def model_name() -> str:
        return cfg.served_model_name or state.backend.name

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        headers = {"Retry-After": "5"} if e.status in (429, 503) else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    def ready():
        if state.backend is None:
            msg = f"the model failed to load: {state.error}" if state.error else \
                "the model is still loading; retry in a few seconds"
            raise APIError(503, msg, "service_unavailable", code="model_loading")
        return state.backend

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        too_big = APIError(413, f"the request body is larger than this server's limit of {limit / MB:g} MB; "
                                f"send smaller media", code="request_too_large")
        declared = request.headers.get("content-length") or "0"
        if not declared.isdigit():
            raise APIError(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        return bytes(body)

    @app.get("/health")
    async def health():
        if state.backend is None:
            return JSONResponse({"status": "failed" if state.error else "loading", "error": state.error},
                                status_code=503)
        return {"status": "ok", "model": model_name(), **state.backend.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        backend = ready()
        return {"object": "list", "data": [{"id": model_name(), "object": "model", "created": 0,
                                            "owned_by": "qwen-omni", "max_model_len": backend.context_window,
                                            "voices": backend_voices(backend)}]}

    def speaker(backend):
        """(assistant, exclusive lock) of a backend that can speak here, or a 400 saying why not."""
        if getattr(backend, "assistant", None) is None:
            raise APIError(400, "audio output is not available with --engine-process (spoken replies run in the "
                                "server process); start the server without it",
                           param="modalities", code="audio_output_unavailable")
        return backend.assistant, backend.scheduler.exclusive()

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        authorize(request)
        backend = ready()
        try:
            body = json.loads(await read_body(request))
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        sp = parse_speech_request(body)
        if sp["model"] and sp["model"] != model_name():
            raise APIError(404, f"the model '{sp['model']}' does not exist; this server serves '{model_name()}'",
                           "not_found_error", param="model", code="model_not_found")
        assistant, exclusive = speaker(backend)
        return await speech_response(sp, assistant, exclusive, api_error)

    install_realtime(app, cfg, state, model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        backend = ready()
        raw = await read_body(request)
        req = await asyncio.to_thread(parse, raw, cfg.policy)
        if req.model and req.model != model_name():
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name()}'",
                           "not_found_error", param="model", code="model_not_found")
        req.messages = state.transcripts.resolve(req.messages)  # assistant `audio: {id}` -> its transcript
        if req.audio is not None:
            if backend.kind == "openai":  # the upstream speaks; its audio is passed through
                start, count = remote_speech(req, backend.remote)
            else:
                start, count = local_speech(req, *speaker(backend), backend.defaults)
            return await chat_audio(req, start, count, state.transcripts, completion_id(), model_name(),
                                    lambda e: api_error(e, req), request)
        try:
            job = await backend.start(req)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            raise api_error(e, req) from None
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))  # also while it waits for a row
        try:
            first = await job.next()  # errors before the first token still get a status code
        except BaseException as e:
            watcher.cancel()
            job.cancel()
            if isinstance(e, Exception):
                raise api_error(e, req) from None
            raise
        cid, name = completion_id(), model_name()
        headers = {"x-qwen-omni-cached-tokens": str(job.cached_tokens or 0)}
        if req.stream:  # from here the streaming response notices a disconnect itself
            watcher.cancel()
            return StreamingResponse(sse(job, req, cid, name, first, backend.reasoning),
                                     media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, finish, thought = await collect(job, req, first, backend.reasoning)
        except Exception as e:  # noqa: BLE001
            raise api_error(e, req) from None
        finally:
            watcher.cancel()
            job.cancel()
        return JSONResponse(completion(cid, name, text, finish, job_usage(job), thought), headers=headers)

    return app


def parse(raw: bytes, policy: MediaPolicy) -> ChatRequest:
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    return parse_chat_request(body, policy)


def backend_voices(backend) -> list[str]:
    if getattr(backend, "assistant", None) is not None:
        return voices_of(backend.assistant)
    return list(getattr(getattr(backend, "remote", None), "voices", []))


def job_usage(job: Job) -> dict:
    return usage(job.prompt_tokens, job.completion_tokens, job.cached_tokens or 0)


async def pieces(job: Job, req: ChatRequest, first: list[str]):
    """Text pieces with stop strings applied; sets job.finish_reason to "stop" at a stop string."""
    async for _, text in stop_at_strings(job, req.stop, first):
        yield text


async def collect(job: Job, req: ChatRequest, first: list[str], reasoning_mode: bool | None = None
                  ) -> tuple[str, str, str | None]:
    """(answer, finish reason, reasoning or None when the model does not reason)."""
    thought, answer = split("".join([p async for p in pieces(job, req, first)]), reasoning_mode)
    return answer, finish_reason(job), thought if reasoning_mode is not None else None


def finish_reason(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse(job: Job, req: ChatRequest, cid: str, model: str, first: list[str],
              reasoning_mode: bool | None = None):
    splitter = Splitter(reasoning_mode)  # a thinking model's <think> part goes out as reasoning_content deltas
    try:
        yield sse_line(chunk(cid, model, {"role": "assistant", "content": ""}))
        try:
            async for text in pieces(job, req, first):
                for key, part in splitter.push(text):
                    yield sse_line(chunk(cid, model, {key: part}))
            for key, part in splitter.flush():
                yield sse_line(chunk(cid, model, {key: part}))
            yield sse_line(chunk(cid, model, {}, finish_reason(job)))
            if req.include_usage:
                yield sse_line(chunk(cid, model, None, use=job_usage(job)))
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            yield sse_line(api_error(e, req).body())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client left (the generator was cancelled) or we are done: free the slot


# ------------------------------------------------------------------------------------------------------ CLI

def backend_loader(args) -> Callable[[], Any]:
    if args.backend == "openai":
        def load_remote():
            remote = RemoteAssistant(args.base_url, api_key=args.remote_api_key, model=args.remote_model)
            for attempt in range(1 << 30):  # the upstream may still be starting: keep answering 503 meanwhile
                try:
                    remote.connect()
                    break
                except RemoteError as e:
                    if e.status in (401, 403) or "does not serve" in str(e):
                        raise
                    if attempt % 10 == 0:
                        log.warning("waiting for the upstream server: %s", e)
                    threading.Event().wait(min(2.0, 0.2 * (attempt + 1)))
            return RemoteBackend(remote, args.max_batch, args.max_queue)
        return load_remote

    def load_local():
        import torch

        from ..assistant import load

        if args.engine_process:
            return ProcessBackend(args.model, dict(device=args.device, dtype=args.dtype, quantize=args.quantize),
                                 (args.max_batch, args.max_queue, args.max_model_len, args.prefix_cache_size),
                                 threads=args.threads, log_level=args.log_level)
        if args.threads:
            torch.set_num_threads(args.threads)
        assistant = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
        assistant.speech.max_audio_seconds = getattr(args, "max_audio_seconds", None)
        return LocalBackend(assistant, args.max_batch, args.max_queue, args.max_model_len, args.prefix_cache_size)
    return load_local


def config_from_args(args) -> ServeConfig:
    return ServeConfig(api_key=args.api_key or None, max_body_bytes=int(args.max_body_mb * MB),
                       served_model_name=args.served_model_name,
                       policy=MediaPolicy(allow_remote=args.allow_remote_media, media_dir=args.media_dir,
                                          max_remote_bytes=int(args.max_body_mb * MB)))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.backend == "openai" and not args.base_url:
        raise SystemExit("error: --backend openai needs --base-url (e.g. http://127.0.0.1:8001/v1)")
    for name in ("max_batch", "max_queue", "max_model_len"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} is too small")
    if args.media_dir is not None and not args.media_dir.is_dir():
        raise SystemExit(f"error: --media-dir {args.media_dir} is not a folder")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_code = 0
    server: uvicorn.Server | None = None

    def failed(_msg: str) -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(config_from_args(args), backend_loader(args), on_load_error=failed)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    return exit_code


def serve_in_thread(app, host: str = "127.0.0.1", ready_timeout: float = 120.0) -> tuple[str, Callable[[], None]]:
    """Run `app` with uvicorn on a free port in a daemon thread (tests, benchmarks, embedding).

    Returns (base URL without /v1, stop function). Waits until /health answers (any status). The socket is bound
    here, so the port is known without a race.
    """
    import socket
    import time

    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="qwen-omni-uvicorn")
    thread.start()
    url = f"http://{host}:{sock.getsockname()[1]}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()
    return url, stop
