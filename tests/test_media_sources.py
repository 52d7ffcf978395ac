"""Every way a media item can be written (encoders.sources + the processor), and an accurate error for each way it
can be wrong.

Each input form is checked against the same file read from a local path: a path string, a `Path`, `file://`,
a `data:` URL, an `http://` URL (a file server on 127.0.0.1), raw bytes, PIL / numpy, OpenAI part types, and for
video a list of frames. Errors: empty string, folder, unsupported scheme, malformed data URL, unreachable URL,
HTTP error, oversize download, wrong content type, a server that does not answer; none of them may say "not found".
"""
from __future__ import annotations

import base64
import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qwen_omni
from encoders import sources, video
from encoders.media import MediaError, load_audio, load_image
from qwen_omni.errors import InputError

from .test_media import encode_video, write_wav
from .tiny_omni import make_thinker


class Handler(SimpleHTTPRequestHandler):
    """Static files, plus /slow (answers after 3 s) and /nolength.png (no Content-Length: a streamed body)."""

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(3)
        if self.path == "/nolength.png":
            data = (Path(self.directory) / "cat.png").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep pytest's output clean
        pass


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """The size and content-type checks hang up mid-transfer on purpose: no traceback for that."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(d / "cat.png")
    write_wav(d / "tone.wav", 16000, 1.0, 2)
    encode_video(d / "clip.mp4", "mp4", "libx264", 20, fps=10, audio="aac")
    (d / "notes.txt").write_text("not media")
    (d / "album").mkdir()
    (d / "a b.png").write_bytes((d / "cat.png").read_bytes())
    return d


@pytest.fixture(scope="module")
def http(files):
    httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(files)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def data_url(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def forms(files: Path, http: str, name: str, mime: str) -> dict:
    """Every reference form of one file."""
    f = files / name
    return {"path": str(f), "Path": f, "file://": f.as_uri(), "file:// as qwen-omni-utils writes": "file://" + str(f),
            "data:": data_url(mime, f.read_bytes()), "http": f"{http}/{name}", "bytes": f.read_bytes()}


# ------------------------------------------------------------------------------------------- input forms

def test_image_forms(files, http):
    want = np.asarray(load_image(files / "cat.png"))
    for form, src in forms(files, http, "cat.png", "image/png").items():
        assert np.array_equal(np.asarray(load_image(src)), want), form
    assert np.array_equal(np.asarray(load_image(Image.open(files / "cat.png"))), want)
    assert np.array_equal(np.asarray(load_image(want)), want)
    assert np.array_equal(np.asarray(load_image(f"{http}/nolength.png")), want)  # a body without a length
    assert np.array_equal(np.asarray(load_image((files / "a b.png").as_uri())), want)  # file:// with %20


def test_audio_forms(files, http):
    want = load_audio(files / "tone.wav")
    for form, src in forms(files, http, "tone.wav", "audio/wav").items():
        assert np.array_equal(load_audio(src), want), form
    assert np.allclose(load_audio((16000, want)), want)
    assert np.allclose(load_audio(want), want)


def test_video_forms(files, http):
    want = video.load_video(files / "clip.mp4", with_audio=True)
    for form, src in forms(files, http, "clip.mp4", "video/mp4").items():
        got = video.load_video(src, with_audio=True)
        assert np.array_equal(got.frames, want.frames) and np.array_equal(got.audio, want.audio), form
    frames = [Image.fromarray(f) for f in want.frames]
    assert np.array_equal(video.stack_frames(frames), want.frames)
    assert np.array_equal(video.stack_frames(want.frames), want.frames)
    paths = []
    for i, f in enumerate(want.frames):
        Image.fromarray(f).save(files / f"frame{i}.png")
        paths.append((files / f"frame{i}.png").as_uri())
    assert np.array_equal(video.stack_frames(paths), want.frames)


def test_data_url_variants():
    raw = b"\x89PNG fake"
    assert sources.parse_data_url(data_url("image/png", raw)) == ("image/png", raw)
    assert sources.parse_data_url("data:,hello%20world") == (None, b"hello world")  # RFC 2397 percent-encoding
    wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(raw * 40).decode()[i:i + 76]
                                                    for i in range(0, 480, 76))
    assert sources.parse_data_url(wrapped)[1] == raw * 40


def test_openai_part_types_in_the_library(files):
    assert sources.part_media({"type": "image_url", "image_url": {"url": "x.png"}}) == ("image", "x.png")
    assert sources.part_media({"type": "image_url", "image_url": "x.png"}) == ("image", "x.png")
    assert sources.part_media({"type": "video_url", "video_url": {"url": "v.mp4"}}) == ("video", "v.mp4")
    assert sources.part_media({"type": "audio_url", "audio_url": {"url": "a.wav"}}) == ("audio", "a.wav")
    raw = (files / "tone.wav").read_bytes()
    kind, blob = sources.part_media({"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(),
                                                                             "format": "wav"}})
    assert kind == "audio" and blob == raw
    assert sources.part_media({"image": "x.png"}) == ("image", "x.png")  # the templates accept a bare key too
    assert sources.part_media({"type": "text", "text": "hi"}) is None
    with pytest.raises(MediaError, match="invalid base64 in input_audio.data"):
        sources.part_media({"type": "input_audio", "input_audio": {"data": "@@", "format": "wav"}})


# ------------------------------------------------------------------------------------------- errors

def error(src, kind="image", **policy) -> str:
    with pytest.raises(MediaError) as e:
        sources.resolve(src, kind, sources.Policy(**policy)) if policy else (
            load_image(src) if kind == "image" else load_audio(src) if kind == "audio" else video.load_video(src))
    return str(e.value)


def test_reference_errors_are_accurate(files, http):
    assert "empty string" in error("") and "empty string" in error("   ", "audio")
    assert "is a folder, not an image file" in error(str(files / "album"))
    msg = error("ftp://example.com/cat.png")
    assert "unsupported URL scheme 'ftp:'" in msg and "http(s)" in msg
    assert "unsupported URL scheme 's3:'" in error("s3://bucket/clip.mp4", "video")
    assert "malformed" in error("data:image/png;base64")  # no comma: not a data URL at all
    assert "invalid base64" in error("data:image/png;base64,@@@@")
    assert "carries no data" in error("data:image/png,")
    assert "text/plain, not an image" in error(data_url("text/plain", b"hi"))
    assert "was not found" in error(str(files / "missing.png"))  # the one case that is "not found"
    assert "'missing.png' was not found" in error((files / "missing.png").as_uri())


def test_url_errors_are_accurate(files, http):
    msg = error("http://127.0.0.1:1/cat.png")  # nothing listens on port 1
    assert msg.startswith("Could not fetch http://127.0.0.1:1/cat.png") and "not found" not in msg.lower()
    assert "HTTP 404" in error(f"{http}/missing.png")
    msg = error(f"{http}/notes.txt")
    assert "text/plain, not an image" in msg and "'notes.txt'" in msg
    assert "not an audio" in error(f"{http}/cat.png", "audio")
    assert "larger than the" in error(f"{http}/cat.png", max_bytes=100)  # Content-Length says so up front
    assert "larger than the" in error(f"{http}/nolength.png", max_bytes=100)  # found while reading
    t = time.monotonic()
    assert "no answer within 0.5 s" in error(f"{http}/slow", timeout=0.5)
    assert time.monotonic() - t < 2.5
    assert error(f"{http}/cat.png", allow_remote=False).startswith("remote URLs are refused")
    assert error(str(files / "cat.png"), allow_local=False).startswith("local file paths are refused")
    assert "outside the media folder" in error("../cat.png", local_root=files / "album")


# ------------------------------------------------------------------------------------------- through the library

@pytest.fixture(scope="module")
def bot(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25_sources")
    make_thinker(d, "qwen2_5")
    return qwen_omni.load(d, device="cpu", dtype="float32")


def same_inputs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_chat_takes_every_form_alike(bot, files, http):
    def ask(*parts):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is it?"}]}]

    for kind, name, mime in (("image", "cat.png", "image/png"), ("audio", "tone.wav", "audio/wav"),
                             ("video", "clip.mp4", "video/mp4")):
        want = bot.prepare(ask({"type": kind, kind: str(files / name)}))
        for form, src in forms(files, http, name, mime).items():
            assert same_inputs(bot.prepare(ask({"type": kind, kind: src})), want), (kind, form)
        openai = {"type": f"{kind}_url", f"{kind}_url": {"url": f"{http}/{name}"}}
        assert same_inputs(bot.prepare(ask(openai)), want), kind
    raw = (files / "tone.wav").read_bytes()
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": "wav"}}
    assert same_inputs(bot.prepare(ask(audio)), bot.prepare(ask({"type": "audio", "audio": raw})))
    frames = [Image.fromarray(f) for f in video.load_video(files / "clip.mp4").frames]
    by_list = bot.prepare(ask({"type": "video", "video": frames}))
    by_dict = bot.prepare(ask({"type": "video", "video": {"frames": np.stack([np.asarray(f) for f in frames]),
                                                          "fps": 2.0}}))
    assert same_inputs(by_list, by_dict)
    url = {"type": "image", "image": data_url("image/png", (files / "cat.png").read_bytes())}
    assert isinstance(bot.chat(ask(url), max_new_tokens=3), str)


def test_chat_errors_name_the_part(bot, files, http):
    def fails(src, kind="image") -> str:
        with pytest.raises((MediaError, InputError)) as e:
            bot.prepare([{"role": "user", "content": [{"type": kind, kind: src}, {"type": "text", "text": "?"}]}])
        return str(e.value)

    assert fails("") == ("image 1 of the request: The image reference is an empty string: give a file path, a URL "
                         "or the data itself.")
    assert "image 1 of the request" in fails("data:image/png;base64,@@") and "carries no data" in fails("data:,")
    assert "is a folder" in fails(str(files / "album"), "audio")
    assert "Could not fetch" in fails("http://127.0.0.1:1/demo.jpeg", "video")
    assert "unsupported URL scheme" in fails("gs://bucket/cat.png")
    with pytest.raises(InputError, match="unknown content part type 'hologram'"):
        bot.prepare([{"role": "user", "content": [{"type": "hologram", "hologram": 1}]}])
