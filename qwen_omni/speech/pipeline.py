"""One spoken reply, streamed: the thinker's text and the talker's audio interleaved as each becomes ready.

`SpeechPipeline` is the part both talker families share: it runs the assistant's text stream with a
`ThinkerRecorder` watching the thinker (tap.py), and after every text piece asks the family's utterance
to advance the talker as far as the text allows and the vocoder as far as the codes allow. The families
(speech/qwen3/pipeline.py, speech/qwen25/pipeline.py) say how a talker starts and how codes become audio.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch

from ..engine.sampling import SamplingParams
from .tap import ThinkerRecorder

Run = Callable[..., Iterator[str]]  # run(messages, tap) -> text pieces: the assistant's generation loop
SAMPLE_RATE = 24000  # both families' vocoders


class SpeechPipeline:
    """Thinker -> talker -> vocoder for one family. Subclasses set `hidden_layer` and make utterances."""

    hidden_layer: int
    steps_per_second: float  # talker steps per second of audio

    def __init__(self, thinker: torch.nn.Module):
        self.thinker = thinker
        self.max_audio_seconds: float | None = None  # None: the reference's talker budget (4096 steps)
        self.talker_params: SamplingParams | None = None  # None: the reference's talker sampling
        self.record_codes: list | None = None  # a list: every utterance's codes are appended (tests, benchmarks)

    def messages(self, messages: list[dict]) -> list[dict]:
        return messages

    def max_steps(self) -> int:
        s = self.max_audio_seconds
        return 4096 if s is None else max(1, int(s * self.steps_per_second))

    def utterance(self, rec: ThinkerRecorder, voice: str, seed: int | None, codes_out: list | None):
        raise NotImplementedError

    def stream(self, run: Run, messages: list[dict], voice: str, stats: dict, start: float,
               seed: int | None = None) -> Iterator[str | np.ndarray]:
        """Yield the thinker's text pieces and the talker's audio (np.float32, 24 kHz) as each becomes ready.

        run(messages, tap): the assistant's text stream with `tap` watching the thinker. `record_codes`, when a
        list, receives this utterance's codes (Qwen3: a (G,) frame each; Qwen2.5: ints) as one list.
        """
        rec = ThinkerRecorder(self.thinker, self.hidden_layer)
        codes_out = None
        if self.record_codes is not None:
            codes_out = []
            self.record_codes.append(codes_out)
        utt = self.utterance(rec, voice, seed, codes_out)
        synth, audio_s = 0.0, 0.0

        def timed(chunks: Iterator[torch.Tensor]) -> Iterator[np.ndarray]:
            nonlocal synth, audio_s
            t = time.perf_counter()
            for a in chunks:
                synth += time.perf_counter() - t
                stats.setdefault("time_to_first_audio", time.perf_counter() - start)
                audio_s += a.numel() / SAMPLE_RATE
                stats.update(audio_seconds=audio_s, real_time_factor=synth / audio_s if audio_s else None)
                yield a.numpy()
                t = time.perf_counter()
            synth += time.perf_counter() - t

        text = run(self.messages(messages), rec)
        try:
            for piece in text:
                yield piece
                yield from timed(utt.step(final=False))
        finally:
            text.close()  # on Stop: release the thinker (lock, cache, hooks) now, not at garbage collection
        yield from timed(utt.step(final=True))
        stats.update(audio_seconds=audio_s, real_time_factor=synth / audio_s if audio_s else None)


def media_of(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid") if k in inputs}


def audio_in_video(ids: torch.Tensor, vision_start: int, audio_start: int) -> bool:
    row = ids[0].tolist()
    return any(a == vision_start and b == audio_start for a, b in zip(row, row[1:]))


def join_spoken(pieces: Iterator[str | np.ndarray]) -> tuple[str, np.ndarray]:
    """A spoken reply's stream (text pieces and float32 audio chunks, interleaved) as (text, whole waveform)."""
    parts = list(pieces)
    audio = [p for p in parts if not isinstance(p, str)]
    return "".join(p for p in parts if isinstance(p, str)), np.concatenate(audio) if audio else np.zeros(0, np.float32)
