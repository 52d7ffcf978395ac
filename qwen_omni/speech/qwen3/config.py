"""Configs of the Qwen3-Omni speech output: the talker (MoE codec LM + code predictor) and Code2Wav.

Parsed from a full Qwen3-Omni `config.json` (`talker_config`, `code2wav_config` and the top-level tts/chat token
ids) with Hugging Face field names, like `models/config.py` and `models/omni_config.py`. The two transformer stacks reuse
`TextConfig`, under their HF model types:
* `qwen3_omni_moe_talker_text`: Qwen3 layers (q/k norm), interleaved MRoPE, every layer an MoE block with a
  sigmoid-gated shared expert. HF builds every talker layer sparse whatever `mlp_only_layers` /
  `decoder_sparse_step` say, so we force those.
* `qwen3_omni_moe_talker_code_predictor`: dense Qwen3 layers with plain 1-D RoPE (HF uses the 1-D rotary class
  even if an `mrope_section` is present, so we drop it).
Code2Wav's pre-transformer attention is described by a `TextConfig` built here (no q/k norm, 1-D RoPE).
Ids the talker shares with the thinker (multimodal mask, TMRoPE block ends) come from the `ThinkerConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from encoders.common import from_hf_dict

from ...errors import CheckpointError
from ...models.config import RopeConfig, TextConfig
from ...models.omni_config import ThinkerConfig
from ...models.positions import RopeSpec, family_rules


@dataclass
class TalkerConfig:
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int  # index into the thinker's hidden states: 0 = embeddings, k = output of layer k-1
    codec_eos_token_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    codec_pad_id: int
    codec_bos_id: int
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    position_id_per_seconds: float
    spatial_merge_size: int
    speaker_id: dict[str, int] = field(default_factory=dict)
    text: TextConfig = None  # type: ignore[assignment]  # set by parse
    code_predictor: TextConfig = None  # type: ignore[assignment]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "TalkerConfig":
        cfg = from_hf_dict(cls, {k: v for k, v in d.items() if k not in ("text_config", "code_predictor_config")})
        cfg.speaker_id = {k.lower(): int(v) for k, v in (cfg.speaker_id or {}).items()}
        text = dict(d["text_config"], mlp_only_layers=[], decoder_sparse_step=1)
        cfg.text = TextConfig.parse(text, model_type="qwen3_omni_moe_talker_text")
        if cfg.text.num_experts <= 0 or cfg.text.shared_expert_intermediate_size <= 0:
            raise CheckpointError("talker text_config needs num_experts and shared_expert_intermediate_size > 0 "
                                  "(every talker layer is MoE with a shared expert)")
        cp = dict(d["code_predictor_config"])
        cp["rope_parameters"] = {k: v for k, v in (cp.get("rope_parameters") or {}).items() if k != "mrope_section"}
        if not cp["rope_parameters"]:
            cp.pop("rope_parameters")
        cfg.code_predictor = TextConfig.parse(cp, model_type="qwen3_omni_moe_talker_code_predictor")
        if cp.get("num_code_groups", cfg.num_code_groups) != cfg.num_code_groups:
            raise CheckpointError("talker and code predictor disagree on num_code_groups")
        window = cp.get("sliding_window")
        if "sliding_attention" in (cp.get("layer_types") or []) and window is not None and window < cfg.num_code_groups:
            raise CheckpointError(f"code predictor sliding window {window} is shorter than its sequence")
        return cfg


@dataclass
class Code2WavConfig:
    codebook_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    num_quantizers: int
    sliding_window: int
    rms_norm_eps: float
    max_position_embeddings: int
    upsample_rates: list[int]
    upsampling_ratios: list[int]
    decoder_dim: int
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    hidden_act: str = "silu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_frame(self) -> int:
        n = 1
        for r in (*self.upsample_rates, *self.upsampling_ratios):
            n *= r
        return n

    def attention_config(self) -> TextConfig:
        """The pre-transformer as a `TextConfig` (what `decoder.Attention` / `Rotary` read)."""
        d = {"rope_parameters": self.extra.get("rope_parameters"), "rope_theta": self.extra.get("rope_theta")}
        return TextConfig(model_type="qwen3_omni_moe_code2wav", vocab_size=0, hidden_size=self.hidden_size,
                          intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                          num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                          rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                          head_dim=self.extra.get("head_dim") or self.hidden_size // self.num_attention_heads,
                          attention_bias=self.attention_bias, rope=RopeConfig.parse(d, interleaved=False))

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Code2WavConfig":
        cfg = from_hf_dict(cls, d)
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"code2wav hidden_act {cfg.hidden_act!r} is not supported (silu only)")
        return cfg


@dataclass
class SpeechConfig:
    """Everything the speech output reads: talker, vocoder, and the chat/tts token ids of the full config."""
    talker: TalkerConfig
    code2wav: Code2WavConfig
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    im_start_token_id: int
    user_token_id: int
    assistant_token_id: int
    thinker_media_ids: tuple[int, int, int]  # thinker audio/image/video placeholder ids (the multimodal mask)
    rope: RopeSpec  # TMRoPE of the talker's own prompt (talker ids, thinker's block-end ids)

    @classmethod
    def parse(cls, raw: dict[str, Any], thinker: ThinkerConfig) -> "SpeechConfig":
        if raw.get("model_type") != "qwen3_omni_moe" or "talker_config" not in raw:
            raise CheckpointError("speech output needs a full Qwen3-Omni config.json (model_type qwen3_omni_moe "
                                  "with talker_config and code2wav_config)")
        talker = TalkerConfig.parse(raw["talker_config"])
        if talker.thinker_hidden_size != thinker.text.hidden_size:
            raise CheckpointError(f"talker expects thinker hidden size {talker.thinker_hidden_size}, "
                                  f"the thinker has {thinker.text.hidden_size}")
        if not 0 <= talker.accept_hidden_layer <= thinker.text.num_hidden_layers:
            raise CheckpointError(f"accept_hidden_layer {talker.accept_hidden_layer} is outside the thinker")

        def tok(name: str, default: int) -> int:  # HF class defaults; released configs write them out
            return int(raw.get(name, default))

        rope = RopeSpec(image_token_id=talker.image_token_id, video_token_id=talker.video_token_id,
                        audio_token_id=talker.audio_token_id, vision_start_token_id=talker.vision_start_token_id,
                        vision_end_token_id=thinker.vision_end_token_id,
                        audio_start_token_id=talker.audio_start_token_id,
                        audio_end_token_id=thinker.audio_end_token_id, spatial_merge_size=talker.spatial_merge_size,
                        position_id_per_seconds=talker.position_id_per_seconds, **family_rules(qwen3=True))
        return cls(talker=talker, code2wav=Code2WavConfig.parse(raw["code2wav_config"]),
                   tts_pad_token_id=tok("tts_pad_token_id", 151671), tts_bos_token_id=tok("tts_bos_token_id", 151672),
                   tts_eos_token_id=tok("tts_eos_token_id", 151673), im_start_token_id=tok("im_start_token_id", 151644),
                   user_token_id=tok("user_token_id", 872), assistant_token_id=tok("assistant_token_id", 77091),
                   thinker_media_ids=(thinker.audio_token_id, thinker.image_token_id, thinker.video_token_id),
                   rope=rope)

    def multimodal_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: thinker audio/image/video placeholder positions (where the talker reads hidden states)."""
        return torch.isin(ids, torch.tensor(self.thinker_media_ids, device=ids.device))

    @property
    def tts_special_ids(self) -> list[int]:
        """The thinker tokens whose embeddings `Talker3.prepare` needs, in this order: tts_bos, tts_eos, tts_pad."""
        return [self.tts_bos_token_id, self.tts_eos_token_id, self.tts_pad_token_id]
