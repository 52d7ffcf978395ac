"""Sparse Mixture-of-Experts feed-forward block (Qwen3-MoE / Qwen3-Omni thinker and talker).

Router: logits = x @ gate^T, softmax in float32, top-k, optional renormalisation (`norm_topk_prob`), weights cast
back to the activation dtype. Experts are stacked like transformers v5 keeps them in memory:
`experts.gate_up_proj` (E, 2I, H) with gate rows first and `experts.down_proj` (E, H, I); the loader stacks the
per-expert tensors found on disk. Only the chosen experts run: token/expert pairs are sorted by expert and each
active expert runs once on its group of tokens: at CPU inference one `F.grouped_mm` per projection over all the
groups, otherwise (autograd, int8 experts, GPUs) a loop over active experts, never over tokens.
A single token (the decode step) takes a short path: its k experts in ascending id order, with no argsort /
bincount / gather / index_add, but the same products and additions, in the same order, as the grouped loop
(`F.grouped_mm` may block its products differently: equal to float rounding).
Anything with `num_experts` and `run(e, x)` can stand in for `Experts` (e.g. `quant.Int8Experts`, which also has
`run_groups(xs, sizes)` for the whole sorted batch).
An optional shared expert with a sigmoid gate is added (the Qwen3-Omni talker).
`forward_reference` is the slow per-expert loop used by the tests as ground truth.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, Linear, linear, needs_autograd

_GROUPED_MM = hasattr(F, "grouped_mm")  # recent torch only; see SparseMoE._grouped_kernel


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def unbound(self):
        """`run` for training: the stacks split once per forward, so backward stacks each gradient once. Indexing
        `gate_up_proj[e]` per expert makes backward write a zero-filled copy of the whole stack per expert (a
        noticeable share of a training step; docs/training-notes.md)."""
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        return lambda e, x: swiglu(x, gate_up[e], down[e])

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, H) -> (n, H)."""
        return swiglu(x, self.gate_up_proj[e], self.down_proj[e])


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: x (n, H), gate_up (2I, H), down (H, I) -> (n, H)."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, moe_inter: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 shared_inter: int = 0):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, moe_inter)
        self.shared_expert = MLP(hidden, shared_inter) if shared_inter else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared_inter else None

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
        if x.shape[0] == 1:
            return self._add_shared(x, self._one_token(x, w[0], idx[0])).reshape(shape)
        flat = idx.reshape(-1)  # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)
        token_of = order // self.top_k  # token index of each sorted pair
        xs = x[token_of]  # (N*k, H): the pairs' inputs, grouped by expert
        counts = torch.bincount(flat, minlength=self.experts.num_experts)  # (E,)
        if self._grouped_kernel(xs):
            ys = self._run_grouped(xs, counts.cumsum(0).to(torch.int32))
        elif hasattr(self.experts, "run_groups"):  # int8 experts: their own loop (quant.Int8Experts.run_groups)
            ys = self.experts.run_groups(xs, counts.tolist())
        else:  # a loop over the active experts; each group is a slice of xs, not a gather
            sizes = counts.tolist()
            if needs_autograd(xs, self.experts.gate_up_proj):  # training: split once, so backward joins once
                run = self.experts.unbound()
                ys = torch.cat([run(e, part) for e, part in enumerate(xs.split(sizes)) if sizes[e]])
            else:
                ys = torch.cat([self.experts.run(e, xs[end - n:end])
                                for e, (n, end) in enumerate(zip(sizes, itertools.accumulate(sizes))) if n])
        # one weighted scatter-add in expert order: the additions of a per-expert loop, in the same order
        out = torch.zeros_like(x).index_add_(0, token_of, ys * w.reshape(-1)[order, None])
        return self._add_shared(x, out).reshape(shape)

    def _grouped_kernel(self, xs: torch.Tensor) -> bool:
        """Whether the sorted pairs can go through `F.grouped_mm` (one call per projection for all experts) instead
        of a Python loop of ~4 ops per active expert. CPU inference on float stacked experts only: the CPU kernel has
        no working backward (torch 2.13: "Invalid strides/sizes" on an empty group), int8 experts have no such
        kernel, and on CUDA it wants bf16 on recent GPUs. Where it runs it beat both the all-experts path and the
        loop (timings in docs/cpu-kernels.md)."""
        ex = self.experts
        return (_GROUPED_MM and xs.device.type == "cpu" and isinstance(ex, Experts)
                and xs.dtype == ex.gate_up_proj.dtype and xs.dtype in (torch.float32, torch.bfloat16)
                and not needs_autograd(xs, ex.gate_up_proj)
                and all(d * xs.element_size() % 16 == 0 for d in ex.down_proj.shape[1:]))  # the kernel's stride rule

    def _run_grouped(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """xs (P, H) sorted by expert, ends (E,) int32 cumulative group ends -> (P, H), expert by expert."""
        ex = self.experts
        gate, up = F.grouped_mm(xs, ex.gate_up_proj.transpose(1, 2), offs=ends).chunk(2, dim=-1)  # (P, I) each
        return F.grouped_mm(F.silu(gate) * up, ex.down_proj.transpose(1, 2), offs=ends)

    def _one_token(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (1, H), w (k,), idx (k,) -> (1, H). Ascending expert order, zeros + y0 + y1 ... like index_add_."""
        out = torch.zeros_like(x)
        for slot, e in sorted(enumerate(idx.tolist()), key=lambda se: se[1]):  # one host sync for the k ids
            out += self.experts.run(e, x) * w[slot]
        return out

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow but obvious: every expert, a dense mask of its tokens. Test reference only."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.experts.num_experts):
            for slot in range(self.top_k):
                sel = idx[:, slot] == e
                if sel.any():
                    out[sel] += w[sel, slot, None] * self.experts.run(e, x[sel])
        return self._add_shared(x, out).reshape(shape)

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
