"""The checkpoint's tokenizer and chat template, and incremental detokenisation.

We reuse Hugging Face `tokenizers` (the same Rust BPE the reference uses) from `tokenizer.json`, set up as
transformers' AutoTokenizer sets it up (`tokenizer_backend.py`: Qwen model types rebuild the pre-tokenizer from
their class); checkpoints that ship only `vocab.json` + `merges.txt` are converted once through transformers.
The chat template is the checkpoint's own Jinja text (chat_template.jinja / chat_template.json /
tokenizer_config.json), rendered with the same Jinja settings transformers uses (trim_blocks, lstrip_blocks,
sandboxed), so prompt ids match.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .tokenizer_backend import load_backend


class Tokenizer:
    def __init__(self, backend, chat_template: str | None, config: dict[str, Any]):
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.config = config
        self._template = None

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer | None":
        """None when the directory has no tokenizer at all (weights-only checkpoints still load)."""
        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if (path / "tokenizer.json").is_file():
            backend = load_backend(path, config)  # as AutoTokenizer builds it, which is not always the file
        elif (path / "vocab.json").is_file():
            try:  # transformers is a dev requirement only: the official checkpoints ship tokenizer.json
                from transformers import AutoTokenizer
            except ImportError:
                raise CheckpointError(f"{path} has no tokenizer.json, and building one from its vocab.json needs "
                                      "transformers: pip install -r requirements-dev.txt (or transformers)") from None

            backend = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
        else:
            return None
        return cls(backend, read_chat_template(path, config), config)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.chat_template:
            raise CheckpointError("this checkpoint ships no chat template, so it cannot chat")
        if self._template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        specials = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **specials, **kwargs)


def read_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: take the default
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    return tpl


class StreamDecoder:
    """Turns a stream of token ids into text pieces without ever splitting a multi-byte character.

    Byte-level BPE can end a token in the middle of a UTF-8 sequence; decoding then yields U+FFFD. We hold
    those tokens back until the character completes. Only a short window of recent ids is re-decoded, so
    the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is context already emitted; ids[read:] is pending
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
