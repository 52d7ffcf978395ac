"""Prefill one or several prompts in one decoder pass (`Assistant` prefills one; the batch scheduler admits the
newcomers that arrived together as one group).

Why a group: on a CPU a short prompt's prefill costs about what the weights cost to touch, not what its tokens
cost (int8 experts are even dequantized per call, quant.py), so eight 30-token prompts prefilled one by one cost
nearly eight times one of them, and the eighth newcomer waited for the seven before it. As one (8, S) batch the
weights are read once.

How: each prompt is embedded on its own first (`model.prompt(inputs, start)`: its media encoded and its
placeholders checked, so a bad one fails only its own request) into a `Prompt`. A single prompt then runs in its
own batch-1 cache, exactly as before. Several are right-padded to the longest and run as one batch over a
temporary cache whose row i starts with prompt i's reused prefix (its batch-1 cache's valid positions). Right
padding is exact under causal attention: a real token never attends to a later slot, and each row's length is
set back to its real end afterwards, so the pad positions are never visible and later writes overwrite them.
Each row's new positions are copied back into the prompt's own batch-1 cache, which is what the scheduler keeps
for prefix reuse. Shapes: embeds (1, S_i, H) per prompt; the group runs on (k, S, H), S = max S_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class Prompt:
    """A prompt's not-yet-cached tokens, embedded: what one row of a prefill needs."""
    embeds: torch.Tensor  # (1, S, H) token embeddings with media features scattered in
    positions: torch.Tensor | None = None  # (3, 1, S) MRoPE positions; None: the cache's next slots
    deepstack: list[torch.Tensor] | None = None  # per level (n_visual, H), Qwen3-Omni DeepStack
    visual_mask: torch.Tensor | None = None  # (1, S) where the DeepStack features go
    rope_delta: torch.Tensor | None = None  # (1, 1) TMRoPE offset of the text after the prompt

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


def prefill_prompts(model, prompts: list[Prompt], caches: list[KVCache]) -> torch.Tensor:
    """Run each prompt after its cache's valid positions; fill the caches; return the last logits (k, V)."""
    if len(prompts) == 1:
        p, cache = prompts[0], caches[0]
        if p.rope_delta is not None:
            cache.rope_deltas[:] = p.rope_delta.to(cache.rope_deltas)
        h = model.model(p.embeds, p.positions, cache, p.deepstack, p.visual_mask)
        return model.lm_head(h[:, -1])
    starts = [int(c.lengths[0]) for c in caches]
    S = max(p.length for p in prompts)
    group = model.new_cache(len(prompts), max(starts) + S)
    for i, (c, n) in enumerate(zip(caches, starts)):
        for dst_k, dst_v, k, v in zip(group.k, group.v, c.k, c.v):
            dst_k[i, :, :n] = k[0, :, :n]
            dst_v[i, :, :n] = v[0, :, :n]
        group.lengths[i] = n
        if prompts[i].rope_delta is not None:
            group.rope_deltas[i] = prompts[i].rope_delta.reshape(-1).to(group.rope_deltas)
    pad = [S - p.length for p in prompts]
    embeds = torch.cat([F.pad(p.embeds, (0, 0, 0, n)) for p, n in zip(prompts, pad)])  # zeros after the end
    positions = None
    if prompts[0].positions is not None:  # a pad's position is never seen: repeat the row's last one
        positions = torch.cat([torch.cat([p.positions, p.positions[..., -1:].expand(-1, -1, n)], dim=-1)
                               for p, n in zip(prompts, pad)], dim=1)  # (3, k, S)
    deep = vmask = None
    levels = max((len(p.deepstack) for p in prompts if p.deepstack is not None), default=0)
    if levels:  # features of all rows in row-major order, matching the (k, S) mask's True positions
        vmask = torch.cat([F.pad(p.visual_mask, (0, n)) if p.deepstack is not None else
                           torch.zeros(1, S, dtype=torch.bool, device=embeds.device) for p, n in zip(prompts, pad)])
        deep = [torch.cat([p.deepstack[lv] for p in prompts if p.deepstack is not None]) for lv in range(levels)]
    h = model.model(embeds, positions, group, deep, vmask)  # (k, S, H)
    last = torch.tensor([p.length - 1 for p in prompts], device=h.device)
    logits = model.lm_head(h[torch.arange(len(prompts), device=h.device), last])  # (k, V)
    for i, (c, n, p) in enumerate(zip(caches, starts, prompts)):
        end = n + p.length
        for k, v, src_k, src_v in zip(c.k, c.v, group.k, group.v):
            k[0, :, n:end] = src_k[i, :, n:end]
            v[0, :, n:end] = src_v[i, :, n:end]
        c.lengths[0] = end
        if p.rope_delta is not None:
            c.rope_deltas[:] = p.rope_delta.to(c.rope_deltas)
    return logits
