"""Prompt ids equal `AutoTokenizer.from_pretrained(...).apply_chat_template(...)` for every model type we load.

transformers 5 rebuilds the tokenizer of the Qwen model types from `Qwen2Tokenizer` (its own normalizer and
pre-tokenizer) instead of taking tokenizer.json's, depending on model_type and the declared tokenizer_class. The
tiny tokenizers here are trained both ways: "class" (NFC + the Qwen split regex, as the published checkpoints ship)
and "gpt2" (byte-level with the GPT-2 regex and no normalizer, which disagrees with the class: " 2" stays one piece
and a decomposed "é" is not composed). Each is saved with several declared classes, with and without
tokenizer_config's `added_tokens_decoder`, under each model type.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_omni.models.config import TEXT_MODEL_TYPES
from qwen_omni.models.omni_config import FULL_TYPES, THINKER_TYPES
from qwen_omni.engine.tokenizer import Tokenizer
from qwen_omni.engine.tokenizer_backend import GENERIC, HUB_CLASS_OVERRIDDEN, QWEN2_SPLIT, REGISTERED, auto_class

from .tiny_omni import Q3_TEMPLATE, Q25_TEMPLATE, TOKENS
from .tiny_tokenizer import CHAT_TEMPLATE

MODEL_TYPES = sorted(TEXT_MODEL_TYPES | set(FULL_TYPES) | THINKER_TYPES)
DECLARED = [None, "Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *TOKENS["qwen2_5"].values(),
            *TOKENS["qwen3"].values()]
CORPUS = ["I saw 2 cats and 2 dogs, 345 birds", "naïve café e\u0301t\u00e9 你好 世界 🙂",
          "I'm sure it's fine\n\nok", "what is in this picture?   many   spaces\tand tabs",
          "the quick brown fox jumps over the lazy dog"] * 30
TEXTS = ["2 cats", "I have 12345 apples, don't I?", "caf\u0065\u0301 / café", "line one\n\n  line two  ", "🙂 你好!!"]


def train(d: Path, way: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if way == "class":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))


def template(model_type: str) -> str:
    return (Q25_TEMPLATE if model_type.startswith("qwen2_5_omni") else Q3_TEMPLATE if "omni" in model_type
            else CHAT_TEMPLATE)


def checkpoint(root: Path, model_type: str, way: str, declared: str | None, decoder_table: bool) -> Path:
    d = root / f"{model_type}-{way}-{declared}-{decoder_table}"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((root / f"tok-{way}" / "tokenizer.json").read_bytes())
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template(model_type)}
    if declared:
        cfg["tokenizer_class"] = declared
    if decoder_table:  # what save_pretrained writes and published checkpoints carry
        added = json.loads((d / "tokenizer.json").read_text())["added_tokens"]
        cfg["added_tokens_decoder"] = {str(t.pop("id")): t for t in added}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


def messages(model_type: str, text: str) -> list[dict]:
    if "omni" not in model_type:
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "audio", "audio": "y.wav"},
                                         {"type": "text", "text": text}]},
            {"role": "assistant", "content": "2 of them"}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("tok")
    for way in ("class", "gpt2"):
        (r / f"tok-{way}").mkdir()
        train(r / f"tok-{way}", way)
    return r


def test_the_two_ways_really_disagree(root):
    from tokenizers import Tokenizer as Raw

    a, b = (Raw.from_file(str(root / f"tok-{w}" / "tokenizer.json")) for w in ("class", "gpt2"))
    assert [a.id_to_token(i) for i in a.encode(" 2").ids] == ["Ġ", "2"]
    assert [b.id_to_token(i) for i in b.encode(" 2").ids] == ["Ġ2"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prompt_ids_equal_auto_tokenizer(root, model_type):
    from transformers import AutoTokenizer

    rebuilt = 0
    for way in ("class", "gpt2"):
        for declared in DECLARED:
            for table in (False, True):
                d = checkpoint(root, model_type, way, declared, table)
                ref = AutoTokenizer.from_pretrained(str(d))
                ours = Tokenizer.from_dir(d)
                for text in TEXTS:
                    msgs = messages(model_type, text)
                    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
                    got = ours.encode(ours.render(msgs, add_generation_prompt=True))
                    assert got == list(want), (d.name, text)
                    assert ours.decode(got) == ref.decode(want), (d.name, text)
                rebuilt += type(ref).__name__ == "Qwen2Tokenizer"
    # the matrix exercised both outcomes wherever transformers can produce them
    assert rebuilt == 4 * sum(auto_class(model_type, c) == "Qwen2Tokenizer" for c in DECLARED)
    assert rebuilt > 0


def test_tables_match_installed_transformers():
    from transformers.models.auto.tokenization_auto import (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
                                                            TOKENIZER_MAPPING_NAMES)

    for mt in MODEL_TYPES:
        assert REGISTERED.get(mt) == TOKENIZER_MAPPING_NAMES.get(mt), mt
        assert (mt in HUB_CLASS_OVERRIDDEN) == (mt in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), mt
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_SPLIT == PRETOKENIZE_REGEX
    assert {"TokenizersBackend", "PreTrainedTokenizer"} <= GENERIC


def test_loaded_checkpoint_prepares_the_same_ids(tmp_path, root):
    """Through `qwen_omni.load`: a Qwen2 text checkpoint whose tokenizer.json disagrees with Qwen2Tokenizer."""
    from transformers import AutoTokenizer

    import qwen_omni

    from .tiny_text import make_checkpoint

    make_checkpoint(tmp_path, "qwen2")
    (tmp_path / "tokenizer.json").write_bytes((root / "tok-gpt2" / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                "chat_template": CHAT_TEMPLATE}))
    bot = qwen_omni.load(tmp_path, device="cpu", dtype="float32")
    msgs = [{"role": "user", "content": "2 cats and 12 dogs"}]
    want = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert bot.prepare(msgs)["input_ids"][0].tolist() == list(want)
