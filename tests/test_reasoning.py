"""Qwen3-Omni's Thinking and Captioner variants.

Thinking: the reply's `<think>…</think>` part is split off (qwen_omni.reasoning), streamed as `reasoning_content`
deltas by the server, kept out of the spoken reply and out of the history re-sent by the app, for templates that
open `<think>` in the generation prompt and for those that leave it to the model. Captioner: an audio clip with
no text prompt is answered. The checkpoints are tiny random Qwen3-Omni thinkers with `<think>`/`</think>` tokens;
random weights never write `</think>`, so the server and speech paths are fed known replies.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random

import pytest

import qwen_omni
from qwen_omni.engine import reasoning
from qwen_omni.engine.reasoning import Splitter, split

from .test_media import write_wav
from .tiny_omni import Q3_TEMPLATE, make_thinker, save_tokenizer

REPLIES = [(True, "2+2: add them\n</think>\n\nIt is 4."), (False, "<think>\nhmm, <b>\n</think>\n\nFour."),
           (False, "Four, plainly."), (False, "  <thinking> is not a tag"), (True, "cut off in the middle </thi"),
           (None, "<think>x</think>y")]


@pytest.mark.parametrize("mode,text", REPLIES)
def test_streamed_split_equals_whole_split(mode, text):
    whole = split(text, mode)
    rng = random.Random(0)
    for _ in range(40):
        s, out, i = Splitter(mode), [], 0
        while i < len(text):
            j = i + rng.randint(1, 5)
            out += s.push(text[i:j])
            i = j
        out += s.flush()
        assert ("".join(t for k, t in out if k == "reasoning_content"),
                "".join(t for k, t in out if k == "content")) == whole
        assert not any("think>" in t for k, t in out) or mode is None  # a tag is never emitted as text


def test_split_values():
    assert split("2+2: add them\n</think>\n\nIt is 4.", True) == ("2+2: add them\n", "It is 4.")
    assert split("<think>\nhmm</think>\n\nFour.", False) == ("\nhmm", "Four.")
    assert split("Four.", False) == ("", "Four.")
    assert split("<think>x</think>y", None) == ("", "<think>x</think>y")  # a model without reasoning tags


def thinking_checkpoint(d, opens: bool):
    """A tiny Qwen3-Omni thinker whose tokenizer has <think> tokens; its template opens <think> in the generation
    prompt (`opens`) or leaves it to the model."""
    make_thinker(d, "qwen3")
    save_tokenizer(d, "qwen3", extra=("<think>", "</think>"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    gen = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert cfg["chat_template"].endswith(gen)
    if opens:
        cfg["chat_template"] = Q3_TEMPLATE[:-len(gen)] + gen.replace("\n{% endif", "\n<think>\n{% endif")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return qwen_omni.load(d, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    return thinking_checkpoint(tmp_path_factory.mktemp("thinking"), opens=True)


def test_mode_is_read_from_the_checkpoint(thinking, tmp_path):
    assert thinking.reasoning_mode is True
    assert thinking_checkpoint(tmp_path / "plain", opens=False).reasoning_mode is False
    make_thinker(tmp_path / "q25", "qwen2_5")  # no </think> token: never split
    assert reasoning.mode(qwen_omni.load(tmp_path / "q25", device="cpu").tokenizer) is None


class FakeJob:
    """The server's Job interface, replaying a known reply piece by piece."""

    def __init__(self, pieces: list[str]):
        self.queue, self.done, self.finish_reason = [[p] for p in pieces], False, "stop"
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    async def next(self) -> list[str]:
        out = self.queue.pop(0)
        self.done = not self.queue
        return out

    def cancel(self):
        pass


def test_server_sends_reasoning_content():
    from qwen_omni.serving.openai_api import ChatRequest
    from qwen_omni.serving.server import collect, sse

    reply = ["Let", " me", " think", " </", "think", ">\n", "\nIt", " is", " 4."]

    async def run(mode):
        req = ChatRequest(messages=[])
        job = FakeJob(reply)
        whole = await collect(job, req, await job.next(), mode)
        job = FakeJob(reply)
        lines = [line async for line in sse(job, req, "id", "m", await job.next(), mode)]
        deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in lines if x.startswith("data: {")
                  and json.loads(x[6:])["choices"]]
        return whole, deltas

    (answer, finish, thought), deltas = asyncio.run(run(True))
    assert (answer, thought, finish) == ("It is 4.", "Let me think ", "stop")
    assert "".join(d.get("reasoning_content", "") for d in deltas) == thought
    assert "".join(d.get("content", "") for d in deltas) == answer
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])  # reasoning first, then the answer
    (answer, _, thought), _ = asyncio.run(run(None))  # a model without reasoning: everything is content
    assert answer == "".join(reply) and thought is None


def test_reasoning_is_not_spoken(monkeypatch):
    from qwen_omni.speech import offline_voice
    from qwen_omni.speech.offline_voice import speak

    said = []

    class Recorder:
        def __init__(self, name):
            pass

        def push(self, text):
            said.append(text)
            return []

        def flush(self):
            return []

    monkeypatch.setattr(offline_voice, "SentenceSpeaker", Recorder)
    pieces = ["I should", " greet. </th", "ink>\n\n", "Hello", " there."]
    shown = list(speak(iter(pieces), "default", {}, 0.0, True))
    assert "".join(shown) == "".join(pieces)  # the text stream still shows everything
    assert "".join(said) == "Hello there."


def test_app_history_drops_reasoning():
    from qwen_omni.webapp.session import history_to_messages

    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "<think>\nthey greet</think>\n\nHello!"}]
    assert history_to_messages(history)[-1]["content"] == [{"type": "text", "text": "Hello!"}]


def test_captioner_answers_audio_without_a_prompt(tmp_path):
    """Qwen3-Omni-30B-A3B-Captioner's card sends one audio part and no text."""
    make_thinker(tmp_path / "captioner", "qwen3")
    bot = qwen_omni.load(tmp_path / "captioner", device="cpu", dtype="float32")
    write_wav(tmp_path / "clip.wav", 16000, 1.0, 2)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "clip.wav")}]}]
    inputs = bot.prepare(conversation)
    text = bot.tokenizer.decode(inputs["input_ids"][0].tolist())
    assert text.endswith("<|audio_end|><|im_end|>\n<|im_start|>assistant\n") and "input_features" in inputs
    assert isinstance(bot.chat(conversation, max_new_tokens=4), str)
    from qwen_omni.serving.openai_api import MediaPolicy, parse_chat_request

    req = parse_chat_request({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode((tmp_path / "clip.wav").read_bytes()).decode(),
                                                 "format": "wav"}}]}]}, MediaPolicy())
    assert bot.chat(req.messages, max_new_tokens=4) == bot.chat(conversation, max_new_tokens=4)
