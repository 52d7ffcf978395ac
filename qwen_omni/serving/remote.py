"""`RemoteAssistant`: the `Assistant.chat` interface, answered by any OpenAI-compatible server (vLLM, vLLM-Omni,
our own `python -m qwen_omni serve`, ...).

Design
- Same call as `Assistant.chat(messages, stream=..., max_new_tokens, temperature, top_p, top_k, seed, stats, ...)`
  with the library's message format (parts `{"type": "image", "image": path | bytes | PIL | array}`, audio, video),
  so the Gradio app and our server's `--backend openai` switch backends without other changes. `prepare()` has
  no remote equivalent and raises `RemoteUnsupportedError`.
- Media travel inline, as the OpenAI format requires: images as `image_url` data URLs, audio as `input_audio`
  (base64 + format; wav and mp3 are sent as they are, anything else is decoded and re-encoded as 16-bit wav),
  videos as `video_url` data URLs; http(s) and data: URLs given as sources are passed through untouched.
- Always streams from the server (`stream_options.include_usage`), so TTFT and usage are known for `stats`;
  with stream=False the pieces are joined. Closing the returned generator closes the HTTP response, which is
  how the server learns the client left (ours then frees the slot).
- Parameters OpenAI proper does not know (top_k, repetition_penalty, ignore_eos, mm_processor_kwargs - vLLM
  extensions) are sent only when they differ from their neutral value.
- Errors: the server refusing the request (HTTP 4xx other than auth/rate limits) -> `RemoteRequestError`
  (an `InputError`, carrying the status and the server's message); anything about reaching or using the server
  (connection, auth, 429, 5xx, an error mid-stream) -> `RemoteError`.
"""
from __future__ import annotations

import base64
import io
import json
import time
import wave
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np

from encoders import media, sources

from ..errors import InputError, QwenOmniError
from ..speech.pipeline import join_spoken


class RemoteError(QwenOmniError):
    """The remote server could not be reached or failed (status None for connection problems)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RemoteRequestError(InputError):
    """The remote server refused the request as invalid; `message` is the server's own."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status, self.message = status, message


class RemoteUnsupportedError(QwenOmniError):
    """An `Assistant` feature that a remote backend cannot offer."""


def normalize_base_url(url: str) -> str:
    """'http://h:8000' -> 'http://h:8000/v1'; a URL with a path is kept as given (minus a trailing slash)."""
    url = url.rstrip("/")
    return url + "/v1" if urlparse(url).path in ("", "/") else url


class RemoteAssistant:
    is_remote = True
    kind = "remote (OpenAI-compatible)"
    dtype = "remote"
    tokenizer = processor = None

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0, connect_timeout: float = 10.0):
        import httpx

        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.context_window: int | None = None
        self.voices: list[str] = []
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout))

    # ---- facts (what the app's model card and start-up line show) -------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.model or "remote")

    @property
    def device(self) -> str:
        return self.base_url

    def connect(self) -> "RemoteAssistant":
        """Check that the server answers and pick its (first) model unless one was named."""
        data = self._get_json("/models")
        models = [m for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
        if not models:
            raise RemoteError(f"the model server at {self.base_url} lists no models")
        chosen = next((m for m in models if m["id"] == self.model), None) if self.model else models[0]
        if chosen is None:
            raise RemoteError(f"the model server at {self.base_url} does not serve {self.model!r} "
                              f"(it serves {', '.join(m['id'] for m in models)})")
        self.model = chosen["id"]
        self.voices = [v for v in chosen.get("voices") or [] if isinstance(v, str)]  # our servers list them
        self.context_window = chosen.get("max_model_len")
        return self

    def close(self) -> None:
        self._client.close()

    def prepare(self, messages: list[dict], *args: Any, **options: Any) -> dict:
        raise RemoteUnsupportedError("prepare() is not available for a remote backend: the remote server applies "
                                     "its own chat template and media processing")

    # ---- chatting ------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, max_new_tokens: int | None = 512, temperature: float | None = 0.0,
             top_p: float | None = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
             stream: bool = False, stats: dict | None = None, stop: list[str] | None = None,
             ignore_eos: bool = False, use_audio_in_video: bool | None = None, speech: bool = False,
             voice: str = "default", **options: Any) -> str | Iterator[str]:
        """Like `Assistant.chat`; None for max_new_tokens / temperature / top_p leaves them to the server.

        `modalities` is always sent: ["text"], or with speech=True ["text", "audio"] and `audio: {voice, format:
        "pcm16"}` (voice "default" leaves the choice to the server); the server's streamed `delta.audio` chunks
        come out as float32 24 kHz arrays between the text pieces, as `Assistant.chat(speech=True)` yields them,
        and `stats["audio_id"]` is the reply's audio id."""
        if options:
            raise InputError(f"unknown option(s) for a remote backend: {', '.join(sorted(options))}")
        body: dict[str, Any] = {"messages": to_openai_messages(messages), "stream": True,
                                "stream_options": {"include_usage": True}, "modalities": ["text"]}
        if speech:
            body["modalities"] = ["text", "audio"]
            body["audio"] = {"format": "pcm16", **({"voice": voice} if voice and voice != "default" else {})}
        for key, value in (("max_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                           ("seed", seed)):
            if value is not None:
                body[key] = value
        if stop:
            body["stop"] = list(stop)
        if top_k:
            body["top_k"] = top_k
        if repetition_penalty != 1.0:
            body["repetition_penalty"] = repetition_penalty
        if ignore_eos:
            body["ignore_eos"] = True
        if use_audio_in_video is not None and _has_video(messages):
            body["mm_processor_kwargs"] = {"use_audio_in_video": bool(use_audio_in_video)}
        pieces = self._stream(body, stats if stats is not None else {}, audio=speech)
        if stream:
            return pieces
        if not speech:
            return "".join(pieces)
        return join_spoken(pieces)

    def _stream(self, body: dict, stats: dict, audio: bool = False) -> Iterator[str | np.ndarray]:
        import httpx

        if self.model is None:
            self.connect()
        body = {"model": self.model, **body}
        t0 = time.perf_counter()
        ttft, n_pieces = None, 0
        try:
            with self._client.stream("POST", self.base_url + "/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._http_error(r.status_code, r.text)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RemoteError(f"the model server failed mid-answer: {_message(event)}")
                    if event.get("usage"):
                        u = event["usage"]
                        stats.update(prompt_tokens=u.get("prompt_tokens"), completion_tokens=u.get("completion_tokens"),
                                     reused_tokens=(u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                        if (u.get("completion_tokens_details") or {}).get("audio_tokens") is not None:
                            details = u["completion_tokens_details"]
                            stats.update(audio_tokens=details["audio_tokens"],
                                         completion_tokens=details.get("text_tokens", u.get("completion_tokens")))
                    for choice in event.get("choices") or []:
                        if choice.get("finish_reason"):
                            stats["finish_reason"] = choice["finish_reason"]
                        delta = choice.get("delta") or {}
                        spoken = delta.get("audio") if audio else None  # (never mixed into a text reply)
                        if isinstance(spoken, dict):
                            stats.setdefault("audio_id", spoken.get("id"))
                            if spoken.get("data"):
                                pcm = base64.b64decode(spoken["data"])
                                yield np.frombuffer(pcm[:len(pcm) // 2 * 2], "<i2").astype(np.float32) / 32768
                        piece = delta.get("content")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            n_pieces += 1
                            yield piece
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach the model server at {self.base_url}: {e}") from None
        finally:
            dt = time.perf_counter() - t0
            n = stats.get("completion_tokens") or n_pieces
            stats.update(time_to_first_token=ttft, total_time=dt,
                         tokens_per_second=(n - 1) / (dt - ttft) if ttft and n > 1 and dt > ttft else None)

    def _get_json(self, path: str) -> dict:
        import httpx

        try:
            r = self._client.get(self.base_url + path)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach the model server at {self.base_url}: {e}") from None
        if r.status_code >= 400:
            raise self._http_error(r.status_code, r.text)
        return r.json()

    def _http_error(self, status: int, text: str) -> QwenOmniError:
        try:
            msg = _message(json.loads(text))
        except ValueError:
            msg = text.strip()[:300] or "no details"
        if status in (401, 403):
            return RemoteError(f"the model server at {self.base_url} refused the API key (HTTP {status}): {msg}",
                               status)
        if status == 429:
            return RemoteError(f"the model server is busy (HTTP 429): {msg}", status)
        if 400 <= status < 500:
            return RemoteRequestError(msg, status)
        return RemoteError(f"the model server failed (HTTP {status}): {msg}", status)


def _message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return str(err or body)


def _has_video(messages: list[dict]) -> bool:
    return any(isinstance(p, dict) and p.get("type") == "video"
               for m in messages if isinstance(m.get("content"), list) for p in m["content"])


# ---------------------------------------------------------------------------------------------- media encoding

def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Library messages -> OpenAI chat messages with inline media."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError("each message must be a dict with 'role' and 'content'")
        c = m["content"]
        if isinstance(c, str):
            out.append({"role": m["role"], "content": c})
            continue
        parts = []
        for p in c:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": p.get("text", "")})
            elif kind in ("image", "audio", "video"):
                if p.get(kind) is None:
                    raise InputError(f"a {kind} part has no '{kind}' value")
                parts.append(media_part(kind, p[kind]))
            elif kind in ("image_url", "input_audio", "video_url", "audio_url"):
                parts.append(p)  # already in the wire format
            else:
                raise InputError(f"unknown content part type {kind!r}; use text, image, audio or video")
        out.append({"role": m["role"], "content": parts})
    return out


def media_part(kind: str, src: Any) -> dict:
    if isinstance(src, str) and src.startswith(("http://", "https://", "data:")):
        key = {"image": "image_url", "audio": "audio_url", "video": "video_url"}[kind]
        return {"type": key, key: {"url": src}}
    raw = _read(kind, src) if isinstance(src, (str, Path, bytes, bytearray, memoryview)) else None
    if kind == "image":
        mime = _sniff_image(raw) if raw is not None else None
        if mime is None:  # PIL image, array, or bytes in a format we would rather not forward
            buf = io.BytesIO()
            media.load_image(raw if raw is not None else src).save(buf, "PNG")
            raw, mime = buf.getvalue(), "image/png"
        return {"type": "image_url", "image_url": {"url": _data_url(mime, raw)}}
    if kind == "audio":
        fmt = _sniff_audio(raw) if raw is not None else None
        if fmt is None:
            raw, fmt = _to_wav(raw if raw is not None else src), "wav"
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}
    if raw is None:
        raise InputError("a video for a remote backend must be a file path, bytes or a URL (not decoded frames)")
    return {"type": "video_url", "video_url": {"url": _data_url(_sniff_video(raw), raw)}}


def _read(kind: str, src: Any) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    return sources.read_bytes(src, kind)  # the library's reader: paths and file:// URLs, with its messages


def _data_url(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _sniff_image(b: bytes) -> str | None:
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if b.startswith(magic):
            return mime
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return "image/webp"
    return None


def _sniff_audio(b: bytes) -> str | None:
    if b[:4] == b"RIFF" and b[8:12] == b"WAVE":
        return "wav"
    if b[:3] == b"ID3" or (len(b) > 1 and b[0] == 0xFF and (b[1] & 0xE0) == 0xE0):
        return "mp3"
    return None


def _sniff_video(b: bytes) -> str:
    if b[4:8] == b"ftyp":
        return "video/quicktime" if b[8:10] == b"qt" else "video/mp4"
    if b[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm"
    if b[:4] == b"RIFF" and b[8:11] == b"AVI":
        return "video/x-msvideo"
    return "video/mp4"


def _to_wav(src: Any, rate: int = 16000) -> bytes:
    """Decode any audio we can read and write it as 16-bit mono wav (what every server accepts)."""
    x = media.load_audio(src, sr=rate)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()
