"""Int8 weight-only quantization (qwen_omni/models/quant.py) and the single-token MoE path (qwen_omni/models/moe.py).

Error budget for the int8 model test. Per-output-channel symmetric rounding leaves each weight within half a
step s/2 = max|w_row|/254 of its value: a uniform error of std s/sqrt(12). For the tiny checkpoints' Gaussian rows
(K = 64..96, max|w| ~ 2.5 std) that is ~0.55% of the weights' std, so each matmul output moves by ~0.55%
(relative, the errors of K terms add in quadrature like the terms themselves). The int8 kernel also rounds its
activations and outputs to bfloat16 (2^-9 ~ 0.2% each). Three layers of 7 matmuls plus the head, errors adding
in quadrature through the residual stream: sqrt(22) * 0.6% ~ 3% relative error of the logits (measured: 3.6%);
we allow 6%. For scale, the same models in bfloat16 are at 2.2%, in float16 at 0.3%.
MoE routing is discrete: a perturbed hidden state can swap an expert, a jump no weight rounding bound covers (with
top-2 of 8 renormalised, the tiny MoE in plain bfloat16 is already at 4.6%, int8 at 12%). So the whole-model MoE
case uses un-normalised top-k, whose swaps happen where the two experts' weights are equal and small, and the
int8 experts are checked exactly at block level, where the router sees the same input in both runs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen_omni.models import layers
from qwen_omni.models import moe as moe_mod
from qwen_omni.models.registry import build_model
from qwen_omni.models.moe import SparseMoE
from qwen_omni.models.quant import GEMM_ROWS, Int8Experts, Int8Linear, quantize_int8, quantize_rows

from .tiny_text import make_checkpoint


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------ int8 primitives --
def test_rounding_is_within_half_a_step():
    w = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (48,)
    assert int(q.abs().max()) <= 127
    err = (q.float() * s.float()[:, None] - w).abs()
    # half a step; the clamp of a bf16-rounded-down scale can add < 1/256 of a step*127 at the row maximum
    assert bool((err <= s.float()[:, None] * (0.5 + 127 / 256) + 1e-12).all())
    assert (err.amax(1) / w.abs().amax(1)).max() < 0.01


@pytest.mark.parametrize("rows", [1, 3, GEMM_ROWS + 5])  # the int8 GEMV kernel, and the dequantize+GEMM path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_matches_its_dequantized_weight(rows, dtype):
    lin = nn.Linear(64, 40, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(2, rows, 64, dtype=dtype)
    want = F.linear(x.float(), q.qweight.float() * q.scales.float()[:, None], lin.bias.float())
    got = q(x)
    assert got.dtype == dtype and got.shape == (2, rows, 40)
    assert rel(got, want) < 0.01  # only bfloat16 rounding of activations and outputs
    assert rel(got, lin(x.float()).detach()) < 0.02  # and the weight rounding on top


def test_odd_in_features_stay_float():
    """The int8 kernel needs K % 16 == 0 (it crashes otherwise), so such a Linear is left alone."""
    m = nn.Sequential(nn.Linear(40, 32), nn.Linear(32, 8))
    quantize_int8(m)
    assert isinstance(m[0], nn.Linear) and isinstance(m[1], Int8Linear)


# ------------------------------------------------------------------------------------------ int8 full model --
@pytest.fixture(scope="module", params=["qwen3", "qwen3_tied", "moe"])
def float_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    kw = {"qwen3": dict(kind="qwen3"), "qwen3_tied": dict(kind="qwen3", tie_word_embeddings=True),
          "moe": dict(kind="qwen3_moe", norm_topk_prob=False, mlp_only_layers=[0])}[request.param]
    make_checkpoint(d, **kw)
    return d


def test_int8_model_logits_close_to_float32(float_model):
    ref, _ = build_model(float_model, torch.float32, torch.device("cpu"))
    net, _ = build_model(float_model, torch.float32, torch.device("cpu"))
    emb = net.model.embed_tokens.weight.clone()
    quantize_int8(net)
    assert isinstance(net.lm_head, Int8Linear)
    assert torch.equal(net.model.embed_tokens.weight, emb)  # the embedding stays float (tied or not)
    for m in net.modules():
        if isinstance(m, SparseMoE):
            assert isinstance(m.gate, nn.Linear) and isinstance(m.experts, Int8Experts)  # router stays float
    ids = torch.randint(0, ref.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids)
        got = net(ids)
        # measured 0.028-0.036 relative and 4.7-7.2 % of the largest logit
        assert rel(got, want) < 0.045
        assert (got - want).abs().max() < 0.1 * want.abs().max()
        # every int8 Linear and expert is its float twin (int8 rounding: ~0.5 %): a scale 10 % off or a dropped
        # expert is caught here even where the logits would hardly notice it (an early layer, a rarely chosen expert)
        floats = dict(ref.named_modules())
        for name, m in net.named_modules():
            if isinstance(m, Int8Linear):
                x = torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(2))
                assert rel(m(x), floats[name](x)) < 0.03, name
        x = torch.randn(5, ref.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
        pairs = [(a.experts, b.experts) for a, b in zip(ref.modules(), net.modules()) if isinstance(a, SparseMoE)]
        assert len(pairs) == (0 if "moe" not in float_model.name else len(ref.model.layers) - 1)
        for float_experts, int8_experts in pairs:
            for e in range(float_experts.num_experts):
                assert rel(int8_experts.run(e, x), float_experts.run(e, x)) < 0.03, e
        # the decode path (GEMV kernel, single-token MoE) agrees with the prompt path (dequantized GEMM)
        cache = net.new_cache(1, 32)
        assert cache.k[0].dtype == torch.float32
        steps = [net(ids[:, :20], cache=cache)] + [net(ids[:, i:i + 1], cache=cache) for i in range(20, 24)]
        assert rel(torch.cat(steps, 1), got) < 0.02


def test_tied_bf16_head_stays_on_the_embedding(tmp_path):
    """bf16 `mv` reads the tied table as fast as int8 reads a copy: no copy then (fp32 above gets one)."""
    make_checkpoint(tmp_path, kind="qwen3", tie_word_embeddings=True)
    net, _ = build_model(tmp_path, torch.bfloat16, torch.device("cpu"))
    quantize_int8(net)
    assert isinstance(net.lm_head, nn.Linear) and net.lm_head.weight is net.model.embed_tokens.weight
    assert isinstance(net.model.layers[0].mlp.down_proj, Int8Linear)
    with torch.no_grad():
        assert torch.isfinite(net.decode_step(torch.tensor([3]), net.new_cache(1, 4))).all()


# --------------------------------------------------------------------------------------- MoE single token --
def make_moe(norm: bool, shared: int = 0, dtype=torch.float32) -> SparseMoE:
    torch.manual_seed(0)
    moe = SparseMoE(hidden=64, moe_inter=32, num_experts=16, top_k=4, norm_topk_prob=norm, shared_inter=shared)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe.to(dtype).eval()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shared", [0, 48])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (7, 64), (2, 5, 64), (8, 64)])
def test_moe_paths_equal_reference(norm, shared, shape):
    """One token takes `_one_token`, more take the grouped path (one `F.grouped_mm` per projection at CPU
    inference); all equal the per-expert reference loop."""
    moe = make_moe(norm, shared)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_single_token_path_equals_grouped_path(norm):
    """Each row of a batch through the grouped path == that row alone through the single-token path."""
    moe = make_moe(norm, dtype=torch.bfloat16)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        batched = moe(x)
        alone = torch.cat([moe(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, batched, rtol=0.02, atol=0.02)  # bf16: GEMV vs GEMM blocking may round apart


@pytest.mark.parametrize("norm", [True, False])
def test_int8_moe_block_close_to_float(norm):
    """Same input, same routing: only the experts' weight rounding (and bf16 compute) differs; ~0.6% expected."""
    ref = make_moe(norm, shared=48)
    moe = quantize_int8(make_moe(norm, shared=48))
    for shape in [(1, 64), (9, 64)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert rel(moe(x), ref(x)) < 0.02


@pytest.mark.parametrize("shape", [(1, 64), (5, 64)])
def test_int8_experts_paths_equal_reference(shape):
    moe = make_moe(True, shared=48)
    quantize_int8(moe)
    assert isinstance(moe.experts, Int8Experts) and isinstance(moe.gate, nn.Linear)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)


def test_int8_run_groups_is_run_per_group():
    """The batched loop gives exactly what `run` gives group by group, empty groups and a dequantized one
    (more than GEMM_ROWS rows) included."""
    ex = make_moe(True).experts
    q = Int8Experts(ex)
    sizes = [2, 0, GEMM_ROWS + 3, 1] + [0] * (q.num_experts - 4)
    xs = torch.randn(sum(sizes), 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = torch.cat([q.run(e, part) for e, part in enumerate(xs.split(sizes)) if len(part)])
        assert torch.equal(q.run_groups(xs, sizes), want)


# ------------------------------------------------------------------------------------------ int8 Omni thinker --
def test_int8_thinker_through_load(tmp_path):
    """`load(quantize="int8")` on a Qwen3-Omni thinker: the decoder's linears and experts become int8, the encoders,
    routers and embedding stay float (so an image encodes exactly as before), the KV cache keeps the float dtype,
    and the logits stay near the float model's. Routing is top-2 of 8 renormalised here, where a perturbed hidden
    state can swap an expert (module docstring: 12% on the text MoE), so the bound is looser than above; a wrong
    scale or a dropped expert lands far above it."""
    from qwen_omni.assistant import load

    from .serve_utils import png_bytes
    from .tiny_omni import make_thinker

    make_thinker(tmp_path, "qwen3")
    ref, q8 = load(tmp_path, device="cpu"), load(tmp_path, device="cpu", quantize="int8")
    net = q8.model
    assert all(isinstance(m, nn.Linear) and not isinstance(m, Int8Linear)
               for m in list(net.visual.modules()) + list(net.audio_tower.modules()) if isinstance(m, nn.Linear))
    assert isinstance(net.lm_head, Int8Linear) and net.dtype == torch.float32 == q8.dtype
    assert all(isinstance(m.experts, Int8Experts) and isinstance(m.gate, nn.Linear)
               for m in net.modules() if isinstance(m, SparseMoE))
    msgs = [{"role": "user", "content": [{"type": "image", "image": png_bytes(64, 48, seed=3)},
                                         {"type": "text", "text": "what is it?"}]}]
    inputs = ref.prepare(msgs)
    with torch.no_grad():
        grid = inputs["image_grid_thw"]
        assert torch.equal(net.encode_vision(inputs["pixel_values"], grid)[0],
                           ref.model.encode_vision(inputs["pixel_values"], grid)[0])
        n = inputs["input_ids"].shape[1]
        c_ref, c_q8 = ref.model.new_cache(1, n + 4), net.new_cache(1, n + 4)
        assert c_q8.k[0].dtype == torch.float32
        want, got = ref.model.prefill(inputs, c_ref), net.prefill(inputs, c_q8)
        assert rel(got, want) < 0.12, rel(got, want)  # measured 3.8%
        tok = want.argmax(-1)
        assert rel(net.decode_step(tok, c_q8), ref.model.decode_step(tok, c_ref)) < 0.12
    assert len(q8.chat(msgs, max_new_tokens=4)) > 0
    with pytest.raises(ValueError, match="only quantization is 'int8'"):
        load(tmp_path, device="cpu", quantize="int4")


@pytest.mark.parametrize("gemv", [True, False])
def test_bf16_single_row_linear_either_kernel(monkeypatch, gemv):
    """`linear` picks torch.mv or F.linear for one bf16 row by timing them (`gemv_wins`); both give F.linear's
    result to bf16 rounding, with and without a bias."""
    assert isinstance(layers.gemv_wins(), bool)
    monkeypatch.setattr(layers, "_GEMV_WINS", gemv)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, generator=g).to(torch.bfloat16)
    for bias in (None, b):
        ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        out = layers.linear(x, w, bias)
        assert out.shape == (1, 1, 96) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.05)


def test_float32_big_weight_linear_uses_onednn_at_inference(monkeypatch):
    """Big float32 weights go through oneDNN (`layers._ONEDNN`, x86) without autograd and give F.linear's result to
    float32 rounding for 1 row, a batch of rows, a non-contiguous input and a bias; with autograd they stay on
    F.linear (oneDNN's op has no backward) and the gradient flows."""
    calls = []
    real = layers._onednn_linear
    if real is not None:
        monkeypatch.setattr(layers, "_onednn_linear", lambda *args: calls.append(args[0].shape) or real(*args))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2048, 512, generator=g)  # 2^20 weights >= ONEDNN_MIN_WEIGHTS
    b = torch.randn(2048, generator=g)
    assert w.numel() >= layers.ONEDNN_MIN_WEIGHTS
    for x in (torch.randn(1, 512, generator=g), torch.randn(3, 1, 512, generator=g),
              torch.randn(8, 1024, generator=g)[:, ::2]):
        for bias in (None, b):
            torch.testing.assert_close(layers.linear(x, w, bias), torch.nn.functional.linear(x, w, bias),
                                       rtol=1e-5, atol=1e-4)
    n = 6 if real is not None else 0
    assert len(calls) == n
    x = torch.randn(2, 512, generator=g, requires_grad=True)
    layers.linear(x, w).sum().backward()  # F.linear: oneDNN's op would raise here
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1), rtol=1e-5, atol=1e-4)
    assert len(calls) == n
    small = torch.randn(64, 64, generator=g)  # below the threshold: F.linear (oneDNN's call overhead loses there)
    layers.linear(torch.randn(1, 64, generator=g), small)
    assert len(calls) == n


def test_grouped_kernel_at_inference_loop_under_autograd(monkeypatch):
    """At inference several rows go through `F.grouped_mm` (two calls, whatever the number of active experts), and
    an expert with no rows is an empty group; under autograd (the CPU kernel has no working backward) the loop over
    experts runs instead, and the gradient reaching the stacked experts, or only the input when the experts are
    frozen, equals the reference loop's."""
    moe = make_moe(True)
    calls = []
    real = moe_mod.F.grouped_mm
    monkeypatch.setattr(moe_mod.F, "grouped_mm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, idx = moe.route(x)
        assert len(set(idx.reshape(-1).tolist())) < moe.experts.num_experts  # some group is empty
        torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    moe(x).square().sum().backward()
    assert len(calls) == 2
    fast = moe.experts.gate_up_proj.grad.clone()
    moe.zero_grad()
    moe.forward_reference(x).square().sum().backward()
    torch.testing.assert_close(fast, moe.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5)
    moe.requires_grad_(False)  # frozen experts, trainable input (e.g. only a projector trains): still a gradient
    xg = x.clone().requires_grad_(True)
    moe(xg).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    moe.forward_reference(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-4)
