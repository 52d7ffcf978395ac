"""Config tree of the Omni thinkers (Qwen2.5-Omni and Qwen3-Omni-MoE), from a checkpoint's `config.json`.

A full checkpoint nests the thinker under `thinker_config` (beside `talker_config` and the vocoder's); a
thinker-only checkpoint is the thinker config itself. Token ids are read from the file: Qwen2.5 names them
`*_token_index`, Qwen3 `*_token_id`, and the real values differ between the two families.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from encoders import qwen3_audio, qwen25_audio
from encoders.common import from_hf_dict
from encoders.qwen3_audio import Qwen3AudioConfig
from encoders.qwen3_vision import Qwen3VisionConfig
from encoders.qwen25_audio import Qwen25AudioConfig
from encoders.qwen25_vision import Qwen25VisionConfig

from ..errors import CheckpointError
from .config import TextConfig

FULL_TYPES = {"qwen2_5_omni": "qwen2_5_omni_thinker", "qwen3_omni_moe": "qwen3_omni_moe_thinker"}
THINKER_TYPES = set(FULL_TYPES.values())
# transformers falls back to these MRoPE sections when a text config omits them (released configs set them).
DEFAULT_MROPE = {"qwen2_5_omni_thinker": [16, 24, 24], "qwen3_omni_moe_thinker": [24, 20, 20]}


@dataclass
class ThinkerConfig:
    model_type: str  # "qwen2_5_omni_thinker" | "qwen3_omni_moe_thinker"
    text: TextConfig
    audio: Qwen25AudioConfig | Qwen3AudioConfig
    vision: Qwen25VisionConfig | Qwen3VisionConfig
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    position_id_per_seconds: float
    seconds_per_chunk: float | None = None
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_qwen3(self) -> bool:
        return self.model_type == "qwen3_omni_moe_thinker"

    def audio_output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Audio tokens per clip from its mel frame counts (long tensor): the family's encoder arithmetic."""
        if self.is_qwen3:
            return qwen3_audio.audio_output_lengths(frames, self.audio.n_window)
        return qwen25_audio.audio_output_lengths(frames)

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "ThinkerConfig":
        mt = raw.get("model_type")
        if mt in FULL_TYPES:
            raw, mt = raw["thinker_config"], FULL_TYPES[mt]
        if mt not in THINKER_TYPES:
            raise CheckpointError(f"model_type {mt!r} is not an Omni thinker")
        qwen3 = mt == "qwen3_omni_moe_thinker"

        def tok(name: str) -> int:
            for key in (f"{name}_token_id", f"{name}_token_index"):
                if raw.get(key) is not None:
                    return int(raw[key])
            raise CheckpointError(f"config.json lacks {name}_token_id")

        text_raw = dict(raw["text_config"])
        rope = dict(text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {})
        if "mrope_section" not in rope:
            rope["mrope_section"] = DEFAULT_MROPE[mt]
            rope.setdefault("rope_theta", text_raw.get("rope_theta", 1e6))
            text_raw["rope_parameters"] = rope
        tie = bool(raw.get("tie_word_embeddings", False))
        text = TextConfig.parse(text_raw, model_type=text_raw.get("model_type"), tie_word_embeddings=tie)
        audio_cls, vision_cls = (Qwen3AudioConfig, Qwen3VisionConfig) if qwen3 else (Qwen25AudioConfig,
                                                                                   Qwen25VisionConfig)
        known = {"text_config", "audio_config", "vision_config", "model_type", "tie_word_embeddings"}
        return cls(
            model_type=mt, text=text,
            audio=from_hf_dict(audio_cls, raw["audio_config"]), vision=from_hf_dict(vision_cls, raw["vision_config"]),
            audio_token_id=tok("audio"), image_token_id=tok("image"), video_token_id=tok("video"),
            audio_start_token_id=tok("audio_start"), audio_end_token_id=tok("audio_end"),
            vision_start_token_id=tok("vision_start"), vision_end_token_id=tok("vision_end"),
            position_id_per_seconds=float(raw["position_id_per_seconds"]),
            seconds_per_chunk=raw.get("seconds_per_chunk"), tie_word_embeddings=tie,
            extra={k: v for k, v in raw.items() if k not in known and not k.endswith(("_token_id", "_token_index"))},
        )
