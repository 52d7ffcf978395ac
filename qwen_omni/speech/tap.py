"""What the talker reads from the thinker, recorded while the thinker runs its normal generation loop.

Spoken replies go through `Assistant._stream` and `generate()` like text replies; nothing runs the thinker a
second time. A `ThinkerRecorder` passed to `_stream(tap=...)` hooks the thinker's modules for one request:
* `model.embed_tokens` (forward hook): the ids of every call and their embeddings; a decode step's call is the
  token the thinker CONSUMED (fed back), which is what both talkers read per step (its embedding; the
  Qwen2.5 talker also its hidden state);
* the hidden-state source (`hidden_layer` = k, transformers' `hidden_states[k]`): k = 0 the decoder's input,
  0 < k < L the output of layer k-1 (before Qwen3's DeepStack addition, which happens outside the layer),
  k = L the final-normed output. Qwen2.5 reads k = L at every prompt position; Qwen3 reads its
  `accept_hidden_layer` at multimodal positions.

Multi-turn reuse. The prefix cache lets a follow-up turn prefill only its new tokens, so the hidden states of
the reused prefix are not computed again. The recorder therefore leaves its rows (one per cached position,
aligned with the cache's token key) in the prefix cache's `extra` slot (`HiddenRows`); the next spoken turn
picks them up. When they are missing (the cached state came from a text-only turn) the recorder asks for a
full prefill instead (`reusable` returns 0), which is always exact.

Hooks exist only between `begin` and `end`, both called by `_stream` while it holds the assistant's lock (a
batch scheduler running the same module at the same time would be recorded too: spoken replies are batch 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class HiddenRows:
    """Hidden states (N, H) at `layer` of the first N cached positions (N = the cache's token-key length)."""
    layer: int
    rows: torch.Tensor


class ThinkerRecorder:
    def __init__(self, thinker: torch.nn.Module, hidden_layer: int):
        self.thinker, self.layer = thinker, hidden_layer
        self.inputs: dict | None = None  # the processor's output for this request
        self.prompt_rows: list[torch.Tensor] = []  # (n_i, H) pieces: reused memo rows, then the prefill
        self.prompt_ready = False  # the prefill has run
        self.fed: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # per decode step: (id, embed (1, 1, H), hidden)
        self.taken = 0  # `fed` entries already handed out by `take_fed`
        self._ids: torch.Tensor | None = None
        self._embeds: torch.Tensor | None = None
        self._hooks: list = []

    # ---- the `tap` interface of Assistant._stream ------------------------------------------------------------
    def reusable(self, extra: object, reused: int) -> int:
        """How many of the `reused` cached prompt tokens may be reused: all if `extra` has their rows, else 0."""
        ok = isinstance(extra, HiddenRows) and extra.layer == self.layer and extra.rows.shape[0] >= reused
        return reused if ok else 0

    def begin(self, inputs: dict, extra: object, reused: int) -> None:
        """Before the prefill of prompt tokens [reused:]: take the reused rows from `extra`, install the hooks."""
        self.inputs = inputs
        if reused:
            self.prompt_rows.append(extra.rows[:reused])
        m = self.thinker.model
        self._hooks.append(m.embed_tokens.register_forward_hook(self._on_embed))
        L = len(m.layers)
        if self.layer == 0:
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args: self._on_hidden(args[0])))
        elif self.layer < L:
            self._hooks.append(m.layers[self.layer - 1].register_forward_hook(lambda mod, a, out: self._on_hidden(out)))
        else:
            self._hooks.append(m.register_forward_hook(lambda mod, a, out: self._on_hidden(out)))
        return reused

    def end(self, held: int) -> HiddenRows | None:
        """Remove the hooks; the rows of the first `held` positions, for the prefix cache (None if incomplete)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        rows = self.prompt_rows + [hidden[0] for _, _, hidden in self.fed]
        if not rows:
            return None
        rows = torch.cat(rows)
        return HiddenRows(self.layer, rows[:held]) if rows.shape[0] >= held else None

    # ---- hooks ------------------------------------------------------------------------------------------------
    def _on_embed(self, module, args, output) -> None:
        self._ids, self._embeds = args[0], output

    def _on_hidden(self, hidden: torch.Tensor) -> None:
        """One thinker forward: the prefill (first call) or one decode step (a fed token)."""
        hidden = hidden.detach()
        if not self.prompt_ready:
            self.prompt_rows.append(hidden[0])
            self.prompt_ready = True
        else:
            self.fed.append((int(self._ids.reshape(-1)[0]), self._embeds.detach(), hidden))

    # ---- what the talkers read --------------------------------------------------------------------------------
    def prompt_hidden(self) -> torch.Tensor:
        """(1, n, H) hidden states of the whole prompt (reused rows + this request's prefill)."""
        return torch.cat(self.prompt_rows)[None]

    def token_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """The thinker's input embeddings of `ids` (plain lookup, without triggering the hook)."""
        w = self.thinker.model.embed_tokens.weight
        return F.embedding(ids.to(w.device), w)

    def take_fed(self, limit: int | None = None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Fed tokens not handed out yet (at most `limit`)."""
        end = len(self.fed) if limit is None else min(len(self.fed), self.taken + limit)
        out, self.taken = self.fed[self.taken:end], end
        return out
