"""Talk mode: a hands-free voice conversation, without gradio (app.py wires it to a streaming microphone).

Design
- One `TalkSession` per browser tab. The microphone streams short chunks into `hear()`; a silero-vad `Endpointer`
  (speech/vad.py) turns them into "speech_started" / "speech_stopped". No click ends a turn: when an utterance
  ends, it is written to a WAV file (16 kHz) and, with the latest webcam frame if the camera rides along (`see()`),
  becomes a pending `Turn`. `hear()` says so ("turn"), and app.py starts `answer()` for it in the model's queue.
- States: "listening" (nobody speaking), "hearing" (the user is speaking), "thinking" (a turn is being answered,
  no audio yet), "speaking" (reply audio has been sent and is presumably still playing). The server cannot see
  the browser's player, so "speaking" lasts until first audio + the audio's length + `PLAYBACK_SLACK`.
- Barge-in: speech that starts while thinking or speaking cancels the running reply. `answer()` checks a
  generation counter between pieces, so it stops at its next piece and closes the library stream (the model is
  free at once); `hear()` returns "barge_in" so app.py can pause the player in the browser. An interrupted reply
  keeps its text and audio so far, marked interrupted; an interrupted user turn without any reply merges with the
  next utterance (consecutive user messages are one turn in `session.history_to_messages`).
- History: each voice turn is a user message with the utterance as an audio file (plus the frame as an image);
  each spoken reply is its text, then its whole audio as a playable WAV message, then its stats. The whole
  conversation is re-sent each turn, so the library's prefix cache reuses the earlier turns' KV state.
- Latency: the end of speech is placed where the endpointer's trailing silence began, on the server's clock,
  from how much audio has arrived by the time the chunk that completed the silence was processed. The stats of
  a voice turn show end of speech -> first audio (as sent by the server) and the real-time factor.
- Thread safety: `hear()` runs in the microphone's event and `answer()` in a model worker, at the same time; a
  lock guards the shared fields.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from ..errors import QwenOmniError
from ..speech.offline_voice import SAMPLE_RATE, wav_bytes
from ..speech.vad import RATE as VAD_RATE
from ..speech.vad import Endpointer
from .session import GENERIC_ERROR, audio_message, Sampling, error_message, history_to_messages, stats_line

log = logging.getLogger("qwen_omni.app")

PLAYBACK_SLACK = 3.0  # s the browser's player may lag behind the server's first audio chunk (HLS segments, a busy CPU)
STATES = ("listening", "hearing", "thinking", "speaking")
INTERRUPTED = "interrupted"


@dataclass
class Turn:
    """An utterance waiting for (or getting) its reply."""
    id: int
    audio: str  # WAV file of the utterance
    frame: str | None  # PNG of the webcam at the end of the utterance
    end_of_speech: float  # clock time the user stopped speaking (estimated, see the module docstring)
    files: list[str] = field(default_factory=list)


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """Gradio's microphone chunk (int16, (n,) or (n, channels)) -> float32 mono in [-1, 1]."""
    a = np.asarray(samples)
    if a.ndim == 2:
        a = a.mean(axis=1)
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float32) / 32768.0).reshape(-1)
    return a.astype(np.float32).reshape(-1)


class TalkSession:
    def __init__(self, endpointer: Endpointer, folder: Path, clock: Callable[[], float] = time.monotonic):
        self.vad, self.folder, self.clock = endpointer, Path(folder), clock
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._heard = 0.0  # seconds of audio pushed into the endpointer
        self._pending: Turn | None = None  # detected, not yet taken by answer()
        self._answering: int | None = None  # id of the turn being answered
        self._generation = 0  # bumped by barge-in / stop: a running answer() with an older value stops
        self._speaking_until = 0.0
        self._first_audio_at: float | None = None
        self._frame: np.ndarray | None = None
        self._cut_playback = False
        self.barge_ins = 0
        self.turns_detected = 0

    # ---------------------------------------------------------------- what the browser sends
    def hear(self, rate: int, samples: np.ndarray) -> list[str]:
        """Push one microphone chunk; returns the actions it caused: "barge_in" and/or "turn"."""
        audio = to_mono_float(samples)
        events = self.vad.push(audio, rate)
        now = self.clock()
        with self._lock:
            self._heard += audio.size / rate
            actions = []
            for ev in events:
                if ev.kind == "speech_started" and self._busy(now):
                    self._cut_playback = self._answering is None  # all generated, but not all heard
                    self._generation += 1
                    self.barge_ins += 1
                    self._speaking_until = 0.0
                    actions.append("barge_in")
                elif ev.kind == "speech_stopped":
                    utterance = self.vad.take_utterance()
                    if utterance is None or utterance.size == 0:
                        continue
                    # the speech ended `silence_ms` before the event's window; the event's window ended
                    # (heard - at) seconds of audio before this chunk was processed
                    ended = now - (self._heard - ev.at) - self.vad.silence_ms / 1000
                    self._pending = self._make_turn(utterance, ended)
                    self.turns_detected += 1
                    actions.append("turn")
            return actions

    def see(self, frame: np.ndarray | None) -> None:
        """Keep the webcam's latest frame (RGB array); the end of the next utterance takes it along."""
        if frame is not None:
            with self._lock:
                self._frame = np.asarray(frame)

    def _make_turn(self, utterance: np.ndarray, ended: float) -> Turn:
        tid = next(self._ids)
        stem = f"{uuid.uuid4().hex[:8]}-{tid}"
        audio = self.folder / f"you-{stem}.wav"
        audio.write_bytes(wav_bytes(utterance, VAD_RATE))
        frame = None
        if self._frame is not None:
            frame = str(self.folder / f"cam-{stem}.png")
            Image.fromarray(self._frame.astype(np.uint8)).save(frame)
            self._frame = None
        return Turn(tid, str(audio), frame, ended)

    # ---------------------------------------------------------------- state
    def _busy(self, now: float) -> bool:
        return self._answering is not None or now < self._speaking_until

    @property
    def state(self) -> str:
        now = self.clock()
        with self._lock:
            if self.vad.speaking:
                return "hearing"
            if self._answering is not None and self._first_audio_at is None:
                return "thinking"
            if self._answering is not None or now < self._speaking_until:
                return "speaking"
            return "listening"

    def take_turn(self) -> Turn | None:
        with self._lock:
            turn, self._pending = self._pending, None
            return turn

    def stop(self) -> None:
        """Cancel the running reply (the Stop button) and forget a half-heard utterance."""
        with self._lock:
            self._generation += 1
            self._speaking_until = 0.0
            self._pending = None
        self.vad.reset()

    # ---------------------------------------------------------------- answering
    def answer(self, assistant, history: list[dict], system_prompt: str, sampling: Sampling,
               max_new_tokens: int = 1024) -> Iterator[tuple[list[dict], bytes | None]]:
        """Answer the pending turn in speech: (history, WAV chunk or None) after every change. Nothing when no turn
        is pending (an event fired twice)."""
        turn = self.take_turn()
        if turn is None:
            return
        with self._lock:
            generation = self._generation
            self._answering, self._first_audio_at = turn.id, None
            cut, self._cut_playback = self._cut_playback, False
        if cut:
            history = mark_interrupted(history)
        user = {"role": "user", "content": [{"path": turn.audio}, *([{"path": turn.frame}] if turn.frame else [])]}
        history = [*history, user]
        stats: dict = {}
        text, chunks, stream, interrupted = "", [], None, False
        yield history, None
        try:
            speech = {"speech": True, "voice": sampling.voice or "default"} if sampling.speak else {}
            seed = None if sampling.seed is None or sampling.seed < 0 else int(sampling.seed)
            stream = assistant.chat(
                history_to_messages(history, system_prompt), stream=True, stats=stats, seed=seed,
                max_new_tokens=max(1, min(int(sampling.max_new_tokens), max_new_tokens)),
                temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=int(sampling.top_k),
                **speech)
            for piece in stream:
                if self._generation != generation:
                    interrupted = True
                    break
                if isinstance(piece, str):
                    text += piece
                    yield [*history, {"role": "assistant", "content": text}], None
                elif piece.size:
                    now = self.clock()
                    with self._lock:
                        if self._first_audio_at is None:
                            self._first_audio_at = now
                            stats["end_of_speech_to_first_audio"] = now - turn.end_of_speech
                        start = max(self._speaking_until - PLAYBACK_SLACK, self._first_audio_at)
                        self._speaking_until = start + piece.size / SAMPLE_RATE + PLAYBACK_SLACK
                    chunks.append(piece)
                    yield [*history, {"role": "assistant", "content": text}], wav_bytes(piece)
            interrupted = interrupted or self._generation != generation
            yield self._finish(history, text, chunks, stats, turn, interrupted), None
        except (QwenOmniError, ValueError) as e:
            yield [*history, *([{"role": "assistant", "content": text}] if text else []), error_message(str(e))], None
        except Exception:  # noqa: BLE001 - a bug: the trace goes to the server log, not the page
            log.exception("talk reply failed")
            yield [*history, *([{"role": "assistant", "content": text}] if text else []),
                   error_message(GENERIC_ERROR)], None
        finally:
            if stream is not None:
                stream.close()
            with self._lock:
                if self._answering == turn.id:
                    self._answering = None
                if self._generation != generation:
                    self._speaking_until = 0.0

    def _finish(self, history, text, chunks, stats, turn, interrupted) -> list[dict]:
        out = list(history)
        stats = dict(stats)
        if chunks:
            stats["audio_seconds"] = sum(c.size for c in chunks) / SAMPLE_RATE
        line = talk_stats_line(stats, interrupted)
        if text or chunks:
            out.append({"role": "assistant", "content": f"{text}\n\n{line}"})
        if chunks:
            out.append(audio_message(chunks, f"reply-{turn.id}"))
        return out


def mark_interrupted(history: list[dict]) -> list[dict]:
    """The history with its last spoken reply's stats line saying "interrupted" (its playback was cut short)."""
    out = list(history)
    for i in range(len(out) - 1, -1, -1):
        m = out[i]
        if m.get("role") == "user":
            break
        content = m.get("content")
        if isinstance(content, list):  # the browser's shape: [{"type": "text", "text": ...}]
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
        if m.get("role") == "assistant" and isinstance(content, str) and content.endswith("</sub>"):
            if INTERRUPTED not in content:
                out[i] = {**m, "content": content[:-len("</sub>")] + f" · {INTERRUPTED}</sub>"}
            break
    return out


def talk_stats_line(stats: dict, interrupted: bool = False) -> str:
    """The reply's stats line with the voice turn's latency first: end of speech -> first audio."""
    line = stats_line(stats)
    extra = []
    if stats.get("end_of_speech_to_first_audio") is not None:
        extra.append(f"end of speech → first audio {stats['end_of_speech_to_first_audio']:.2f} s")
    if interrupted:
        extra.append(INTERRUPTED)
    if not extra:
        return line
    head, rest = line.split(">", 1)
    return f"{head}>{' · '.join(extra)}{' · ' if rest != '</sub>' else ''}{rest}"
