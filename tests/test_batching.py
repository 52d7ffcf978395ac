"""Continuous batching (qwen_omni/engine/scheduler.py): concurrent requests give exactly what `Assistant.chat` gives.

Two models: a tiny random Qwen3 text model (fast, many tokens) and the Omni thinker of `serve_utils` (images,
audio and text rows in one batch, each with its own rope delta). References come from a second, identically
loaded Assistant, so the scheduler's prefix cache and the reference's never interact.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

import qwen_omni
from qwen_omni.models.kv_cache import copy_prefix
from qwen_omni.engine.scheduler import BatchScheduler, QueueFullError
from qwen_omni.models.group_prefill import prefill_prompts

from .serve_utils import omni_model_dir, png_bytes, wav_bytes
from .tiny_text import make_checkpoint
from .tiny_tokenizer import save_tokenizer

PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog " * 3, "what colour is the circle?", "hi " * 20,
           "a", "blue square red circle"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-text")
    make_checkpoint(d, kind="qwen3", vocab=400)
    save_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    return omni_model_dir(tmp_path_factory.mktemp("batch-omni"))


def run_concurrently(fn, n):
    out = [None] * n

    def work(i):
        out[i] = fn(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_greedy_equals_assistant_chat(text_dir):
    ref_model, model = qwen_omni.load(text_dir, device="cpu"), qwen_omni.load(text_dir, device="cpu")
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    budgets = [20 + 9 * i for i in range(len(msgs))]  # different lengths: rows leave at different steps
    ref = [ref_model.chat(m, max_new_tokens=b) for m, b in zip(msgs, budgets)]
    sched = BatchScheduler(model, max_batch=4)  # fewer rows than requests: later ones join mid-flight
    try:
        got = run_concurrently(lambda i: sched.chat(msgs[i], max_new_tokens=budgets[i]), len(msgs))
        assert got == ref
        tokens = sum(len(model.tokenizer.encode(r)) for r in ref)
        assert sched.steps < 0.6 * tokens, "decode steps must be shared between rows"
        assert sched.load() == {"active": 0, "waiting": 0, "free_slots": 4}
    finally:
        sched.close()


def test_seeded_sampling_and_penalty_equal_assistant_chat(text_dir):
    ref_model, model = qwen_omni.load(text_dir, device="cpu"), qwen_omni.load(text_dir, device="cpu")
    sched = BatchScheduler(model, max_batch=3)
    kw = [dict(temperature=0.9, top_p=0.9, seed=7), dict(temperature=0.7, top_k=20, seed=1),
          dict(temperature=0.0, repetition_penalty=1.3)]
    try:
        msgs = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
        ref = [ref_model.chat(m, max_new_tokens=25, **k) for m, k in zip(msgs, kw)]
        got = run_concurrently(lambda i: sched.chat(msgs[i], max_new_tokens=25, **kw[i]), 3)
        assert got == ref
    finally:
        sched.close()


def test_multimodal_rows_batch_with_their_own_rope_deltas(omni_dir):
    ref_model, model = qwen_omni.load(omni_dir, device="cpu"), qwen_omni.load(omni_dir, device="cpu")
    msgs = [
        [{"role": "user", "content": [{"type": "image", "image": png_bytes(64, 64)},
                                      {"type": "text", "text": "describe the image."}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": wav_bytes(1.0)},
                                      {"type": "text", "text": "what do you hear?"}]}],
        [{"role": "user", "content": "how many beeps? three."}],
        [{"role": "user", "content": [{"type": "image", "image": png_bytes(96, 64, seed=1)},
                                      {"type": "text", "text": "the quick brown fox"}]}],
    ]
    opts = dict(max_new_tokens=12, ignore_eos=True)
    ref = [ref_model.chat(m, max_new_tokens=12) for m in msgs]
    sched = BatchScheduler(model, max_batch=4)
    try:
        inputs = [model.prepare(m) for m in msgs]
        gens = [sched.submit(x, **opts) for x in inputs]  # all waiting: admitted one per decode step
        got = run_concurrently(lambda i: list(gens[i]), len(msgs))
        # ignore_eos only changes where a reply may end: compare up to the reference's end
        for r, ids in zip(ref, got):
            assert model.tokenizer.decode(ids).startswith(r)
        assert sched.steps <= 11 + 3, "all rows decode in the same steps"
    finally:
        sched.close()


def test_cancel_frees_the_slot_at_once_and_others_continue(text_dir):
    model = qwen_omni.load(text_dir, device="cpu")
    sched = BatchScheduler(model, max_batch=2)
    try:
        msg = [{"role": "user", "content": "hello"}]
        long = sched.submit(model.prepare(msg), max_new_tokens=2000, ignore_eos=True)
        other = sched.submit(model.prepare(msg), max_new_tokens=40, ignore_eos=True)
        it = iter(long)
        next(it)
        it.close()  # like a client disconnect
        tokens_at_cancel = len(long.out)
        deadline = time.monotonic() + 5
        while long.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert long.finish_reason == "cancelled"
        assert len(long.out) - tokens_at_cancel <= 1, "the row is freed before the next decode step"
        assert len(list(other)) == 40 and other.finish_reason == "length"
        assert sched.load() == {"active": 0, "waiting": 0, "free_slots": 2}
        assert len(long.out) < 2000
    finally:
        sched.close()


def test_queue_full_is_refused_at_once(text_dir):
    model = qwen_omni.load(text_dir, device="cpu")
    sched = BatchScheduler(model, max_batch=1, max_queue=1)
    try:
        inputs = model.prepare([{"role": "user", "content": "hello"}])
        first = sched.submit(inputs, max_new_tokens=5000, ignore_eos=True)
        next(iter(first))  # admitted: the only row is busy
        waiting = sched.submit(inputs, max_new_tokens=3)
        with pytest.raises(QueueFullError):
            sched.submit(inputs, max_new_tokens=3)
        first.cancel()
        assert len(list(waiting)) <= 3
    finally:
        sched.close()


def test_follow_up_turn_reuses_the_prefix_and_does_not_re_encode_media(omni_dir):
    model = qwen_omni.load(omni_dir, device="cpu")
    calls = []
    encode = model.model.encode_vision
    model.model.encode_vision = lambda *a: calls.append(1) or encode(*a)
    sched = BatchScheduler(model, max_batch=2)
    try:
        turn1 = [{"role": "user", "content": [{"type": "image", "image": png_bytes(64, 64)},
                                              {"type": "text", "text": "describe the image."}]}]
        stats1, stats2 = {}, {}
        reply = sched.chat(turn1, max_new_tokens=8, stats=stats1)
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and the colour?"}]
        sched.chat(turn2, max_new_tokens=8, stats=stats2)
        assert calls == [1], "the image in history must not be encoded again"
        assert stats2["reused_tokens"] >= stats1["prompt_tokens"]
        assert stats2["prompt_tokens"] - stats2["reused_tokens"] < 40
    finally:
        sched.close()


def test_interleaved_conversations_keep_their_own_prefix(text_dir):
    model = qwen_omni.load(text_dir, device="cpu")
    sched = BatchScheduler(model, max_batch=2)
    try:
        a1 = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
        b1 = [{"role": "user", "content": "what colour is the circle?"}]  # shares only the system prompt with a1
        s_a1, s_b1, s_a2 = {}, {}, {}
        reply = sched.chat(a1, max_new_tokens=6, stats=s_a1)
        sched.chat(b1, max_new_tokens=6, stats=s_b1)
        assert 0 < s_b1["reused_tokens"] < s_a1["prompt_tokens"]  # the system prompt, copied from a1's state
        sched.chat(a1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "hello"}],
                   max_new_tokens=6, stats=s_a2)
        assert s_a2["reused_tokens"] >= s_a1["prompt_tokens"], "b1 must not have consumed a1's state"
    finally:
        sched.close()


def test_group_prefill_equals_prefilling_one_by_one(omni_dir):
    """Prompts of different lengths and media, each after a different reused prefix, prefilled as one padded
    group: the same last logits, cache contents and rope deltas as prefilling each alone."""
    a = qwen_omni.load(omni_dir, device="cpu")
    m = a.model
    msgs = [[{"role": "user", "content": [{"type": "image", "image": png_bytes(64, 64)},
                                          {"type": "text", "text": "describe the image."}]}],
            [{"role": "user", "content": "how many beeps? three."}],
            [{"role": "user", "content": [{"type": "audio", "audio": wav_bytes(1.0)},
                                          {"type": "image", "image": png_bytes(96, 64, seed=1)},
                                          {"type": "text", "text": "what do you hear and see?"}]}]]
    inputs = [a.prepare(x) for x in msgs]
    reused = [0, 7, 3]  # inside the system prompt: no media item is split
    refs, caches, prompts = [], [], []
    for x, r in zip(inputs, reused):
        n = x["input_ids"].shape[1]
        ref = m.new_cache(1, n)
        refs.append((m.prefill(x, ref), ref))
        c = m.new_cache(1, n + 3)
        copy_prefix(ref, c, r)
        caches.append(c)
        prompts.append(m.prompt(x, r))
    assert len({p.length for p in prompts}) == 3
    logits = prefill_prompts(m, prompts, caches)
    for i, ((ref_logits, ref), c, x) in enumerate(zip(refs, caches, inputs)):
        n = x["input_ids"].shape[1]
        torch.testing.assert_close(logits[i:i + 1], ref_logits, atol=1e-4, rtol=1e-4)
        assert int(c.lengths[0]) == n
        torch.testing.assert_close(c.rope_deltas, ref.rope_deltas)
        for layer in range(len(c.k)):
            torch.testing.assert_close(c.k[layer][:, :, :n], ref.k[layer][:, :, :n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(c.v[layer][:, :, :n], ref.v[layer][:, :, :n], atol=1e-4, rtol=1e-4)


def test_newcomers_together_share_one_prefill_and_a_bad_one_fails_alone(omni_dir):
    ref_model, model = qwen_omni.load(omni_dir, device="cpu"), qwen_omni.load(omni_dir, device="cpu")
    msgs = [[{"role": "user", "content": [{"type": "image", "image": png_bytes(64, 64, seed=s)},
                                          {"type": "text", "text": f"describe image {s}."}]}] for s in range(3)]
    msgs.append([{"role": "user", "content": "the quick brown fox"}])
    ref = [ref_model.chat(m, max_new_tokens=10) for m in msgs]
    bad = dict(model.prepare(msgs[0]), pixel_values=None)  # image placeholders without the image
    sched = BatchScheduler(model, max_batch=8)
    try:
        with sched._cv:  # hold the scheduler back until all five wait: one admission takes them all
            gens = [sched.submit(model.prepare(m), max_new_tokens=10) for m in msgs]
            broken = sched.submit(bad, max_new_tokens=10)
        got = run_concurrently(lambda i: model.tokenizer.decode(list(gens[i])), len(msgs))
        assert got == ref
        with pytest.raises(qwen_omni.InputError, match="placeholders but no media"):
            list(broken)
        assert sched.prefill_groups == 1
        assert sched.load() == {"active": 0, "waiting": 0, "free_slots": 8}
    finally:
        sched.close()
