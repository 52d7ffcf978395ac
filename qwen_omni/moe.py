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

`Linear` / `linear` (used by the whole decoder): nn.Linear, with the CPU kernel picked for the decode step.
- float32: torch sends it to MKL's GEMM, which on AMD CPUs runs a slow generic path: on an AMD EPYC (AVX512) a
  151936x1024 lm_head row took 36 ms (17 GB/s, one thread's worth) and 8 rows 107 ms; oneDNN's
  `mkldnn::_linear_pointwise` on the same plain weight took 20 and 36 ms (1.0x-3x faster on every matrix of
  >= 2^18 weights, 1-512 rows). Below that size its ~20 us call overhead loses to MKL (7 vs 27 us on 256x256).
  On an Intel Xeon, where MKL has no slow path, MKL still won at 2^18 (the embedded model's 1024x256 lm_head: 17
  vs 27 us on 1 row, 41 vs 85 us on 8) and oneDNN from about 2^22 (4096x1024: 553 vs 594 us). So only weights of
  at least 2^20 go there (`ONEDNN_MIN_WEIGHTS`; on AMD, matrices of 2^18-2^20 weights go back to MKL, a range
  where the AMD gain was not measured apart), and only without autograd (it has no backward).
  bfloat16 `F.linear` already runs on oneDNN.
- one bfloat16 row may run as `torch.mv`: on one AVX512-BF16 machine torch's GEMV kernel was 1.3-1.4x faster per
  weight than oneDNN (8.7 vs 6.5 G weights/s on the 0.6B's matrices); on an AMD EPYC it was 2-4x *slower*
  (2.9 vs 11.8 G weights/s on 2048x2048). So `gemv_wins()` times both once per process (a few ms). A bias goes
  in through `addmv` (rounded once, like the fused GEMM). fp16 `mv` is slower: fp16 keeps `F.linear`.
"""
from __future__ import annotations

import itertools
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn


_GROUPED_MM = hasattr(F, "grouped_mm")  # recent torch only; see SparseMoE._grouped_kernel
ONEDNN_MIN_WEIGHTS = 1 << 20  # float32 weights at least this big use oneDNN on x86 CPUs (see the module docstring)
# x86 builds of torch ship oneDNN; elsewhere (ARM) it may be absent or built on another backend: keep F.linear.
_ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_onednn_linear = torch.ops.mkldnn._linear_pointwise if _ONEDNN else None  # (x (..., K), w (N, K), bias, ...)


_GEMV_WINS: bool | None = None


def gemv_wins() -> bool:
    """Whether `torch.mv` beats `F.linear` for one bf16 row on this CPU (timed once, on a 1024x1024 matrix)."""
    global _GEMV_WINS
    if _GEMV_WINS is None:
        g = torch.Generator().manual_seed(0)  # never the global RNG: callers' seeded streams stay as they were
        w = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
        v = torch.randn(1024, generator=g).to(torch.bfloat16)

        def best(f) -> float:
            f()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(4):
                    f()
                times.append(time.perf_counter() - t)
            return min(times)

        _GEMV_WINS = best(lambda: torch.mv(w, v)) < 0.9 * best(lambda: F.linear(v[None], w))
    return _GEMV_WINS


def needs_autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of x and weight must record a backward (oneDNN's `_linear_pointwise` has none)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K), weight (N, K), through the faster CPU kernel for the case (module
    docstring): oneDNN for big float32 weights at inference, the GEMV kernel for one bf16 row where it wins."""
    # Same dtypes only: under CPU autocast (training with --bf16) the weight stays fp32 and F.linear casts.
    if x.device.type == "cpu" and x.dtype == weight.dtype:
        if x.dtype == torch.float32 and _onednn_linear is not None and weight.numel() >= ONEDNN_MIN_WEIGHTS \
                and weight.is_contiguous() and not needs_autograd(x, weight):
            return _onednn_linear(x, weight, bias, "none", [], "")  # "none": no fused activation
        if x.dtype == torch.bfloat16 and x.numel() == x.shape[-1] and gemv_wins():
            v = x.reshape(-1)
            y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)  # bias inside: one rounding
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        `gate_up_proj[e]` per expert makes backward write a zero-filled copy of the whole stack per expert (measured:
        fill_ took 15% of a training step)."""
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
        kernel, and on CUDA it wants bf16 on recent GPUs. Measured on one thread of an Intel Xeon (embedded model's
        MoE, 8 experts top-2, H = I = 256; a busy machine, interleaved): a layer on 8 rows 520 -> 394 us (vs all
        experts on every row), on 64 rows 1062 -> 935 us (vs the loop)."""
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
