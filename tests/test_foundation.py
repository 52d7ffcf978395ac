"""Loader edge cases, MRoPE layouts, sampling, budgets, chat API and streaming detokenisation."""
from __future__ import annotations

import json

import pytest
import torch

import qwen_omni
from qwen_omni.models.config import RopeConfig
from qwen_omni.errors import CheckpointError, ContextOverflowError
from qwen_omni.models.rope import Rotary
from qwen_omni.engine.sampling import SamplingParams, sample
from qwen_omni.engine.tokenizer import StreamDecoder, Tokenizer

from .tiny_text import make_checkpoint
from .tiny_tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    make_checkpoint(d, kind="qwen3")
    save_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def assistant(chat_dir):
    return qwen_omni.load(chat_dir, device="cpu", dtype="float32")


# ---- loader -------------------------------------------------------------------------------------------------
def test_sharded_checkpoint_loads(tmp_path):
    ref = make_checkpoint(tmp_path / "a", kind="qwen3_moe", norm_topk_prob=True)
    ref.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    ours = qwen_omni.load(tmp_path / "s", device="cpu")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert (ours.model(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path, kind="qwen3")
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.self_attn.k_norm.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.k_norm\.weight"):
        qwen_omni.load(tmp_path, device="cpu")


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path, kind="qwen2")
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): model\.layers\.0\.extra\.weight"):
        qwen_omni.load(tmp_path, device="cpu")


def test_pickle_checkpoint_refused(tmp_path):
    make_checkpoint(tmp_path, kind="qwen3")
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        qwen_omni.load(tmp_path, device="cpu")


def test_offline_hub_id_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1"):
        qwen_omni.load("nobody/not-a-model-xyz", device="cpu")


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        qwen_omni.load(tmp_path, device="cpu")


# ---- MRoPE --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5", "qwen3"])
def test_mrope_matches_transformers(family):
    section = [4, 6, 6]  # head_dim 32 -> 16 slots
    pos = torch.rand(3, 2, 7) * 50  # float positions, as Qwen3 video times are
    x = torch.zeros(1, dtype=torch.float32)
    if family == "qwen2_5":
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding as R

        hf_cfg = Qwen2_5OmniTextConfig(hidden_size=128, num_attention_heads=4,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": section})
        pos = pos.floor()  # Qwen2.5 positions are integers
    else:
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerTextRotaryEmbedding as R)

        hf_cfg = Qwen3OmniMoeTextConfig(hidden_size=128, num_attention_heads=4, head_dim=32,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": section, "interleaved": True})
    want_cos, want_sin = R(hf_cfg)(x, pos)
    ours = Rotary(32, RopeConfig(1e6, mrope_section=section, mrope_interleaved=family == "qwen3"))
    cos, sin = ours(pos)
    assert torch.allclose(cos, want_cos, atol=1e-6) and torch.allclose(sin, want_sin, atol=1e-6)


# ---- sampling, budgets --------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(assistant):
    msgs = [{"role": "user", "content": "hello"}]
    a = assistant.chat(msgs, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = assistant.chat(msgs, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    c = assistant.chat(msgs, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8)
    assert a == b and a != c


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample(logits, SamplingParams(1.0, top_k=2), g)) for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {int(sample(logits, SamplingParams(1.0, top_p=0.5), g)) for _ in range(200)}
    assert seen_p == {0}


def test_prompt_longer_than_context_fails_clearly(assistant):
    long = "hello world " * 400  # > 256-token context of the tiny model
    with pytest.raises(ContextOverflowError, match="context window is 256"):
        assistant.chat([{"role": "user", "content": long}])


# ---- chat API -----------------------------------------------------------------------------------------------
def test_prepare_returns_template_ids(assistant):
    ids = assistant.prepare([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])["input_ids"]
    text = assistant.tokenizer.decode(ids[0].tolist())
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def test_stream_equals_whole_and_stats(assistant):
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    stats = {}
    pieces = list(assistant.chat(msgs, max_new_tokens=20, stream=True, stats=stats))
    assert "".join(pieces) == assistant.chat(msgs, max_new_tokens=20)
    assert stats["prompt_tokens"] > 0 and 0 < stats["completion_tokens"] <= 20


def test_follow_up_reuses_cached_prefix(assistant):
    msgs = [{"role": "user", "content": "hello world"}]
    reply = assistant.chat(msgs, max_new_tokens=8)
    stats = {}
    follow = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and you?"}]
    assistant.chat(follow, max_new_tokens=8, stats=stats)
    n_first = assistant.prepare(msgs)["input_ids"].shape[1]
    assert stats["reused_tokens"] >= n_first
    # reuse must not change the answer
    assistant.prefix_cache.clear()
    fresh = {}
    assert assistant.chat(follow, max_new_tokens=8, stats=fresh) == assistant.chat(follow, max_new_tokens=8)
    assert fresh["reused_tokens"] == 0


def test_stream_decoder_never_splits_characters(chat_dir):
    tok = Tokenizer.from_dir(chat_dir)
    text = "système 你好 世界 🙂 naïve café"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_media_for_text_model_is_refused(assistant):
    with pytest.raises(qwen_omni.InputError, match="text only"):
        assistant.prepare([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}])


def test_parameter_counts(tmp_path):
    make_checkpoint(tmp_path, kind="qwen3_moe", norm_topk_prob=True)
    a = qwen_omni.load(tmp_path, device="cpu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    unused = cfg["num_hidden_layers"] * (cfg["num_local_experts"] - cfg["num_experts_per_tok"]) * per_expert
    assert a.num_parameters - a.num_active_parameters == unused
