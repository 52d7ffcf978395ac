"""Config of Qwen2.5-Omni's speech output (`talker_config`, `token2wav_config`) (the loader of its weights is in
`speech_pipeline25`).

Field names are transformers' (`Qwen2_5OmniTalkerConfig`, `Qwen2_5OmniDiTConfig`, `Qwen2_5OmniBigVGANConfig`),
parsed with `encoders.common.from_hf_dict` so unknown keys land in `extra`. Defaults:
* talker sizes (hidden, layers, heads, ...) are required: transformers' class defaults (hidden 3584, 28
  layers) are not the released talker's (hidden 896, 24 layers), so they must come from config.json;
* everything else defaults to transformers' class default, which is what transformers itself uses when
  config.json omits a key (token ids, DiT/BigVGAN shapes: the DiT and BigVGAN class defaults are the
  released model's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from encoders.common import from_hf_dict

from ...errors import CheckpointError
from ...models.config import TextConfig

DEFAULT_TALKER_MROPE = [16, 24, 24]  # transformers' fallback when rope_parameters lacks mrope_section


@dataclass
class TalkerConfig25:
    vocab_size: int  # codec vocabulary (8448)
    embedding_size: int  # = thinker hidden size: codec embeddings live in the thinker's space
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    head_dim: int = 128  # transformers' default, not hidden_size // heads
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293  # codec BOS
    tts_codec_end_token_id: int = 8294  # codec EOS
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    # TMRoPE of the talker prompt is computed with the talker's own copy of these ids (reference behaviour).
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2
    spatial_merge_size: int = 2
    text: TextConfig = None  # type: ignore[assignment]  # the decoder's view, set by parse
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "TalkerConfig25":
        cfg = from_hf_dict(cls, {k: v for k, v in d.items() if k != "text"})
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope.setdefault("mrope_section", DEFAULT_TALKER_MROPE)
        rope.setdefault("rope_theta", d.get("rope_theta", 1e6))
        # The decoder is a Qwen2 stack (q/k/v bias): model_type "qwen2_5_omni_talker" is in QKV_BIAS_FAMILIES.
        cfg.text = TextConfig.parse({**d, "head_dim": cfg.head_dim, "rope_parameters": rope},
                                    model_type="qwen2_5_omni_talker", tie_word_embeddings=False)
        return cfg


@dataclass
class DiTConfig25:
    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    ff_mult: int = 2
    emb_dim: int = 512  # codec embedding width
    head_dim: int = 64
    max_position_embeddings: int = 32768
    block_size: int = 24  # frames per attention block
    look_ahead_layers: list[int] = field(default_factory=lambda: [10])
    look_backward_layers: list[int] = field(default_factory=lambda: [0, 20])
    repeats: int = 2  # mel frames per codec token
    num_embeds: int = 8193
    mel_dim: int = 80
    dropout: float = 0.1  # training only
    enc_emb_dim: int = 192  # speaker x-vector (spk_dict "cond")
    enc_dim: int = 128  # ECAPA output
    enc_channels: list[int] = field(default_factory=lambda: [256, 256, 256, 256, 768])
    enc_kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    enc_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64
    rope_theta: float = 10000.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "DiTConfig25":
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"DiT rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        cfg = from_hf_dict(cls, {k: v for k, v in d.items() if k != "rope_parameters"}, rope_theta=float(theta))
        if len(cfg.enc_channels) != len(cfg.enc_kernel_sizes) or len(cfg.enc_channels) != len(cfg.enc_dilations):
            raise CheckpointError("dit_config: enc_channels, enc_kernel_sizes and enc_dilations differ in length")
        return cfg


@dataclass
class BigVGANConfig25:
    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    upsample_rates: list[int] = field(default_factory=lambda: [5, 3, 2, 2, 2, 2])  # product 240 samples/frame
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 7, 4, 4, 4, 4])
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Token2WavConfig25:
    dit: DiTConfig25
    bigvgan: BigVGANConfig25

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Token2WavConfig25":
        return cls(DiTConfig25.parse(d.get("dit_config") or {}),
                   from_hf_dict(BigVGANConfig25, d.get("bigvgan_config") or {}))


@dataclass
class SpeechConfig25:
    talker: TalkerConfig25
    token2wav: Token2WavConfig25

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "SpeechConfig25":
        if raw.get("model_type") != "qwen2_5_omni":
            raise CheckpointError(f"speech output needs a full Qwen2.5-Omni checkpoint (model_type 'qwen2_5_omni'), "
                                  f"got {raw.get('model_type')!r}")
        if raw.get("enable_audio_output") is False or not raw.get("talker_config"):
            raise CheckpointError("this checkpoint has no speech output (enable_audio_output is false or there is "
                                  "no talker_config)")
        return cls(TalkerConfig25.parse(raw["talker_config"]),
                   Token2WavConfig25.parse(raw.get("token2wav_config") or {}))
