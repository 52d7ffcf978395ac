"""Helpers for the serving tests and benchmarks: the model to serve, small media files, in-process servers.

The model is the embedded one (assets/tiny-omni) once it exists, else a tiny random Qwen3-Omni thinker built by
transformers (real image/audio/video support, random weights).
"""
from __future__ import annotations

import base64
import io
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "assets" / "tiny-omni"


def omni_model_dir(tmp_dir: Path) -> Path:
    """assets/tiny-omni when present, else a tiny random Qwen3-Omni thinker saved under tmp_dir."""
    if (EMBEDDED / "config.json").is_file():
        return EMBEDDED
    from tests.tiny_omni import make_thinker

    d = Path(tmp_dir) / "tiny-qwen3-omni"
    if not (d / "config.json").is_file():
        make_thinker(d, "qwen3")
    return d


def png_bytes(w: int = 64, h: int = 64, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, freq: float = 440.0, rate: int = 16000) -> bytes:
    from qwen_omni.speech.offline_voice import wav_bytes as encode

    t = np.arange(int(seconds * rate)) / rate
    return encode(0.3 * np.sin(2 * np.pi * freq * t), rate)


def mp4_bytes(frames: int = 8, size: int = 64, fps: int = 4, seed: int = 0) -> bytes:
    """A short silent MP4 (MPEG-4 Part 2 or H.264) of moving noise blocks, made with PyAV."""
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        vs = out.add_stream(codec, rate=Fraction(fps))
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size, size, 3), np.uint8)
            img[:, :] = rng.integers(0, 256, 3)
            x = (i * 6) % (size - 16)
            img[8:24, x:x + 16] = 255
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode())
    return buf.getvalue()


def data_url(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def start_local_server(model_dir: Path, *, max_batch: int = 4, max_queue: int = 64, max_model_len: int = 2048,
                       prefix_cache_size: int = 16, **cfg):
    """(url, stop, backend): our server with a local model on a free loopback port, in this process."""
    import qwen_omni
    from qwen_omni.serving.backends import LocalBackend
    from qwen_omni.serving.server import ServeConfig, create_app, serve_in_thread

    holder = {}

    def load():
        holder["backend"] = LocalBackend(qwen_omni.load(model_dir, device="cpu"), max_batch, max_queue, max_model_len,
                                       prefix_cache_size)
        return holder["backend"]
    url, stop = serve_in_thread(create_app(ServeConfig(**cfg), load))
    wait_ready(url)
    return url, stop, holder["backend"]


def wait_ready(url: str, timeout: float = 120.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/health", timeout=5).status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready")


def ask(client, content, max_tokens=12, **kw):
    """One greedy chat completion (openai client) of a single user message."""
    return client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=max_tokens,
                                          temperature=0, messages=[{"role": "user", "content": content}], **kw)


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Poll /health until no request is active or waiting; returns that health report."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"slots still busy: {h}")
