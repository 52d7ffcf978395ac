"""The tokenizer backend `AutoTokenizer` would build for a checkpoint, rebuilt with `tokenizers` alone.

Design: transformers 5 does not always take `tokenizer.json` as it is. `AutoTokenizer.from_pretrained` picks a
class from config.json's `model_type` and the `tokenizer_class` of tokenizer_config.json (or config.json)
(transformers/models/auto/tokenization_auto.py). A class with its own `__init__`, such as `Qwen2Tokenizer`,
registered for every Qwen model type we load, keeps only the vocab, merges and post-processor of tokenizer.json
(`TokenizersBackend.convert_to_native_format`) and sets its own BPE options, normalizer (NFC), pre-tokenizer (the
Qwen split regex, then byte-level without its regex) and decoder (models/qwen2/tokenization_qwen2.py). So a
tokenizer.json whose pre-tokenizer differs from the class's (say the GPT-2 regex, which keeps " 2" in one piece
where Qwen's splits ' ', '2') gets other ids from transformers than from the file.

`load_backend(path, config)` makes the same choice: the file as it is, or the Qwen2 rebuild. Any other named class
(none of the published Qwen checkpoints uses one) is left to transformers itself, so ids still match whatever it
builds. The tables below copy transformers 5.24 for the model types the library loads;
tests/test_tokenizer_parity.py checks them against the installed transformers and the ids against AutoTokenizer.
The library does not import transformers at run time for the two common cases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# TOKENIZER_MAPPING_NAMES for the model types we load; the thinker-only types are not registered (-> the file).
REGISTERED = {t: "Qwen2Tokenizer" for t in ("qwen2", "qwen3", "qwen3_moe", "qwen2_5_omni", "qwen3_omni_moe")}
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS among them: the registered class wins over any declared one.
HUB_CLASS_OVERRIDDEN = {"qwen2"}
# Declared classes that mean "tokenizer.json as it is" (after dropping a "Fast" suffix).
GENERIC = {"TokenizersBackend", "PreTrainedTokenizer", "PythonBackend"}
# Qwen2Tokenizer's pre-tokenizer split (tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def auto_class(model_type: str | None, declared: str | None) -> str | None:
    """The class AutoTokenizer instantiates: "Qwen2Tokenizer", another class name, or None for the file as is.

    Mirrors `AutoTokenizer.from_pretrained` for a checkpoint without remote code: a declared class that disagrees
    with the registered one is trusted unless the model type is known to declare wrong classes; no declared
    class means the registered one; an unregistered model type with no declared class reads the file."""
    hub = declared.removesuffix("Fast") if declared else None
    registered = REGISTERED.get(model_type or "")
    if hub and registered and hub != registered:
        if model_type in HUB_CLASS_OVERRIDDEN:
            return registered
        return None if hub in GENERIC else hub
    if hub:
        return None if hub in GENERIC else hub
    return registered


def load_backend(path: Path, config: dict[str, Any]):
    """A `tokenizers.Tokenizer` encoding as AutoTokenizer(path) does. `config`: tokenizer_config.json's contents."""
    from tokenizers import Tokenizer

    path = Path(path)
    model_cfg = _read_json(path / "config.json")
    cls = auto_class(model_cfg.get("model_type"), config.get("tokenizer_class") or model_cfg.get("tokenizer_class"))
    if cls is None:
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if cls == "Qwen2Tokenizer":
        return qwen2_rebuild(path / "tokenizer.json", config)
    from transformers import AutoTokenizer  # an unusual declared class: let transformers build it

    return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer


def qwen2_rebuild(tokenizer_json: Path, config: dict[str, Any]):
    """Qwen2Tokenizer's backend from a tokenizer.json: its vocab, merges, post-processor and added tokens, with
    the class's BPE options, normalizer, pre-tokenizer and decoder.

    Starting from the file keeps its added tokens (ids and flags) in place; transformers re-adds the same tokens
    from tokenizer_config.json's `added_tokens_decoder` (or tokenizer.json's list when that is absent), which for a
    consistent checkpoint are the same tokens at the same ids (the parity tests compare both ways)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    raw = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = raw.get("model", {})
    if model.get("type") not in (None, "BPE"):
        raise CheckpointError(f"{tokenizer_json}: a Qwen2 tokenizer must be BPE, not {model.get('type')}")
    vocab = model.get("vocab", {})
    if isinstance(vocab, list):
        vocab = {t[0] if isinstance(t, list) else t: i for i, t in enumerate(vocab)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.model = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                    end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(f: Path) -> dict:
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
