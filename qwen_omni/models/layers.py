"""Dense layers of every decoder: `Linear` / `linear` (nn.Linear with the CPU kernel picked per case) and the
SwiGLU `MLP`.

Why a kernel choice: for float32, torch sends `F.linear` to MKL's GEMM, which on AMD CPUs takes a slow generic
path; oneDNN's `mkldnn::_linear_pointwise` on the same plain weight is faster for large matrices and slower for
small ones (its call overhead), so only weights of at least `ONEDNN_MIN_WEIGHTS` go there, and only without
autograd (it has no backward). bfloat16 `F.linear` already runs on oneDNN. For one bfloat16 row, torch's GEMV
kernel (`torch.mv`) is faster than oneDNN on some CPUs and slower on others, so `gemv_wins()` times both once
per process (a few ms); a bias goes in through `addmv` (rounded once, like the fused GEMM). fp16 `mv` is
slower: fp16 keeps `F.linear`. The measurements behind these thresholds are in docs/cpu-kernels.md.
"""
from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_WEIGHTS = 1 << 20  # float32 weights at least this big use oneDNN on x86 CPUs
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
