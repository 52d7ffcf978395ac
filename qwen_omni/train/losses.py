"""The trainer's language-model loss and the MoE load-balancing loss (router logits kept by forward hooks).

`lm_loss` is next-token cross-entropy on the labelled positions only (`train_data.IGNORE` elsewhere);
`RouterLogits` keeps every MoE router's logits of a training forward and turns them into the Switch-Transformer
balance loss. The attention supervision of object questions is in `train_binding`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.moe import SparseMoE
from .data import IGNORE


class RouterLogits:
    """Forward hooks on every MoE router (`mlp.gate`) that keep its logits for the load-balancing loss."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.top_k = 2
        self.handles = []
        for m in model.modules():
            if isinstance(m, SparseMoE):
                self.top_k = m.top_k
                self.handles.append(m.gate.register_forward_hook(self._keep))

    def _keep(self, module, inputs, out) -> None:
        if module.training and torch.is_grad_enabled():  # never an eval's or a generation's routing
            self.logits.append(out)

    def aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Switch-Transformer balance loss E * sum_e f_e * P_e, averaged over layers (1.0 = perfectly even)."""
        if not self.logits:
            return torch.zeros(())
        total = 0.0
        for lg in self.logits:
            lg = lg.reshape(-1, lg.shape[-1]).float()
            if token_mask is not None and token_mask.numel() == lg.shape[0]:
                lg = lg[token_mask.reshape(-1)]
            probs = lg.softmax(-1)
            E = probs.shape[-1]
            top = probs.topk(self.top_k, dim=-1).indices
            frac = F.one_hot(top, E).float().sum(1).mean(0) / self.top_k
            total = total + E * (frac * probs.mean(0)).sum()
        self.logits.clear()
        return total / len(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def lm_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """hidden (B, S, H) final decoder states, labels (B, S) -> (mean cross-entropy of the labelled next tokens, their
    count). The head runs on the labelled positions only: answers are a small share of a batch's positions, and
    the head plus log-softmax over every position is a large part of a training step (docs/training-notes.md)."""
    tgt = labels[:, 1:]
    keep = tgt != IGNORE  # (B, S-1)
    logits = head(hidden[:, :-1][keep]).float()  # (n, V)
    return F.cross_entropy(logits, tgt[keep]), int(keep.sum())
