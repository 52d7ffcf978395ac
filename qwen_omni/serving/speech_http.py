"""The HTTP side of spoken replies: chat completions with audio (JSON or SSE) and `POST /v1/audio/speech`.

Design
- `chat_audio(req, start, count_audio, ...)` answers a chat completion that asked for audio. `start()` begins the
  reply and returns a `speech_api.SpeechJob`: `local_speech` runs the local model (the voice is checked first, so
  a bad one is a 400 before anything runs), `remote_speech` asks the `--backend openai` upstream for audio and
  passes its chunks through. The first events are awaited before any header is sent, so errors of preparation
  still get a real status; afterwards they are sent in-band as OpenAI does.
- Non-streaming: the text and the whole audio, encoded in the requested format, in `message.audio` (id, data,
  expires_at, transcript); the id goes into the transcript store for follow-up turns. Streaming: text in
  `delta.content`, audio as base64 pcm16 in `delta.audio.data`, each sent as soon as it exists; a last audio
  delta carries the id and the whole transcript.
- `/v1/audio/speech`: `parse_speech_request` checks the body (input, voice, response_format, streaming), and
  `speech_response` returns the file whole or streams it as `audio_out.StreamEncoder` produces it.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from typing import Any

import numpy as np

from .audio_out import FORMATS, MIME, StreamEncoder, canonical, encode, pcm16
from .backends import cancel_on_disconnect, stop_at_strings
from .openai_api import APIError, ChatRequest, chunk, completion, usage
from .speech_api import OFFLINE_AUDIO_TOKENS_PER_SECOND, SpeechJob, TranscriptStore, audio_tokens, check_voice, \
    run_spoken, start_chat_speech, start_tts


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


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


async def chat_audio(req: ChatRequest, start, count_audio, store: TranscriptStore, cid: str, model: str, on_error,
                     request=None):
    """The response to a chat completion that asked for audio (JSON, or SSE with interleaved audio deltas).

    start() -> SpeechJob begins the reply; count_audio(job) -> its audio tokens (see local_speech, remote_speech).
    `request`: the HTTP request, watched while a non-streaming reply is made (a client that leaves cancels it)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    job = start()
    audio_id, expires_at = store.new_id()
    try:
        first = await job.next()  # errors before the first piece (bad media, context overflow) get a status
    except Exception as e:  # noqa: BLE001
        job.cancel()
        raise on_error(e) from None

    def events():
        return stop_at_strings(job, req.stop, first)

    def use() -> dict:
        return usage(job.prompt_tokens, job.completion_tokens, job.cached_tokens, audio_tokens=count_audio(job))

    def finish() -> str:
        return "length" if job.finish_reason == "length" else "stop"

    headers = {"x-qwen-omni-cached-tokens": "0"}
    if not req.stream:
        texts, chunks = [], []
        watcher = asyncio.create_task(cancel_on_disconnect(request, job)) if request is not None else None
        try:
            async for kind, value in events():
                (texts if kind == "text" else chunks).append(value)
        except Exception as e:  # noqa: BLE001
            raise on_error(e) from None
        finally:
            job.cancel()
            if watcher is not None:
                watcher.cancel()
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
