"""Spoken replies: who speaks for a model, and the switch that loads its talker on first use.

Who speaks. A full Omni checkpoint with talker weights (`qwen2_5_omni` with `spk_dict.pt`, `qwen3_omni_moe`)
speaks with its own talker and vocoder, streamed beside the text (pipeline.py; one file per family,
chosen through `FAMILIES`). Any other model (the embedded tiny model, text LMs, thinker-only checkpoints)
speaks with the offline espeak-ng voice (offline_voice.py), sentence by sentence.

`Speech` is the per-assistant switch: `load(..., speech="lazy")` (default) reads only config.json at load time
and loads the talker and vocoder the first time a spoken reply is asked for, so text-only use never pays their
memory; `speech=True` loads them at once; `speech=False` refuses spoken replies with an InputError.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open

from ..errors import CheckpointError, InputError
from ..models.loader import safetensors_files
from ..models.omni_config import THINKER_TYPES
from .offline_voice import VOICES, speak
from .pipeline import Run, SpeechPipeline
from .qwen25 import pipeline as qwen25
from .qwen3 import pipeline as qwen3

# config.json model_type -> talker family; each family module has can_speak(path), voices(path) and Pipeline.
FAMILY_OF = {"qwen3_omni_moe": "qwen3", "qwen2_5_omni": "qwen2_5"}
FAMILIES = {"qwen3": qwen3, "qwen2_5": qwen25}


def talker_family(path: Path) -> str | None:
    """"qwen3" / "qwen2_5" when the checkpoint has a talker with its weights, else None (config + headers only)."""
    f = Path(path) / "config.json"
    raw = json.loads(f.read_text()) if f.is_file() else {}
    family = FAMILY_OF.get(raw.get("model_type"))
    if family is None or not raw.get("talker_config") or raw.get("enable_audio_output") is False:
        return None
    if not FAMILIES[family].can_speak(Path(path)):
        return None
    try:
        files = safetensors_files(Path(path))
    except CheckpointError:
        return None
    for sf_path in files:
        with safe_open(str(sf_path), framework="pt") as sf:
            if any(k.startswith("talker.") for k in sf.keys()):
                return family
    return None


class Speech:
    """The assistant's speech switch and lazily loaded pipeline (`assistant.speech`)."""

    def __init__(self, assistant, mode: bool | str = "lazy"):
        if mode not in (True, False, "lazy"):
            raise InputError(f"speech must be True, False or 'lazy', not {mode!r}")
        self.assistant, self.mode = assistant, mode
        self.family = talker_family(assistant.path) if mode is not False and assistant.kind in THINKER_TYPES \
            else None
        self.pipeline: SpeechPipeline | None = None
        self._max_audio_seconds: float | None = None
        self._lock = threading.Lock()
        self._voices: list[str] | None = None
        if mode is True and self.family:
            self.load()

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    @property
    def max_audio_seconds(self) -> float | None:
        """Longest spoken reply the talker may produce (None: the reference's budget of 4096 talker steps)."""
        return self._max_audio_seconds

    @max_audio_seconds.setter
    def max_audio_seconds(self, seconds: float | None) -> None:
        self._max_audio_seconds = seconds
        if self.pipeline is not None:
            self.pipeline.max_audio_seconds = seconds

    @property
    def voices(self) -> list[str]:
        """Voice names a spoken reply may use ([] when speech is off); the first is the default."""
        if self.mode is False:
            return []
        if self._voices is None:
            self._voices = FAMILIES[self.family].voices(self.assistant.path) if self.family else list(VOICES)
        return self._voices

    def resolve_voice(self, voice: str | None) -> str:
        """Canonical voice name; "default"/None -> the first; unknown -> InputError listing the choices."""
        voices = self.voices
        if self.family is None:  # the offline voice also takes espeak-ng's own voice names
            return voice or "default"
        if not voice or voice == "default":
            return voices[0]
        match = [v for v in voices if v.lower() == voice.lower()]
        if not match:
            raise InputError(f"unknown voice {voice!r}; this model's voices are {', '.join(voices)}")
        return match[0]

    def load(self) -> SpeechPipeline:
        with self._lock:
            if self.pipeline is None:
                a = self.assistant
                pipeline = FAMILIES[self.family].Pipeline(a.model, a.path, a.dtype, a.device)
                pipeline.max_audio_seconds = self.max_audio_seconds
                self.pipeline = pipeline
        return self.pipeline

    def reply(self, run: Run, messages: list[dict], voice: str | None, stats: dict, start: float,
              seed: int | None = None) -> Iterator[str | np.ndarray]:
        """Text pieces and float32 24-kHz audio chunks, interleaved. Checks (mode, voice) happen now, not lazily."""
        if self.mode is False:
            raise InputError("spoken replies are disabled for this model (it was loaded with speech=False); load it "
                             "with speech=True or 'lazy' to enable them")
        name = self.resolve_voice(voice)
        stats.update(voice=name)
        if self.family is None:
            stats.update(speech="offline")
            return speak(run(messages, None), name, stats, start, self.assistant.reasoning_mode)
        pipeline = self.load()
        stats.update(speech="talker")
        return pipeline.stream(run, messages, name, stats, start, seed)
