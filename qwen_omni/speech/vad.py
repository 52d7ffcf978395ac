"""Voice activity: where a user's utterance starts and ends in streamed audio (silero-vad).

silero-vad scores windows of 512 samples at 16 kHz (32 ms) with a speech probability; its model ships inside the
`silero-vad` wheel and needs only torch. `Endpointer` turns the stream of windows into turn events, as a voice
assistant needs them: "speech_started" once `min_speech_ms` of speech have been heard, and "speech_stopped" after
`silence_ms` of silence that follows it. Hysteresis (a window counts as speech above `threshold`, as silence
below `threshold - 0.15`) keeps a breath inside a word from ending the turn. The finished utterance is handed
over with `padding_ms` of audio before its first speech window, so its first syllable is not clipped.

The model carries state from window to window, so every conversation gets its own `Endpointer` (and model copy).
Audio may arrive at any rate and in pieces of any length: it is resampled to 16 kHz and cut into windows here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from encoders.media import resample

from ..errors import InputError

RATE = 16000
WINDOW = 512  # samples per silero window at 16 kHz
_load_lock = threading.Lock()


def load_model():
    """A fresh silero-vad model (TorchScript, from the installed wheel; raises InputError when it is missing)."""
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        raise InputError("voice activity detection needs the silero-vad package: pip install silero-vad") from None
    with _load_lock:  # its loader is not safe to call from two threads at once
        return load_silero_vad()


@dataclass(frozen=True)
class TurnEvent:
    kind: str  # "speech_started" | "speech_stopped"
    at: float  # seconds of audio pushed so far when the event's window ended (stream time)


class Endpointer:
    """Push audio, get turn events; `take_utterance()` returns the last finished utterance (16 kHz float32)."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 600, min_speech_ms: int = 160,
                 padding_ms: int = 300, max_utterance_s: float = 60.0, model=None):
        if not 0 < threshold < 1:
            raise InputError(f"the voice threshold must be between 0 and 1, not {threshold}")
        self.threshold, self.silence_ms, self.min_speech_ms = threshold, silence_ms, min_speech_ms
        self.padding = int(padding_ms * RATE / 1000)
        self.max_samples = int(max_utterance_s * RATE)
        self.model = model if model is not None else load_model()
        self.reset()

    def reset(self) -> None:
        """Forget everything heard so far (a new conversation, or audio thrown away)."""
        self.model.reset_states()
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet scored (less than a window)
        self._history = np.zeros(0, np.float32)  # recent audio before speech (padding) or the utterance so far
        self._samples = 0  # samples scored since the start: the stream clock
        self._speech_run = 0  # consecutive speech windows (before speech_started)
        self._silence_run = 0  # consecutive silent windows (while speaking)
        self.speaking = False
        self._utterance: np.ndarray | None = None

    def push(self, audio: np.ndarray, rate: int = RATE) -> list[TurnEvent]:
        """Feed mono audio (float32 in [-1, 1], any rate); returns the events its windows completed."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size and not np.isfinite(audio).all():
            raise InputError("the audio holds NaN or infinite samples")
        if rate != RATE:
            audio = resample(audio, rate, RATE)
        self._pending = np.concatenate([self._pending, audio])
        events = []
        while self._pending.size >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            event = self._score(window)
            if event is not None:
                events.append(event)
        return events

    def _score(self, window: np.ndarray) -> TurnEvent | None:
        with torch.inference_mode():
            p = float(self.model(torch.from_numpy(window.copy()), RATE))
        self._samples += WINDOW
        self._history = np.concatenate([self._history, window])
        now = self._samples / RATE
        ms = WINDOW * 1000 / RATE
        if not self.speaking:
            self._speech_run = self._speech_run + 1 if p >= self.threshold else 0
            if self._speech_run * ms >= self.min_speech_ms:
                self.speaking, self._silence_run = True, 0
                keep = self._speech_run * WINDOW + self.padding
                self._history = self._history[-keep:]
                return TurnEvent("speech_started", now)
            self._history = self._history[-(self.padding + self._speech_run * WINDOW):]  # only padding is kept
            return None
        self._silence_run = self._silence_run + 1 if p < self.threshold - 0.15 else 0
        if self._silence_run * ms >= self.silence_ms or self._history.size >= self.max_samples:
            self._utterance = self._history
            self._history = np.zeros(0, np.float32)
            self.speaking, self._speech_run = False, 0
            return TurnEvent("speech_stopped", now)
        return None

    def take_utterance(self) -> np.ndarray | None:
        """The utterance that the last "speech_stopped" ended (padding included), once; None if there is none."""
        out, self._utterance = self._utterance, None
        return out

    def flush(self) -> np.ndarray | None:
        """End the turn now (a client's commit): the audio since speech started, or None when nobody spoke."""
        if not self.speaking:
            return None
        out = self._history
        self._history = np.zeros(0, np.float32)
        self.speaking, self._speech_run = False, 0
        return out
