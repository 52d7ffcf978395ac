"""Model configuration as nested dataclasses parsed from a checkpoint's `config.json`.

Field names are Hugging Face's, so a reader can hold our config next to the checkpoint's JSON. Values that
real checkpoints set have no default here: they must come from the file. Keys we do not model land in `extra`
(see `encoders.common.from_hf_dict`), never silently dropped.

The text config covers `qwen2`, `qwen3`, `qwen3_moe` and the text part of both Omni thinkers; `rope_parameters`
(transformers v5) and the legacy `rope_theta` / `rope_scaling` both parse into one `RopeConfig`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encoders.common import from_hf_dict

from ..errors import CheckpointError

# Families whose attention projections carry q/k/v biases regardless of `attention_bias` (Qwen2 layout).
QKV_BIAS_FAMILIES = {"qwen2", "qwen2_5_omni_text", "qwen2_5_omni_thinker", "qwen2_5_omni",
                     "qwen2_5_omni_talker"}
# Families with per-head q/k RMSNorm before RoPE (Qwen3 layout).
QK_NORM_FAMILIES = {"qwen3", "qwen3_moe", "qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "qwen3_omni_moe",
                    "qwen3_omni_moe_talker_text", "qwen3_omni_moe_talker_code_predictor"}


@dataclass
class RopeConfig:
    rope_theta: float
    rope_type: str = "default"
    mrope_section: list[int] | None = None  # per-axis (T, H, W) frequency counts; None = 1-D RoPE
    mrope_interleaved: bool = False  # Qwen3-Omni interleaves T/H/W slots; Qwen2.5-Omni keeps them contiguous
    factor: float | None = None  # only for rope_type "linear"

    @classmethod
    def parse(cls, d: dict[str, Any], *, interleaved: bool) -> "RopeConfig":
        params = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = params.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise CheckpointError("config.json gives no rope_theta (neither in rope_parameters nor top level)")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "mrope":  # legacy name in Qwen2-VL style configs
            rope_type = "default"
        if rope_type not in ("default", "linear"):
            raise CheckpointError(f"rope_type {rope_type!r} is not supported (supported: default, linear)")
        section = params.get("mrope_section")
        return cls(rope_theta=float(theta), rope_type=rope_type, mrope_section=list(section) if section else None,
                   mrope_interleaved=interleaved and section is not None, factor=params.get("factor"))


@dataclass
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    head_dim: int | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool = False
    # MoE (qwen3_moe, qwen3_omni_moe_text); absent on dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0
    # Token ids the text model itself may declare.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope: RopeConfig = None  # type: ignore[assignment]  # set by parse
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: dict[str, Any], *, model_type: str | None = None, tie_word_embeddings: bool | None = None,
              ) -> "TextConfig":
        mt = model_type or d.get("model_type")
        if not mt:
            raise CheckpointError("config.json has no model_type")
        overrides: dict[str, Any] = {"model_type": mt}
        if tie_word_embeddings is not None:  # the Omni thinker, not its text config, decides tying
            overrides["tie_word_embeddings"] = tie_word_embeddings
        if "num_local_experts" in d and "num_experts" not in d:  # transformers' attribute_map alias
            overrides["num_experts"] = d["num_local_experts"]
        cfg = from_hf_dict(cls, {k: v for k, v in d.items() if k != "num_local_experts"}, **overrides)
        if cfg.head_dim is None:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if cfg.use_sliding_window:
            raise CheckpointError("sliding-window attention (use_sliding_window=true) is not supported")
        cfg.rope = RopeConfig.parse(d, interleaved=mt.startswith("qwen3_omni"))
        for k in ("rope_parameters", "rope_scaling", "rope_theta"):
            cfg.extra.pop(k, None)
        return cfg

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in QKV_BIAS_FAMILIES

    @property
    def qk_norm(self) -> bool:
        return self.model_type in QK_NORM_FAMILIES

    def is_moe_layer(self, i: int) -> bool:
        """Qwen3-MoE rule: sparse unless listed in mlp_only_layers, every `decoder_sparse_step`-th layer."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)


TEXT_MODEL_TYPES = {"qwen2", "qwen3", "qwen3_moe"}


def read_config_json(path: Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json here - is this a model directory?")
    return json.loads(f.read_text())
