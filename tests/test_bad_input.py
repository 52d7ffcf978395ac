"""Bad uploads and over-budget requests through the public API (`Assistant.prepare` / `Assistant.chat`) of a tiny
Qwen2.5-Omni thinker.

Every failure must be a typed error a server can show as it is (`MediaError`, or a `QwenOmniError` subclass:
`InputError`, `ContextOverflowError`) whose message names the file (or the attachment's number, for in-memory
uploads) and says what is wrong or what to shrink. After every failure the same `Assistant` must still answer a
normal image + audio request exactly as before (checked after each test by an autouse fixture), so one bad
request never takes the process down or leaves state behind (a held lock, a half-written prefix cache).

The files are written by the tests themselves: truncated and random-byte images, audio and video; empty audio;
files whose extension lies; 1x1, 200:1 and 201:1 images; a decompression bomb (Pillow's limit lowered for the
test); a video with a video track but no frames; 8-bit, 24-bit and 6-channel WAV (which must decode fine).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import qwen_omni
from encoders.media import MediaError
from qwen_omni.errors import ContextOverflowError, InputError, QwenOmniError
from qwen_omni.engine.processor import Budgets

from .test_media import encode_video, write_frameless_video, write_wav
from .tiny_omni import make_thinker

TYPED = (MediaError, QwenOmniError)


def noise_png(path, w: int, h: int, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="PNG")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    noise_png(d / "ok.png", 60, 40)
    write_wav(d / "ok.wav", 16000, 1.0, 2)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "noise.jpg").write_bytes(np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "cut.wav").write_bytes((d / "ok.wav").read_bytes()[:30])  # cut inside the RIFF header
    (d / "noise.mp3").write_bytes(np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    encode_video(d / "v.mp4", "mp4", "libx264", 50, noise=True)  # index (moov) at the end
    (d / "cut.mp4").write_bytes((d / "v.mp4").read_bytes()[: (d / "v.mp4").stat().st_size // 2])
    (d / "noise.mp4").write_bytes(np.random.default_rng(4).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "zero_bytes.wav").write_bytes(b"")
    write_wav(d / "no_samples.wav", 16000, 0.0, 2)
    noise_png(d / "picture.wav", 30, 20)             # a PNG named .wav
    write_wav(d / "tone.png", 16000, 1.0, 2)         # a WAV named .png
    noise_png(d / "dot.png", 1, 1)
    noise_png(d / "long200.png", 2000, 10)
    noise_png(d / "long201.png", 2010, 10)
    noise_png(d / "big.png", 120, 100)
    write_wav(d / "u8.wav", 8000, 1.0, 1)
    write_wav(d / "s24.wav", 48000, 1.0, 3)
    write_wav(d / "six.wav", 22050, 1.0, 2, channels=6)
    write_wav(d / "three_s.wav", 16000, 3.0, 2)
    encode_video(d / "silent.mp4", "mp4", "libx264", 50, fps=25)
    write_frameless_video(d / "zero_frames.mkv")  # a video track without frames
    return d


def ask(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is in this picture?"}]}]


def image(path) -> dict:
    return {"type": "image", "image": str(path)}


def audio(src) -> dict:
    return {"type": "audio", "audio": src if isinstance(src, np.ndarray) else str(src)}


def video(path) -> dict:
    return {"type": "video", "video": str(path)}


@pytest.fixture(scope="module")
def served(tmp_path_factory, files):
    """(assistant, a normal request, its reply before any bad input)."""
    d = tmp_path_factory.mktemp("q25_bad")
    make_thinker(d, "qwen2_5")
    a = qwen_omni.load(d, device="cpu", dtype="float32")
    normal = ask(image(files / "ok.png"), audio(files / "ok.wav"))
    return a, normal, a.chat(normal, max_new_tokens=8)


@pytest.fixture(autouse=True)
def keeps_serving(served):
    """After each test, whatever it raised, the same Assistant answers the normal request as before."""
    yield
    a, normal, reply = served
    assert not a.lock.locked()
    assert a.chat(normal, max_new_tokens=8) == reply


def fails(a, messages, error, pattern: str, **options) -> str:
    """Run `messages` through chat (streaming, as the app does); it must raise `error` matching `pattern`."""
    with pytest.raises(error, match=pattern) as e:
        for _ in a.chat(messages, max_new_tokens=4, stream=True, **options):
            pass
    assert isinstance(e.value, TYPED)
    return str(e.value)


# ----------------------------------------------------------------------------------------- broken files

def test_truncated_and_corrupt_images(served, files):
    a = served[0]
    fails(a, ask(image(files / "cut.png")), MediaError, r"'cut\.png'.*truncated or corrupt")
    fails(a, ask(image(files / "noise.jpg")), MediaError, r"'noise\.jpg' is not an image format")
    # the second of two attachments is the broken one: the message says which
    fails(a, ask(image(files / "ok.png"), image(files / "cut.png")), MediaError, r"'cut\.png'")
    bad = (files / "cut.png").read_bytes()
    fails(a, ask({"type": "image", "image": bad}), MediaError, r"upload could not be decoded")


def test_truncated_and_corrupt_audio(served, files):
    a = served[0]
    fails(a, ask(audio(files / "cut.wav")), MediaError, r"Audio 'cut\.wav' could not be decoded")
    fails(a, ask(audio(files / "noise.mp3")), MediaError, r"Audio 'noise\.mp3' could not be decoded.*corrupt")


def test_truncated_and_corrupt_video(served, files):
    a = served[0]
    # without its index an mp4 cannot be read at all (a truncated faststart mp4 keeps its decodable frames)
    fails(a, ask(video(files / "cut.mp4")), MediaError, r"'cut\.mp4' is not a media file we can read")
    fails(a, ask(video(files / "noise.mp4")), MediaError, r"'noise\.mp4' is not a media file we can read")


def test_zero_length_audio(served, files):
    a = served[0]
    fails(a, ask(audio(files / "zero_bytes.wav")), MediaError, r"'zero_bytes\.wav' is empty \(0 bytes\)")
    fails(a, ask(audio(files / "no_samples.wav")), MediaError, r"'no_samples\.wav' is empty \(zero length\)")
    fails(a, ask(audio(np.zeros(0, np.float32))), MediaError, r"audio 1 of the request: .*empty")


def test_extension_lies(served, files):
    a = served[0]
    fails(a, ask(audio(files / "picture.wav")), MediaError, r"'picture\.wav' .*a picture, not an audio file")
    fails(a, ask(image(files / "tone.png")), MediaError, r"'tone\.png' is not an image format")
    # sent as what it is, a WAV named .png decodes by content: 1 s -> 25 audio tokens
    inputs = a.prepare(ask(audio(files / "tone.png")))
    assert int((inputs["input_ids"] == a.model.cfg.audio_token_id).sum()) == 25


def test_tiny_and_elongated_images(served, files):
    a = served[0]
    fails(a, ask(image(files / "dot.png")), MediaError, r"image 'dot\.png': .*only 1x1 pixels")
    fails(a, ask(image(files / "long201.png")), MediaError, r"image 'long201\.png': .*aspect ratio 201:1")
    # 200:1 is the reference's limit and is accepted: 10 px high -> 28, 2000 wide -> 812 (smart_resize)
    inputs = a.prepare(ask(image(files / "long200.png")))
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 58]]


def test_decompression_bomb(served, files, monkeypatch):
    a = served[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # big.png has 12000: over 2x the limit
    fails(a, ask(image(files / "big.png")), MediaError, r"'big\.png' is too large to process safely")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # between 1x and 2x: Pillow only warns; we refuse
    fails(a, ask(image(files / "big.png")), MediaError, r"'big\.png' is too large to process safely")


def test_video_without_frames(served, files):
    fails(served[0], ask(video(files / "zero_frames.mkv")), MediaError, r"'zero_frames\.mkv' has no frames")


def test_unusual_wav_formats_decode(served, files):
    a = served[0]
    for name in ("u8.wav", "s24.wav", "six.wav"):  # 8-bit unsigned, 24-bit, 6 channels; 8 / 48 / 22.05 kHz
        inputs = a.prepare(ask(audio(files / name)))
        assert int((inputs["input_ids"] == a.model.cfg.audio_token_id).sum()) == 25, name
        assert isinstance(a.chat(ask(audio(files / name)), max_new_tokens=2), str)


# ------------------------------------------------------------------------------------------- over budget

def test_too_many_images(served, files, monkeypatch):
    a = served[0]
    monkeypatch.setattr(a.processor, "budgets", Budgets(max_images=2))
    msg = fails(a, ask(*[image(files / "ok.png")] * 3), InputError, r"too many attachments \(3 images")
    assert "send fewer" in msg and "2 images" in msg


def test_too_long_audio(served, files, monkeypatch):
    a = served[0]
    monkeypatch.setattr(a.processor, "budgets", Budgets(max_audio_seconds=2))
    fails(a, ask(audio(files / "three_s.wav")), InputError, r"audio 'three_s\.wav': .*3 s long; the limit is 2 s: trim")


def test_image_over_pixel_budget(served, files, monkeypatch):
    a = served[0]
    monkeypatch.setattr(a.processor, "budgets", Budgets(max_image_pixels=10_000))
    fails(a, ask(image(files / "big.png")), InputError, r"image 'big\.png': the image is 120x100.*send a smaller")


def test_prompt_over_context_window(served):
    a = served[0]
    words = "the quick brown fox jumps over the lazy dog. " * 1500
    msg = fails(a, [{"role": "user", "content": words}], ContextOverflowError,
                rf"context window is {a.context_window}")
    assert "shorten the conversation" in msg
    with pytest.raises(ContextOverflowError):  # the non-streaming call raises the same
        a.chat([{"role": "user", "content": words}], max_new_tokens=4)


def test_audio_in_video_without_sound(served, files):
    fails(served[0], ask(video(files / "silent.mp4")), InputError,
          r"video 'silent\.mp4': use_audio_in_video was asked for, but this video has no audio track: turn the "
          r"option off", use_audio_in_video=True)
