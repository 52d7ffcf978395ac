"""Generation as a Python generator built from `prefill`, `decode_step` and `sample`.

The model side is two callables: `prefill()` runs the prompt (or the part of it not already cached) and
returns the last position's logits (B, V); `decode_step(tokens)` feeds one token per row and returns the next
logits. Everything else (stop tokens, budgets, penalties, the seeded generator) lives here, so text models,
both Omni thinkers and the batch scheduler share one loop.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from .sampling import SamplingParams, apply_repetition_penalty, sample


def generate(prefill: Callable[[], torch.Tensor], decode_step: Callable[[torch.Tensor], torch.Tensor], *,
             context_ids: torch.Tensor, max_new_tokens: int, stop_ids: Iterable[int], params: SamplingParams,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids (batch 1) until a stop token (not yielded) or `max_new_tokens`.

    context_ids (1, n): the prompt ids, used by the repetition penalty together with what is generated.
    """
    stop = set(int(s) for s in stop_ids)
    seen = context_ids
    logits = prefill()
    for i in range(max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
        tok = sample(logits, params, generator)  # (1,)
        t = int(tok[0])
        if t in stop:
            return
        yield t
        if i == max_new_tokens - 1:
            return  # the budget is spent: no need to compute logits nobody will read
        if params.repetition_penalty != 1.0:
            seen = torch.cat([seen, tok[:, None].to(seen.device)], dim=1)
        logits = decode_step(tok)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def pull_stream(stream, items: Iterable, produce: Callable[[], Iterable], push: Callable) -> Iterator:
    """Drive a pull-based producer (the talkers): yield what it has, feed it the next item only when it needs
    more, and call `stream.finish()` when the items run out. Stops when `stream.done`."""
    it = iter(items)
    while True:
        yield from produce()
        if stream.done:
            return
        nxt = next(it, None)
        if nxt is None:
            stream.finish()
        else:
            push(nxt)
