"""The text decoder shared by every family: Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm before RoPE) and the
Qwen3-MoE sparse layers, with 1-D RoPE or 3-axis MRoPE.

Module and parameter names are the checkpoint's (`model.layers.N.self_attn.q_proj`, `lm_head`, ...), so the
loader maps almost nothing. Attention is PyTorch SDPA over the explicit `KVCache`; without a cache (training,
a one-shot forward) it is plain causal attention. Shapes: hidden (B, S, H); q (B, heads, S, D); k/v
(B, kv_heads, S, D), GQA handled by SDPA's `enable_gqa`.

CPU decode speed: besides its matrix products a decode step runs ~40 small ops per layer, so per-op overhead
counts next to memory bandwidth. Without changing float32 results (bit for bit): RMSNorm through the fused
`F.rms_norm` (4 ops, not 8); cos/sin shaped and sign-folded once per forward rather than per layer and per q/k;
the KV cache's write position planned once per forward (`KVCache.begin`); no mask on a decode step. The linear
layers are `layers.Linear`: one bfloat16 row goes through torch's faster GEMV kernel (same math; it gave the same
bits as before on the tiny test models and on the 0.6B shape, but a GEMV may sum in its own order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import RMSNorm as _RMSNorm

from .config import TextConfig
from .group_prefill import Prompt, prefill_prompts
from .kv_cache import KVCache
from .layers import MLP, Linear
from .moe import SparseMoE
from .rope import Rotary


class RMSNorm(_RMSNorm):
    """encoders.common.RMSNorm (statistics in float32, cast back, then the weight) via the fused op.

    `F.rms_norm` in float32 computes the same x * rsqrt(mean(x^2) + eps) and gives the same bits on CPU
    (checked on bf16 rows of 1024 and float32 rows).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, D) cos/sin -> (B, 1, S, D) cos and sin with the first half negated, for `rotate`."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, heads, S, D): x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1).

    The sign lives in `signed_sin` (exact: negation commutes with rounding), so this is 4 kernels, not 8.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q.transpose(1, 2), cos, sin)
        k = rotate(k.transpose(1, 2), cos, sin)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=self.kv_heads != self.heads)
        else:
            k, v = cache.write(layer, k, v)
            if S == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
                # One query in bf16/fp16: torch's CPU SDPA kernel is slower than upcasting q/k/v and running it in
                # float32 (docs/cpu-kernels.md), and float32 is exact.
                q, k, v = q.float(), k.float(), v.float()
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1,
                                               enable_gqa=self.kv_heads != self.heads).to(x.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(index):
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                 cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.shared_expert_intermediate_size)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (`model.*` in a checkpoint)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                deepstack: list[torch.Tensor] | None = None, visual_mask: torch.Tensor | None = None,
                return_hidden_layer: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """h: (B, S, H) input embeddings; positions: (B, S) or (3, B, S), default = next cache slots.

        deepstack: per-layer visual features (n_visual, H) added at `visual_mask` (B, S) after layers 0..k-1
        (Qwen3-Omni DeepStack). Returns the normed hidden states (B, S, H).
        return_hidden_layer=k also returns transformers' `hidden_states[k]` as a pair (normed, hidden_k): k=0 the
        input embeddings, k=1..L-1 layer k-1's output before any DeepStack addition, k=L the normed output (the
        Qwen3-Omni talker reads the thinker at `accept_hidden_layer`).
        """
        B, S, _ = h.shape
        if positions is None:
            positions = cache.positions(S) if cache is not None else torch.arange(S, device=h.device).expand(B, S)
        cos, sin = self.rotary(positions)
        cos, sin = rotary_tables(cos.to(h.dtype), sin.to(h.dtype))
        mask = None
        if cache is not None:
            plan = cache.begin(S)
            empty, one_offset = plan.end == S, plan.start is not None
            if not (empty or (S == 1 and one_offset)):  # else plain causal (or no) masking is exact
                mask = cache.attention_mask(S)
        taken = h if return_hidden_layer == 0 else None
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, mask)
            if return_hidden_layer == i + 1:
                taken = h
            if deepstack is not None and i < len(deepstack):
                h = h.index_put((visual_mask,), deepstack[i].to(h.dtype), accumulate=True)
        if cache is not None:
            cache.advance(S)
        out = self.norm(h)
        if return_hidden_layer is None:
            return out
        return out, (out if return_hidden_layer == len(self.layers) else taken)


class CausalLM(nn.Module):
    """A text-only causal LM (`Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `Qwen3MoeForCausalLM`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not once quantized (quant.py)
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def decoder(self) -> TextModel:
        return self.model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, vocab)."""
        return self.lm_head(self.model(self.model.embed_tokens(input_ids), positions, cache))

    # --- the runner interface used by Assistant / generate -------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight  # float even when the linears are quantized
        return KVCache(self.cfg.num_hidden_layers, batch, max_len, self.cfg.num_key_value_heads,
                       self.cfg.head_dim, p.dtype, p.device)

    def prompt(self, inputs: dict, start: int = 0) -> Prompt:
        """Prompt tokens [start:] embedded: one row of a prefill (positions: the cache's next slots)."""
        emb = self.model.embed_tokens
        return Prompt(emb(inputs["input_ids"][:, start:].to(emb.weight.device)))

    def prefill(self, inputs: dict, cache: KVCache, start: int = 0) -> torch.Tensor:
        """Run prompt tokens [start:] (the first `start` are already in `cache`); last logits (1, V)."""
        return prefill_prompts(self, [self.prompt(inputs, start)], [cache])

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B,) -> next logits (B, V)."""
        emb = self.model.embed_tokens  # float even when the linears are quantized (lm_head may be int8)
        h = self.model(emb(tokens[:, None].to(emb.weight.device)), None, cache)
        return self.lm_head(h[:, -1])
