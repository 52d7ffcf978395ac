"""Build tiny random text checkpoints with transformers' own classes (no download)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_checkpoint(d: Path, kind: str = "qwen3", tie_word_embeddings: bool = False, vocab: int = 512,
                    **moe) -> torch.nn.Module:
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie_word_embeddings, rope_theta=10000.0, rms_norm_eps=1e-6)
    if kind == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = Qwen3Config(head_dim=16, **common), Qwen3ForCausalLM
    else:
        cfg = Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                             decoder_sparse_step=1, **{**common, **moe})
        cls = Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random init is tiny; spread the weights so differences would show
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    model.save_pretrained(d)
    return model
