"""Parity of our decoder with transformers on tiny random Qwen2 / Qwen3 / Qwen3-MoE checkpoints."""
from __future__ import annotations

import pytest
import torch

import qwen_omni
from qwen_omni.models.kv_cache import KVCache

from .tiny_text import make_checkpoint

CASES = {
    "qwen2": dict(kind="qwen2"),
    "qwen2_tied": dict(kind="qwen2", tie_word_embeddings=True),
    "qwen3": dict(kind="qwen3"),
    "qwen3_tied": dict(kind="qwen3", tie_word_embeddings=True),
    "moe_norm": dict(kind="qwen3_moe", norm_topk_prob=True, mlp_only_layers=[1]),
    "moe_nonorm": dict(kind="qwen3_moe", norm_topk_prob=False, mlp_only_layers=[0]),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(d, **CASES[request.param])
    ours = qwen_omni.load(d, device="cpu", dtype="float32")
    return ref, ours


def test_logits_match(pair):
    ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours.model(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_tokens_match(pair):
    ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                            min_new_tokens=32)[0, 12:].tolist()
    m = ours.model
    cache = m.new_cache(1, 64)
    got = []
    with torch.no_grad():
        logits = m.prefill({"input_ids": ids}, cache)
        for _ in range(32):
            t = logits.argmax(-1)
            got.append(int(t))
            logits = m.decode_step(t, cache)
    assert got == want


def test_prefill_then_decode_equals_full_forward(pair):
    _, ours = pair
    m = ours.model
    ids = torch.randint(0, m.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, 32)
        steps = [m(ids[:, :10], cache=cache)]
        steps.append(m(ids[:, 10:16], cache=cache))  # a chunked prefill continuing from an offset
        for i in range(16, 24):
            steps.append(m(ids[:, i:i + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    # float32 rounding only: the same products summed in another order (one row vs many; AVX2 and AVX-512 kernels
    # block differently), so the bound scales with the logits (|logit| up to ~4 here; 1.5e-5 seen on AVX2)
    assert (inc - full).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())


def test_batched_rows_of_different_lengths(pair):
    """Two rows at different offsets in one cache give the same logits as each row alone."""
    _, ours = pair
    m = ours.model
    a = torch.randint(0, m.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    b = torch.randint(0, m.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_a, want_b = m(a)[0, -1], m(b)[0, -1]
        cache = KVCache(m.cfg.num_hidden_layers, 2, 16, m.cfg.num_key_value_heads, m.cfg.head_dim)
        # prefill rows separately into their own slots, then decode both in one batched step
        one = m.new_cache(1, 16)
        m(a[:, :-1], cache=one)
        two = m.new_cache(1, 16)
        m(b[:, :-1], cache=two)
        for layer in range(m.cfg.num_hidden_layers):
            cache.k[layer][0], cache.v[layer][0] = one.k[layer][0], one.v[layer][0]
            cache.k[layer][1], cache.v[layer][1] = two.k[layer][0], two.v[layer][0]
        cache.lengths[:] = torch.tensor([8, 4])
        got = m.decode_step(torch.tensor([int(a[0, -1]), int(b[0, -1])]), cache)
    assert (got[0] - want_a).abs().max().item() <= 1e-5
    assert (got[1] - want_b).abs().max().item() <= 1e-5
