"""Sparse Mixture-of-Experts feed-forward block (Qwen3-MoE / Qwen3-Omni thinker and talker).

Router: logits = x @ gate^T, softmax in float32, top-k, optional renormalisation (`norm_topk_prob`), weights cast
back to the activation dtype. Experts are stacked like transformers v5 keeps them in memory:
`experts.gate_up_proj` (E, 2I, H) with gate rows first and `experts.down_proj` (E, H, I); the loader stacks the
per-expert tensors found on disk. Only the chosen experts run: token/expert pairs are sorted by expert and each
active expert runs once on its group of tokens (a loop over active experts, never over tokens).
An optional shared expert with a sigmoid gate is added (the Qwen3-Omni talker).
`forward_reference` is the slow per-expert loop used by the tests as ground truth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, H) -> (n, H)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, moe_inter: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 shared_inter: int = 0):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, moe_inter)
        self.shared_expert = MLP(hidden, shared_inter) if shared_inter else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_inter else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> (weights (N, k) in x.dtype, expert ids (N, k))."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        w, idx = self.route(x)
        flat = idx.reshape(-1)  # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.experts.gate_up_proj.shape[0]).tolist()
        token_of = order // self.top_k  # token index of each sorted pair
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            toks = token_of[start:start + n]
            y = self.experts.run(e, x[toks]) * w.reshape(-1)[pairs, None]
            out.index_add_(0, toks, y)
            start += n
        return self._add_shared(x, out).reshape(shape)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow but obvious: every expert, a dense mask of its tokens. Test reference only."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.experts.gate_up_proj.shape[0]):
            for slot in range(self.top_k):
                sel = idx[:, slot] == e
                if sel.any():
                    out[sel] += w[sel, slot, None] * self.experts.run(e, x[sel])
        return self._add_shared(x, out).reshape(shape)

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
