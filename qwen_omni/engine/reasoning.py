"""Split a thinking model's reply into its reasoning (`<think>…</think>`) and its answer, also while streaming.

Design: Qwen3 thinking checkpoints (Qwen3-Omni-30B-A3B-Thinking, hybrid Qwen3 text models) write their chain of
thought between `<think>` and `</think>`, then the answer. Some chat templates open the `<think>` in the
generation prompt already, so the reply starts inside the reasoning and only the closing tag appears. `mode`
reads that from the checkpoint once: None (no `</think>` token: never split), False (split only if the reply
opens with `<think>`), True (the reply starts in the reasoning). `Splitter` turns streamed text pieces into
("reasoning_content" | "content", text) pieces, as vLLM's reasoning parsers do for the OpenAI API; it holds back a
tail that could still become a tag, so a tag split over two tokens is never emitted as text. The server uses it for
`reasoning_content`, the speech path to keep the reasoning out of a spoken reply, and the app to show it as a
collapsible thought.
"""
from __future__ import annotations

from typing import Iterator

OPEN, CLOSE = "<think>", "</think>"
Piece = tuple[str, str]  # ("reasoning_content" | "content", text)


def mode(tokenizer) -> bool | None:
    """None: the checkpoint has no reasoning tags; True: its generation prompt opens `<think>`; False: it does not."""
    if tokenizer is None or tokenizer.token_id(CLOSE) is None or not tokenizer.chat_template:
        return None
    try:
        prompt = tokenizer.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe: decide from the reply instead
        return False
    return prompt.rstrip().endswith(OPEN)


class Splitter:
    def __init__(self, reasoning_mode: bool | None):
        self.on = reasoning_mode is not None
        self.state = "reasoning" if reasoning_mode else "start"  # start -> (reasoning ->) content
        self.held = ""

    def push(self, text: str) -> list[Piece]:
        if not self.on:
            return [("content", text)] if text else []
        self.held += text
        out: list[Piece] = []
        while True:
            if self.state == "start":
                head = self.held.lstrip()
                if head.startswith(OPEN):
                    self.held, self.state = head[len(OPEN):], "reasoning"
                    continue
                if OPEN.startswith(head):  # still could be the opening tag (or only whitespace so far)
                    return out
                self.state = "content"
            if self.state == "reasoning":
                i = self.held.find(CLOSE)
                if i < 0:
                    keep = _partial_tail(self.held, CLOSE)
                    out += _piece("reasoning_content", self.held[:len(self.held) - keep])
                    self.held = self.held[len(self.held) - keep:]
                    return out
                out += _piece("reasoning_content", self.held[:i])
                self.held, self.state = self.held[i + len(CLOSE):], "after"
                continue
            if self.state == "after":  # the template separates answer from reasoning by blank lines: drop them
                self.held = self.held.lstrip("\n")
                if not self.held:
                    return out
                self.state = "content"
            out += _piece("content", self.held)
            self.held = ""
            return out

    def flush(self) -> list[Piece]:
        """The held-back tail at the end of the reply (an unfinished reasoning stays reasoning)."""
        tail, self.held = self.held, ""
        if not self.on or self.state == "after":  # nothing held: push passed it on, or only blank lines
            return []
        return _piece("reasoning_content" if self.state == "reasoning" else "content", tail)


def answer_only(pieces: Iterator[str], reasoning_mode: bool | None) -> Iterator[str]:
    """The content part of a stream of text pieces (what a spoken reply should say)."""
    s = Splitter(reasoning_mode)
    for p in pieces:
        yield from (t for k, t in s.push(p) if k == "content")
    yield from (t for k, t in s.flush() if k == "content")


def split(text: str, reasoning_mode: bool | None) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply."""
    s = Splitter(reasoning_mode)
    parts = s.push(text) + s.flush()
    return ("".join(t for k, t in parts if k == "reasoning_content"), "".join(t for k, t in parts if k == "content"))


def _piece(kind: str, text: str) -> list[Piece]:
    return [(kind, text)] if text else []


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
