"""Spoken replies for the server: who may speak, the per-request speech job, the transcript store, forced reading.

The HTTP handlers built on this are in speech_http.py; the realtime endpoint (realtime.py) uses the jobs too.

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
  reads it.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Iterator

import torch

from ..engine.tokenizer import StreamDecoder
from ..errors import InputError
from ..speech import offline_voice
from .openai_api import APIError

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
        # a talker stops at its end-of-speech code; bound the audio to a generous reading time of the text anyway
        # (1 s + 0.25 s per character, about 3.5x a normal pace), within the server's own cap. This runs under
        # `exclusive`, so the temporary cap concerns this reply only.
        speech = assistant.speech
        cap = 1.0 + 0.25 * len(text)
        old = speech.max_audio_seconds
        speech.max_audio_seconds = cap if old is None else min(old, cap)
        try:
            yield from speech.reply(forced_run(assistant, text), [{"role": "user", "content": text}], voice,
                                    job.stats, time.perf_counter(), seed=0)
        finally:
            speech.max_audio_seconds = old
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
