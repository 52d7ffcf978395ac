"""Spoken replies through the HTTP API: chat completions with `modalities: ["text", "audio"]` and `/v1/audio/speech`.

Design
- The batch scheduler batches text only. A spoken reply runs per request, on a worker thread, through
  `Assistant.chat(speech=True, stream=True)` while holding `scheduler.exclusive()`: the talker's recorder hooks the
  thinker's modules, and would record any other forward pass, so batched text rows pause between two decode steps
  while a reply is spoken and go on afterwards. The text and audio still stream: the thread posts every text piece
  and every audio chunk (float32, 24 kHz) to the event loop as the assistant yields them.
- `SpeechJob` is what the event loop reads: `await next()` returns the (kind, value) events available now,
  ("text", str) or ("audio", ndarray); an error raises; `done` once finished. `cancel()` makes the worker close the
  assistant's generator at its next piece (which releases the model lock and the hooks).
- `TranscriptStore` keeps audio id -> transcript, bounded (oldest out first) and until `expires_at`; a later turn
  that sends `{"role": "assistant", "audio": {"id": ...}}` gets that transcript as the message's content. An
  unknown or expired id is a 400.
- Usage: audio tokens are counted as OpenAI counts audio output, per token of the audio codec: the talker's codec
  frames (Qwen3-Omni 12.5 per second, Qwen2.5-Omni 50), and for the offline voice 12.5 per second of audio.
- `/v1/audio/speech` (text in, audio out) uses the checkpoint's talker where there is one: the thinker is made to
  read the given text (`forced_run`: the prompt is prefilled, then the text's tokens are fed one by one instead of
  sampled, with the talker's recorder watching), so the talker speaks exactly that text. Otherwise the offline voice
  reads it. Streamed when the request says `stream_format: "audio"` or `stream: true`: the encoded file's bytes
  are sent as they are produced.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch

from ..engine.tokenizer import StreamDecoder
from ..errors import InputError
from ..speech import offline_voice
from .audio_out import FORMATS, MIME, StreamEncoder, canonical, encode, pcm16
from .openai_api import APIError, ChatRequest, StopText, chunk, completion, usage

OFFLINE_AUDIO_TOKENS_PER_SECOND = 12.5
AUDIO_TTL_S = 3600


class TranscriptStore:
    """audio id -> transcript, at most `capacity` entries, each until its `expires_at`."""

    def __init__(self, capacity: int = 1024, ttl: float = AUDIO_TTL_S):
        self.capacity, self.ttl = capacity, ttl
        self._items: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def new_id(self) -> tuple[str, int]:
        return f"audio_{uuid.uuid4().hex[:24]}", int(time.time() + self.ttl)

    def put(self, audio_id: str, transcript: str, expires_at: int) -> None:
        with self._lock:
            self._items[audio_id] = (transcript, expires_at)
            self._items.move_to_end(audio_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, audio_id: str) -> str | None:
        with self._lock:
            item = self._items.get(audio_id)
            if item is None:
                return None
            if item[1] < time.time():
                del self._items[audio_id]
                return None
            return item[0]

    def __len__(self) -> int:
        return len(self._items)

    def resolve(self, messages: list[dict]) -> list[dict]:
        """Messages with every assistant `audio_id` replaced by its transcript (400 for an unknown id)."""
        out = []
        for i, m in enumerate(messages):
            if "audio_id" in m:
                text = self.get(m["audio_id"])
                if text is None:
                    raise APIError(400, f"messages[{i}].audio: the audio id {m['audio_id']!r} is unknown or has "
                                        f"expired; send the reply's text as content instead",
                                   param=f"messages[{i}].audio", code="audio_not_found")
                m = {"role": m["role"], "content": (m["content"] + text) if m["content"] else text}
            out.append(m)
        return out


def voices_of(assistant) -> list[str]:
    """The voices a spoken reply may use; [] when speech is off or the offline voice has no espeak-ng."""
    speech = assistant.speech
    if speech.family is None and not offline_voice.available():
        return []
    return list(speech.voices)


def check_voice(assistant, voice: str | None) -> str:
    """The canonical voice name, or a 400 listing the voices (or saying that this model cannot speak)."""
    voices = voices_of(assistant)
    if not voices:
        why = ("it was loaded with speech off" if assistant.speech.mode is False else
               "it has no talker and the offline voice (espeak-ng) is not installed")
        raise APIError(400, f"audio output is not available for this model: {why}", param="modalities",
                       code="audio_output_unavailable")
    if voice is None or voice == "default":
        return voices[0]
    match = [v for v in voices if v.lower() == voice.lower()]
    if not match:
        raise APIError(400, f"unknown voice {voice!r}; this model's voices are {', '.join(voices)}",
                       param="audio.voice", code="unknown_voice")
    return match[0]


def audio_tokens(assistant, seconds: float) -> int:
    pipeline = assistant.speech.pipeline
    rate = pipeline.steps_per_second if pipeline is not None and assistant.speech.family else \
        OFFLINE_AUDIO_TOKENS_PER_SECOND
    return int(round(seconds * rate))


class SpeechJob:
    """One spoken reply as the event loop sees it (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self._q = loop, asyncio.Queue()
        self.done = self.cancelled = False
        self.finish_reason: str | None = None
        self.stats: dict = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.cached_tokens = 0
        self.audio_seconds = 0.0

    def post(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone
            self.cancelled = True

    async def next(self) -> list[tuple[str, Any]]:
        events = [await self._q.get()]
        while not self._q.empty():
            events.append(self._q.get_nowait())
        out = []
        for kind, value in events:
            if kind == "error":
                self.done = True
                raise value
            if kind == "end":
                self.done, self.finish_reason = True, value
            else:
                out.append((kind, value))
        return out

    def cancel(self) -> None:
        self.cancelled = True


def run_spoken(job: SpeechJob, make_parts, exclusive) -> None:
    """Worker thread: iterate `make_parts()` (text pieces and audio chunks) under `exclusive`, posting each."""
    try:
        with exclusive:
            parts = make_parts()
            try:
                for part in parts:
                    if job.cancelled:
                        break
                    if isinstance(part, str):
                        job.post("text", part)
                    else:
                        job.audio_seconds += part.size / 24000
                        job.post("audio", part)
            finally:
                parts.close()
        s = job.stats
        job.prompt_tokens = s.get("prompt_tokens") or 0
        job.completion_tokens = s.get("completion_tokens") or 0
        job.cached_tokens = s.get("reused_tokens") or 0
        max_new = s.get("max_new_tokens")
        reason = s.get("finish_reason") or ("length" if max_new and job.completion_tokens >= max_new else "stop")
        job.post("end", reason)
    except Exception as e:  # noqa: BLE001 - handed to the request
        job.post("error", e)


def start_chat_speech(assistant, exclusive, messages: list[dict], voice: str, sampling: dict,
                      max_new_tokens: int | None, options: dict) -> SpeechJob:
    """Start a spoken chat reply on a worker thread; returns its job at once."""
    job = SpeechJob(asyncio.get_running_loop())
    budget = max_new_tokens or 512
    job.stats["max_new_tokens"] = budget

    def make_parts():
        return assistant.chat(messages, speech=True, voice=voice, stream=True, stats=job.stats,
                              max_new_tokens=budget, **sampling, **options)
    threading.Thread(target=run_spoken, args=(job, make_parts, exclusive), daemon=True,
                     name="qwen-omni-speech").start()
    return job


def start_tts(assistant, exclusive, text: str, voice: str) -> SpeechJob:
    """Start speaking `text` (the talker where there is one, else the offline voice); returns its job at once."""
    job = SpeechJob(asyncio.get_running_loop())

    def make_parts():
        return assistant.speech.reply(forced_run(assistant, text), [{"role": "user", "content": text}], voice,
                                      job.stats, time.perf_counter(), seed=0)
    threading.Thread(target=run_spoken, args=(job, make_parts, exclusive), daemon=True,
                     name="qwen-omni-tts").start()
    return job


def forced_run(assistant, text: str):
    """A `Run` for the speech pipeline that makes the thinker read `text` instead of sampling a reply.

    With a talker's recorder (`tap`), the prompt is prefilled and the text's tokens are fed one by one, so the
    recorder sees exactly what it sees in a generated reply. Without one (the offline voice) no model runs: the
    text is handed over word by word."""
    ids = assistant.tokenizer.encode(text) if text else []

    def run(messages: list[dict], tap) -> Iterator[str]:
        if tap is None:
            return iter([text])
        return _forced(assistant, messages, ids, tap)
    return run


@torch.inference_mode()
def _forced(assistant, messages: list[dict], ids: list[int], tap) -> Iterator[str]:
    inputs = assistant.prepare(messages)
    n = inputs["input_ids"].shape[1]
    if n + len(ids) + 1 > assistant.context_window:
        raise InputError(f"the text is too long to speak in one request ({len(ids)} tokens)")
    model = assistant.model
    with assistant.lock:
        cache = model.new_cache(1, n + len(ids) + 1)
        tap.begin(inputs, None, 0)
        try:
            model.prefill(inputs, cache, start=0)
            decoder = StreamDecoder(assistant.tokenizer)
            for t in ids:
                model.decode_step(torch.tensor([t], dtype=torch.long, device=assistant.device), cache)
                if piece := decoder.push(t):
                    yield piece
            if tail := decoder.flush():
                yield tail
        finally:
            tap.end(0)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


# ------------------------------------------------------------------------------------------------ HTTP handlers

def sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def local_speech(req: ChatRequest, assistant, exclusive, defaults: dict):
    """(start, count_audio) for `chat_audio` with the local model (the voice is checked now: 400 if unknown)."""
    voice = check_voice(assistant, req.audio["voice"])
    options = {}
    if assistant.processor is not None and req.use_audio_in_video is not None:
        options["use_audio_in_video"] = req.use_audio_in_video
    sampling = req.sampling(defaults)
    sampling["repetition_penalty"] = req.repetition_penalty

    def start() -> SpeechJob:
        return start_chat_speech(assistant, exclusive, req.messages, voice, sampling, req.max_tokens, options)
    return start, lambda job: audio_tokens(assistant, job.audio_seconds)


def remote_speech(req: ChatRequest, remote):
    """(start, count_audio) for `chat_audio` through a `RemoteAssistant`: the upstream's audio passed through."""
    def start() -> SpeechJob:
        job = SpeechJob(asyncio.get_running_loop())

        def make_parts():
            s = req.sampling()
            return remote.chat(req.messages, stream=True, stats=job.stats, speech=True, voice=req.audio["voice"],
                               max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                               top_k=s["top_k"], repetition_penalty=s["repetition_penalty"], seed=req.seed,
                               ignore_eos=req.ignore_eos, use_audio_in_video=req.use_audio_in_video)
        threading.Thread(target=run_spoken, args=(job, make_parts, contextlib.nullcontext()), daemon=True,
                         name="qwen-omni-remote-speech").start()
        return job

    def count(job: SpeechJob) -> int:
        n = job.stats.get("audio_tokens")
        return int(n) if n is not None else int(round(job.audio_seconds * OFFLINE_AUDIO_TOKENS_PER_SECOND))
    return start, count


async def chat_audio(req: ChatRequest, start, count_audio, store: TranscriptStore, cid: str, model: str, on_error):
    """The response to a chat completion that asked for audio (JSON, or SSE with interleaved audio deltas).

    start() -> SpeechJob begins the reply; count_audio(job) -> its audio tokens (see local_speech, remote_speech)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    job = start()
    audio_id, expires_at = store.new_id()
    try:
        first = await job.next()  # errors before the first piece (bad media, context overflow) get a status
    except Exception as e:  # noqa: BLE001
        job.cancel()
        raise on_error(e) from None

    async def events():
        stopper, batch = StopText(req.stop), first
        while True:
            for kind, value in batch:
                if kind == "audio":
                    yield kind, value
                    continue
                text = stopper.push(value)
                if text:
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

    def use() -> dict:
        return usage(job.prompt_tokens, job.completion_tokens, job.cached_tokens, audio_tokens=count_audio(job))

    def finish() -> str:
        return "length" if job.finish_reason == "length" else "stop"

    headers = {"x-qwen-omni-cached-tokens": "0"}
    if not req.stream:
        texts, chunks = [], []
        try:
            async for kind, value in events():
                (texts if kind == "text" else chunks).append(value)
        except Exception as e:  # noqa: BLE001
            raise on_error(e) from None
        finally:
            job.cancel()
        transcript = "".join(texts)
        store.put(audio_id, transcript, expires_at)
        data = await asyncio.to_thread(encode, concat(chunks), req.audio["format"])
        audio = {"id": audio_id, "data": b64(data), "expires_at": expires_at, "transcript": transcript}
        headers["x-qwen-omni-cached-tokens"] = str(job.cached_tokens)
        return JSONResponse(completion(cid, model, transcript, finish(), use(), audio=audio), headers=headers)

    async def sse():
        texts = []
        try:
            yield sse_line(chunk(cid, model, {"role": "assistant", "content": ""}))
            try:
                async for kind, value in events():
                    if kind == "text":
                        texts.append(value)
                        yield sse_line(chunk(cid, model, {"content": value}))
                    else:
                        yield sse_line(chunk(cid, model, {"audio": {"id": audio_id, "data": b64(pcm16(value)),
                                                                    "expires_at": expires_at}}))
                transcript = "".join(texts)
                store.put(audio_id, transcript, expires_at)
                yield sse_line(chunk(cid, model, {"audio": {"id": audio_id, "transcript": transcript,
                                                            "expires_at": expires_at}}))
                yield sse_line(chunk(cid, model, {}, finish()))
                if req.include_usage:
                    yield sse_line(chunk(cid, model, None, use=use()))
            except Exception as e:  # noqa: BLE001 - headers are sent: in-band, as OpenAI does
                yield sse_line(on_error(e).body())
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def parse_speech_request(body: Any) -> dict:
    """`/v1/audio/speech` body -> {"model", "input", "voice", "format", "stream"} (400 for bad fields)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise APIError(400, "'input' must be a non-empty string (the text to speak)", param="input")
    if len(text) > 4096:
        raise APIError(400, f"'input' is {len(text)} characters; the limit is 4096", param="input")
    fmt = body.get("response_format", "mp3")
    if not isinstance(fmt, str) or canonical(fmt) is None:
        raise APIError(400, f"unsupported response_format {fmt!r}; use one of {', '.join(FORMATS)} (or pcm)",
                       param="response_format", code="unsupported_audio_format")
    voice = body.get("voice")
    if isinstance(voice, dict):  # the newer client's {"id": ...} form
        voice = voice.get("id")
    if voice is not None and not isinstance(voice, str):
        raise APIError(400, "'voice' must be a string", param="voice")
    stream = body.get("stream_format") == "audio" or bool(body.get("stream"))
    return {"model": body.get("model"), "input": text, "voice": voice, "format": canonical(fmt), "stream": stream}


async def speech_response(sp: dict, assistant, exclusive, on_error):
    """The audio file of `/v1/audio/speech`, whole or streamed as it is encoded."""
    from fastapi.responses import Response, StreamingResponse

    voice = check_voice(assistant, sp["voice"])
    job = start_tts(assistant, exclusive, sp["input"], voice)
    enc = StreamEncoder(sp["format"], whole=not sp["stream"])
    try:
        first = await job.next()
    except Exception as e:  # noqa: BLE001
        job.cancel()
        raise on_error(e) from None
    media = MIME[sp["format"]]

    async def audio_bytes():
        batch = first
        while True:
            for kind, value in batch:
                if kind == "audio" and (b := enc.push(value)):
                    yield b
            if job.done:
                break
            batch = await job.next()
        if b := enc.close():
            yield b

    if not sp["stream"]:
        try:
            data = b"".join([b async for b in audio_bytes()])
        except Exception as e:  # noqa: BLE001
            raise on_error(e) from None
        finally:
            job.cancel()
        return Response(data, media_type=media)

    async def stream():
        try:
            async for b in audio_bytes():
                yield b
        finally:
            job.cancel()
    return StreamingResponse(stream(), media_type=media)
