"""Offline voice: speak any model's text reply with espeak-ng, sentence by sentence, as the text streams.

Models without a Talker (the embedded model, plain text LMs) answer in speech through this engine. It needs no
weights and no network: the `espeak-ng` program (Debian package `espeak-ng`; Spaces installs it from
`packages.txt`). Audio is float32 mono at 24 kHz, the rate of the Omni talkers, so callers handle one format.

Streaming: `SentenceSpeaker.push(piece)` collects text until a sentence ends (., !, ?, ;, : or a newline after
some words), synthesises that sentence and returns its audio; the first audio is therefore ready after the
first sentence, not after the whole reply.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from encoders.media import resample

from ..engine import reasoning
from ..errors import InputError

SAMPLE_RATE = 24000
VOICES = {"default": "en-us", "female": "en-us+f3", "male": "en-us+m3", "british": "en-gb", "scottish": "en-gb-scotland"}
SENTENCE_END = re.compile(r"[.!?;:\n](\s|$)")


@lru_cache(maxsize=1)
def espeak_binary() -> str | None:
    return shutil.which("espeak-ng") or shutil.which("espeak")


def available() -> bool:
    return espeak_binary() is not None


def synthesize(text: str, voice: str = "default", speed: int = 165) -> np.ndarray:
    """Text -> float32 mono audio at 24 kHz (empty array for text without anything to say)."""
    binary = espeak_binary()
    if binary is None:
        raise InputError("spoken replies need espeak-ng: install it (apt-get install espeak-ng) or turn speech off")
    text = text.strip()
    if not any(ch.isalnum() for ch in text):
        return np.zeros(0, np.float32)
    name = VOICES.get(voice, voice)
    # "--" ends the options, so a reply starting with "-" is read as text, never as a flag.
    r = subprocess.run([binary, "-v", name, "-s", str(speed), "--stdout", "--", text], capture_output=True,
                       timeout=60)
    if r.returncode != 0 or not r.stdout:
        raise InputError(f"espeak-ng could not speak with voice {name!r}: {r.stderr.decode(errors='replace')[:200]}")
    with wave.open(io.BytesIO(r.stdout)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """float32 mono in [-1, 1] -> a 16-bit PCM WAV file in memory (e.g. one streamed chunk for a browser player;
    Gradio peak-normalises numpy chunks one by one, which would change the loudness from chunk to chunk)."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def join_wav(chunks: list[bytes]) -> bytes:
    """Several `wav_bytes` chunks (same format) as one WAV file."""
    frames, rate = [], SAMPLE_RATE
    for c in chunks:
        with wave.open(io.BytesIO(c)) as w:
            rate = w.getframerate()
            frames.append(w.readframes(w.getnframes()))
    return wav_bytes(np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float32) / 32767, rate)


class SentenceSpeaker:
    """Accumulates streamed text and returns audio for each completed sentence."""

    def __init__(self, voice: str = "default", speed: int = 165):
        self.voice, self.speed = voice, speed
        self.pending = ""

    def push(self, piece: str) -> list[np.ndarray]:
        self.pending += piece
        out = []
        while True:
            m = SENTENCE_END.search(self.pending)
            if m is None:
                return out
            sentence, self.pending = self.pending[:m.end()], self.pending[m.end():]
            audio = synthesize(sentence, self.voice, self.speed)
            if audio.size:
                out.append(audio)

    def flush(self) -> list[np.ndarray]:
        sentence, self.pending = self.pending, ""
        audio = synthesize(sentence, self.voice, self.speed)
        return [audio] if audio.size else []


def speak(pieces: Iterator[str], voice: str, stats: dict, start: float,
          reasoning_mode: bool | None = None) -> Iterator[str | np.ndarray]:
    """Interleave the offline voice's audio (one chunk per finished sentence) into a text stream. A thinking
    model's reasoning is shown but not spoken: only the answer part reaches the voice."""
    speaker, answer = SentenceSpeaker(voice), reasoning.Splitter(reasoning_mode)
    synth_time, audio_seconds = 0.0, 0.0

    def timed(make):
        nonlocal synth_time, audio_seconds
        t = time.perf_counter()
        chunks = make()
        synth_time += time.perf_counter() - t
        for a in chunks:
            stats.setdefault("time_to_first_audio", time.perf_counter() - start)
            audio_seconds += a.size / SAMPLE_RATE
        stats.update(audio_seconds=audio_seconds, real_time_factor=synth_time / audio_seconds if audio_seconds else None)
        return chunks

    for piece in pieces:
        yield piece
        said = "".join(t for kind, t in answer.push(piece) if kind == "content")
        if said:
            yield from timed(lambda: speaker.push(said))
    said = "".join(t for kind, t in answer.flush() if kind == "content")
    if said:
        yield from timed(lambda: speaker.push(said))
    yield from timed(speaker.flush)
