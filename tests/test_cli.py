"""The terminal chat: one-shot question, interactive multi-turn, and a clean error line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .tiny_text import make_checkpoint
from .tiny_tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_checkpoint(d, kind="qwen2")
    save_tokenizer(d)
    return d


def run(args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen_omni", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_one_shot_question_streams_an_answer(model_dir):
    import qwen_omni

    want = qwen_omni.load(model_dir).chat([{"role": "user", "content": "hello"}], max_new_tokens=12)
    r = run(["chat", "--model", str(model_dir), "--max-new-tokens", "12", "hello"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want


def test_interactive_multi_turn(model_dir):
    """Each turn's answer is the library's answer to the whole conversation so far, in order."""
    import qwen_omni

    bot = qwen_omni.load(model_dir)
    history = [{"role": "user", "content": "hello"}]
    first = bot.chat(history, max_new_tokens=6)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and you?"}]
    second = bot.chat(history, max_new_tokens=6)
    r = run(["chat", "--model", str(model_dir), "--max-new-tokens", "6"], stdin="hello\nand you?\n/quit\n")
    assert r.returncode == 0, r.stderr
    turns = r.stdout.split("> ")[1:]  # the banner, then one prompt per line read
    assert len(turns) == 3 and turns[0].rstrip("\n") == first and turns[1].rstrip("\n") == second, r.stdout


def test_bad_model_path_is_one_line(tmp_path):
    r = run(["chat", "--model", str(tmp_path / "nope"), "hi"])
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr
