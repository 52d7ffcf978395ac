"""Int8 weight-only quantization for CPU decoding: `quantize_int8(model)`.

Why: a decode step reads every weight once for one row of activations, so its speed is the GEMV kernels' speed
per weight, capped by memory bandwidth. The int8 kernel is compute-bound, not bandwidth-bound, so int8 buys less
than 2x over our bf16 per weight (plus half the memory); the measurements are in docs/cpu-kernels.md.

Scheme: symmetric, per output channel. For a weight W (N, K): s = max|W[n]| / 127, q = round(W / s) clamped to
[-127, 127] (int8), y = (x @ q^T) * s. The scales are stored in bfloat16 (what the kernel takes) and the
integers are computed against the *rounded* scale, so the bf16 rounding of s is not a systematic per-row gain
error; the one element that may then exceed 127 by < 0.5 step is clamped (an error below one rounding step).

Kernel facts for torch 2.13 CPU (they decide the code below; timings in docs/cpu-kernels.md):
- `_weight_int8pack_mm(x (M, K), q (N, K) int8 contiguous, scales (N,))` with x and scales of one dtype;
  bfloat16 is the fast one (fp32 / fp16 activations run far slower), so we always compute in bf16 and cast
  the output back to the model's dtype.
- K must be a multiple of 16 (other K segfault), so such Linears stay in float.
- Its time grows steeply past 16 rows, so above `GEMM_ROWS` rows (prefill) the weight is dequantized to bf16 on
  the fly (transient, one matrix at a time) and the bf16 GEMM runs. Int8 prefill is therefore slower than bf16
  prefill; it is a decode-speed (and memory) mode.

What is quantized: every nn.Linear, and the stacked MoE experts (per expert and output row). What is not:
MoE routers (`gate`, `shared_expert_gate`: tiny, and their output is a discrete top-k choice that a small error
can flip), the embedding (a lookup reads one row per token, int8 would save nothing). A tied lm_head: in bf16 it
stays on the embedding's tensor, since bf16 `mv` reads it as fast as the int8 kernel reads an int8 copy and the
copy would cost memory and accuracy; in other dtypes it gets its own int8 copy
(the embedding keeps the float tensor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts, SparseMoE

COMPUTE = torch.bfloat16  # the activation dtype _weight_int8pack_mm is fast for on CPU
GEMM_ROWS = 16  # above this many rows, dequantize + bf16 GEMM beats the int8 GEMV kernel


def quantize_rows(w: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) float -> (q int8 (..., N, K), scales bf16 (..., N)); per last-dim row, symmetric.

    Done `chunk` rows at a time so the float32 temporaries stay small (a 151936-row lm_head would need ~2 GB).
    """
    rows = w.reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(rows.shape[0], dtype=COMPUTE, device=w.device)
    for i in range(0, rows.shape[0], chunk):
        wf = rows[i:i + chunk].float()
        s = (wf.abs().amax(dim=-1) / 127).clamp(min=1e-10).to(COMPUTE)  # rounded first: q is exact for it
        q[i:i + chunk] = torch.round(wf / s.float()[:, None]).clamp_(-127, 127)
        scales[i:i + chunk] = s
    return q.reshape(w.shape), scales.reshape(w.shape[:-1])


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) any float dtype, q (N, K) int8, scales (N,) bf16 -> (M, N) in bf16."""
    x = x.to(COMPUTE)
    if x.shape[0] > GEMM_ROWS:
        return F.linear(x, q.to(COMPUTE) * scales[:, None])
    return torch._weight_int8pack_mm(x.contiguous(), q, scales)


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights: buffers `qweight` (N, K) int8, `scales` (N,) bf16, float bias."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_rows(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Experts(nn.Module):
    """Stacked experts with int8 weights: gate_up (E, 2I, H) and down (E, H, I), scales per expert and row."""

    def __init__(self, experts: Experts):
        super().__init__()
        q, s = quantize_rows(experts.gate_up_proj.detach())
        self.register_buffer("gate_up_q", q)  # (E, 2I, H) int8
        self.register_buffer("gate_up_scales", s)  # (E, 2I) bf16
        q, s = quantize_rows(experts.down_proj.detach())
        self.register_buffer("down_q", q)  # (E, H, I) int8
        self.register_buffer("down_scales", s)  # (E, H) bf16

    @property
    def num_experts(self) -> int:
        return self.gate_up_q.shape[0]

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (n, H) -> (n, H) in x.dtype; same math as `Experts.run`."""
        return self._run(e, x).to(x.dtype)

    def run_groups(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every expert on its group: xs (P, H) sorted by expert, sizes[e] rows for expert e -> (P, H) in xs.dtype.

        The same values as `run` on each group, concatenated; but the casts to and from the kernel's bf16 happen
        once for all groups and each output lands in place (no cat), which matters when every expert gets only a
        row or two (timing in docs/cpu-kernels.md)."""
        xb = xs.to(COMPUTE)
        ys = torch.empty_like(xb)
        end = 0
        for e, n in enumerate(sizes):
            if n:
                ys[end:end + n] = self._run(e, xb[end:end + n])
                end += n
        return ys.to(xs.dtype)

    def _run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, H) in bf16."""
        gate, up = int8_matmul(x, self.gate_up_q[e], self.gate_up_scales[e]).chunk(2, dim=-1)
        return int8_matmul(F.silu(gate) * up, self.down_q[e], self.down_scales[e])


def quantizable(module: nn.Module) -> bool:
    """The kernel needs K % 16 == 0 (K = the reduced dim, the last one of every weight)."""
    if isinstance(module, Experts):
        return module.gate_up_proj.shape[-1] % 16 == 0 and module.down_proj.shape[-1] % 16 == 0
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace, in place, every eligible nn.Linear by `Int8Linear` and every `Experts` by `Int8Experts`,
    except under the submodules named in `skip` (a Thinker's encoders: they run once per media, on many rows,
    where int8 would only add a dequantization).

    One module at a time, so peak memory is the float model plus one matrix. Returns `model`. Callers that
    read a dtype or device off `lm_head.weight` should read it off the embedding instead (it stays float).
    """
    keep = {id(r) for m in model.modules() if isinstance(m, SparseMoE)
            for r in (m.gate, m.shared_expert_gate) if r is not None}  # routers
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    keep |= {id(m) for m in model.modules()
             if isinstance(m, nn.Linear) and id(m.weight) in tables and m.weight.dtype == COMPUTE}  # tied bf16 head
    for name, module in list(model.named_modules()):
        if id(module) in keep or not quantizable(module) or name.split(".")[0] in skip:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(module, Experts):
            setattr(owner, attr, Int8Experts(module))
        else:
            setattr(owner, attr, Int8Linear(module))
    # What stays float (embedding, norms, routers) may still be a view of the checkpoint's memory map (the loader
    # keeps safetensors' lazy mmap when no dtype conversion is needed): a private copy lets that map close, so
    # the process does not keep every page of the float checkpoint that quantization touched (RSS).
    for p in model.parameters():
        p.data = p.data.clone()
    return model

