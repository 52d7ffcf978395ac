"""Continuous batching (qwen_omni/batching.py): concurrent requests give exactly what `Assistant.chat` gives.

Two models: a tiny random Qwen3 text model (fast, many tokens) and the Omni thinker of `serve_utils` (images,
audio and text rows in one batch, each with its own rope delta). References come from a second, identically
loaded Assistant, so the scheduler's prefix cache and the reference's never interact.
"""
from __future__ import annotations

import threading
import time

import pytest

import qwen_omni
from qwen_omni.batching import BatchScheduler, QueueFullError

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
