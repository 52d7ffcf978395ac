"""The conversation examples of the official Qwen2.5-Omni and Qwen3-Omni model cards run through
`qwen_omni.load(...).chat(...)` unchanged, on tiny random thinkers of both families.

The conversations are the cards' (system prompt given as a list of text parts, `use_audio_in_video`, several media in
one turn, the batch of four conversations), with the cards' qianwen-res URLs pointed at a file server on 127.0.0.1
that serves small files made here under the same names; each is also run with local paths and `file://` URLs in
their place, and must give the same inputs and reply. Only the loading line differs from the cards:
`bot = qwen_omni.load(path)` instead of the model + processor + `process_mm_info` + `generate` + `batch_decode` steps.
"""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import qwen_omni
from qwen_omni.errors import InputError

from .test_media import encode_video, write_wav
from .tiny_omni import make_thinker

Q25_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
              "auditory and visual inputs, as well as generating text and speech.")


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(base URL standing in for https://qianwen-res.oss-cn-beijing.aliyuncs.com, the folder it serves)."""
    d = tmp_path_factory.mktemp("qianwen-res")
    rng = np.random.default_rng(0)
    for fam in ("Qwen2.5-Omni", "Qwen3-Omni/demo"):
        (d / fam).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "Qwen3-Omni/demo/cars.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / "Qwen2.5-Omni/image.jpg")
    write_wav(d / "Qwen3-Omni/demo/cough.wav", 16000, 1.5, 2)
    write_wav(d / "Qwen2.5-Omni/audio.wav", 22050, 1.0, 2)
    encode_video(d / "Qwen2.5-Omni/draw.mp4", "mp4", "libx264", 16, fps=8, audio="aac")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(d)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", d
    httpd.shutdown()


@pytest.fixture(scope="module", params=["qwen2_5", "qwen3"])
def bot(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"card_{request.param}")
    make_thinker(d, request.param)
    return request.param, qwen_omni.load(d, device="cpu", dtype="float32")


def q25_card(base: str) -> tuple[list, list]:
    """Qwen2.5-Omni card: the single conversation (video with its sound, the speech system prompt) and the batch."""
    system = {"role": "system", "content": [{"type": "text", "text": Q25_SYSTEM}]}
    video, audio = f"{base}/Qwen2.5-Omni/draw.mp4", f"{base}/Qwen2.5-Omni/audio.wav"
    conversation = [system, {"role": "user", "content": [{"type": "video", "video": video}]}]
    conversation1 = [system, {"role": "user", "content": [{"type": "video", "video": video}]}]
    conversation2 = [system, {"role": "user", "content": [{"type": "audio", "audio": audio}]}]
    conversation3 = [system, {"role": "user", "content": "who are you?"}]
    conversation4 = [system, {"role": "user", "content": [
        {"type": "image", "image": f"{base}/Qwen2.5-Omni/image.jpg"},
        {"type": "video", "video": video},
        {"type": "audio", "audio": audio},
        {"type": "text", "text": "What are the elements can you see and hear in these medias?"}]}]
    return conversation, [conversation1, conversation2, conversation3, conversation4]


def q3_card(base: str) -> tuple[list, list]:
    """Qwen3-Omni card: image + audio + text in one turn, and the batch (image, audio, text with a system prompt,
    mixed)."""
    cars, cough = f"{base}/Qwen3-Omni/demo/cars.jpg", f"{base}/Qwen3-Omni/demo/cough.wav"
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": cars}, {"type": "audio", "audio": cough},
        {"type": "text", "text": "What can you see and hear? Answer in one short sentence."}]}]
    conversation1 = [{"role": "user", "content": [
        {"type": "image", "image": cars},
        {"type": "text", "text": "What can you see in this image? Answer in one sentence."}]}]
    conversation2 = [{"role": "user", "content": [
        {"type": "audio", "audio": cough}, {"type": "text", "text": "What can you hear in this audio?"}]}]
    conversation3 = [{"role": "system", "content": [{"type": "text", "text": "You are Qwen-Omni."}]},
                     {"role": "user", "content": "Who are you?"}]
    conversation4 = [{"role": "user", "content": [
        {"type": "image", "image": cars}, {"type": "audio", "audio": cough},
        {"type": "text", "text": "What can you see and hear? Answer in one sentence."}]}]
    return conversation, [conversation1, conversation2, conversation3, conversation4]


def card(family: str, base: str):
    return q25_card(base) if family == "qwen2_5" else q3_card(base)


USE_AUDIO_IN_VIDEO = True


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_card_conversation_runs_as_written(bot, site):
    family, bot = bot
    base, root = site
    conversation, _ = card(family, base)
    text = bot.chat(conversation, use_audio_in_video=USE_AUDIO_IN_VIDEO, max_new_tokens=6)
    assert isinstance(text, str) and text
    want = bot.prepare(conversation, use_audio_in_video=USE_AUDIO_IN_VIDEO)
    if family == "qwen2_5":  # the video's own sound is in the prompt: audio features beside the frames
        assert "input_features" in want and "pixel_values_videos" in want
    for local in (card(family, str(root))[0], card(family, root.as_uri())[0]):  # paths, file:// URLs
        assert same(bot.prepare(local, use_audio_in_video=USE_AUDIO_IN_VIDEO), want)
        assert bot.chat(local, use_audio_in_video=USE_AUDIO_IN_VIDEO, max_new_tokens=6) == text


def test_card_batch_gives_one_reply_per_conversation(bot, site):
    family, bot = bot
    base, root = site
    _, conversations = card(family, base)
    replies = bot.chat(conversations, use_audio_in_video=USE_AUDIO_IN_VIDEO, max_new_tokens=5)
    assert isinstance(replies, list) and len(replies) == 4 and all(isinstance(r, str) for r in replies)
    assert replies == [bot.chat(c, use_audio_in_video=USE_AUDIO_IN_VIDEO, max_new_tokens=5)
                       for c in card(family, str(root))[1]]
    with pytest.raises(InputError, match="one conversation"):
        bot.chat(conversations, stream=True)


def test_card_system_prompt_reaches_the_prompt(bot, site):
    """The system message given as a list of text parts (as the cards write it) replaces the template's default."""
    family, bot = bot
    _, conversations = card(family, site[0])
    text = bot.tokenizer.decode(bot.prepare(conversations[2])["input_ids"][0].tolist())
    assert ("You are Qwen-Omni." if family == "qwen3" else "You are Qwen, a virtual human") in text
    assert "You are a helpful assistant." not in text
