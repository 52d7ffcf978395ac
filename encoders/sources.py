"""Media references -> something a decoder can open: one resolver for the library and the server.

Design: people write a media item the way Qwen's model cards and `qwen-omni-utils` do (a local path, a
`file://` URL, a `data:` URL, an `http(s)://` URL) or the way the OpenAI API does (`image_url`, `input_audio`,
`video_url`, `audio_url` parts). `resolve` turns a string reference into a local path or the downloaded /
decoded bytes (`Blob`, bytes that remember where they came from, so messages can name them); anything else
(bytes, file objects, PIL images, arrays) passes through for `media.py` to decode. What may be read is a
`Policy`: the library reads everything (with a size cap and timeouts on downloads); the server passes a
stricter one (no downloads, local files only under one folder) and turns `MediaError.code` into its API
error codes. So there is one implementation of every reference form, and every failure is a `MediaError`
whose message names the reference and says what went wrong (empty string, folder, unsupported scheme,
malformed data URL, unreachable URL, wrong content type, oversize download), never a misleading "not found".
"""
from __future__ import annotations

import base64
import binascii
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlparse

KINDS = ("image", "audio", "video")
# OpenAI-style part type -> (media kind, key of its value). `audio_url` is vLLM's; `input_audio` is base64 + format.
OPENAI_PARTS = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[^;,]*)*)(;base64)?,(.*)$", re.S | re.I)
# Servers label binary downloads with these when they do not know better: accepted for every kind.
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream", "application/binary", "application/x-binary")
# Accepted content types per kind. Audio may arrive in a video container (mp4, webm) and the reverse.
_TYPES = {"image": ("image/",), "audio": ("audio/", "video/", "application/ogg"),
          "video": ("video/", "audio/", "application/mp4", "application/ogg", "application/x-matroska")}


class MediaError(ValueError):
    """The media a user supplied cannot be used; the message is meant to be shown to that user.

    `code` is a short machine-readable reason for policy refusals and encoding errors (the server's API error
    code); None for ordinary content problems."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Policy:
    """What a reference may point at. The library default reads anything; a server narrows it."""
    allow_remote: bool = True       # http(s) URLs are downloaded
    allow_local: bool = True        # paths and file:// URLs are read
    local_root: Path | None = None  # if set, local files must lie inside it (after resolving symlinks and ..)
    max_bytes: int = 1 << 30        # download cap; a video of a few minutes is well under it
    timeout: float = 30.0           # seconds to connect and for each read of a download
    deadline: float = 600.0         # seconds for a whole download (a server that trickles bytes is cut off)


LIBRARY = Policy()


class Blob(bytes):
    """Bytes read from a reference; `name` is how messages refer to it ('demo.jpeg', 'a data: URL')."""
    name: str

    def __new__(cls, data: bytes, name: str):
        b = super().__new__(cls, data)
        b.name = name
        return b


def describe(ref: str | Path) -> str:
    """How a message names a reference: a URL by its file name, a data: URL by its type, a path by its name."""
    s = str(ref)
    if s.lower().startswith("data:"):
        mime = _DATA_URL.match(s[:200] + ",")  # the head is enough; the payload can be megabytes
        return f"a data: URL ({mime.group(1)})" if mime and mime.group(1) else "a data: URL"
    if re.match(r"^https?://", s, re.I):
        name = Path(urlparse(s).path).name
        return f"'{name}' from {urlparse(s).netloc}" if name else f"'{s}'"
    if s.lower().startswith("file://"):
        s = s[7:]
    return f"'{Path(s).name or s}'"


def resolve(src: Any, kind: str, policy: Policy = LIBRARY) -> Any:
    """A string or Path reference -> an existing local path (str) or a `Blob`; other values pass through.

    `kind` ("image", "audio", "video" or "media") only shapes messages and the content-type check."""
    if isinstance(src, Path):
        return _local(str(src), kind, policy)
    if not isinstance(src, str):
        return src
    ref = src.strip()
    if not ref:
        raise MediaError(f"The {_noun(kind)} reference is an empty string: give a file path, a URL or the data "
                         f"itself.", code="empty_reference")
    scheme = urlparse(ref).scheme.lower() if re.match(r"^[a-zA-Z][\w+.-]+:", ref) else ""
    if scheme == "data":
        mime, data = parse_data_url(ref, kind)
        _check_type(mime, kind, "the data: URL")
        return Blob(data, describe(ref))
    if scheme in ("http", "https"):
        return fetch(ref, kind, policy)
    if scheme == "file":
        return _local(_file_url_path(ref), kind, policy, ref)
    if scheme and not Path(ref).exists():  # 'notes:v2.png' may be a real file name
        raise MediaError(f"The {_noun(kind)} reference {_short(ref)} uses the unsupported URL scheme '{scheme}:'; "
                         f"use a file path, file://, data: or http(s)://.", code="unsupported_scheme")
    return _local(src, kind, policy)  # unstripped: a file name may really end in a space


def part_media(part: Any) -> tuple[str, Any] | None:
    """(kind, value) of a media content part written either way; None for text and unknown parts.

    Qwen's format: {"type": "image", "image": X} (the chat templates also accept the key without "type").
    OpenAI's: {"type": "image_url", "image_url": {"url": U}} (or a bare string U), likewise video_url and
    audio_url; {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}} gives the bytes."""
    if not isinstance(part, dict):
        return None
    t = part.get("type")
    if t in KINDS or (t is None and (keys := [k for k in KINDS if k in part])):
        kind = t if t in KINDS else keys[0]
        return kind, part.get(kind)
    if t in OPENAI_PARTS:
        v = part.get(t)
        if t == "input_audio":
            if not isinstance(v, dict):
                raise MediaError('input_audio must be an object {"data": base64, "format": "wav" | "mp3" | ...}')
            return "audio", Blob(b64decode(v.get("data"), "input_audio.data"), "input_audio")
        url = v.get("url") if isinstance(v, dict) else v
        if not isinstance(url, str) or not url:
            raise MediaError(f"{t} must be an object with a 'url'")
        return OPENAI_PARTS[t], url
    return None


def read_bytes(src: Any, kind: str, policy: Policy = LIBRARY) -> bytes:
    """The raw bytes of a reference (what the server forwards to the processor undecoded)."""
    out = resolve(src, kind, policy)
    if isinstance(out, str):
        return Path(out).read_bytes()
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    raise TypeError(f"cannot read bytes from {type(src).__name__}")


# ---------------------------------------------------------------------------------------------- data: and base64

def b64decode(s: Any, what: str) -> bytes:
    """Standard base64, tolerating line breaks and surrounding whitespace (MIME-style wrapped payloads)."""
    if not isinstance(s, str) or not s.strip():
        raise MediaError(f"{what} must be a non-empty base64 string", code="invalid_base64")
    try:
        try:
            data = base64.b64decode(s, validate=True)
        except binascii.Error:  # strip whitespace only on this path: a regex over megabytes costs milliseconds
            data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"invalid base64 in {what}", code="invalid_base64") from None
    if not data:
        raise MediaError(f"{what} is empty", code="invalid_base64")
    return data


def parse_data_url(url: str, kind: str = "media") -> tuple[str | None, bytes]:
    """(mime type or None, payload) of an RFC 2397 data: URL, base64 or percent-encoded."""
    m = _DATA_URL.match(url.strip())
    if not m:
        raise MediaError(f"The {_noun(kind)} data: URL is malformed: expected data:<mime type>;base64,<data> "
                         f"(it starts {url[:40]!r}).", code="malformed_data_url")
    mime = m.group(1).lower() if m.group(1) else None
    data = b64decode(m.group(4), f"the {_noun(kind)} data: URL") if m.group(3) else unquote_to_bytes(m.group(4))
    if not data:
        raise MediaError(f"The {_noun(kind)} data: URL carries no data.", code="malformed_data_url")
    return mime, data


# ---------------------------------------------------------------------------------------------- http(s)

def fetch(url: str, kind: str, policy: Policy = LIBRARY) -> Blob:
    """Download with the policy's size cap, timeouts and a content-type check."""
    if not policy.allow_remote:
        raise MediaError(f"remote URLs are refused here ({_short(url)})", code="remote_media_refused")
    label = describe(url)
    req = urllib.request.Request(url, headers={"User-Agent": "qwen-omni", "Accept": "*/*"})
    start = time.monotonic()
    try:
        with _opener(url).open(req, timeout=policy.timeout) as r:
            _check_type(r.headers.get_content_type() if r.headers.get("Content-Type") else None, kind, label)
            size = r.headers.get("Content-Length")
            if size and size.isdigit() and int(size) > policy.max_bytes:
                raise _too_big(url, policy)
            data = bytearray()
            while chunk := r.read(1 << 16):
                data += chunk
                if len(data) > policy.max_bytes:
                    raise _too_big(url, policy)
                if time.monotonic() - start > policy.deadline:
                    raise MediaError(f"Downloading {url} took longer than {policy.deadline:g} s; download it "
                                     f"yourself and pass the file.", code="fetch_failed")
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"Could not fetch {url}: the server answered HTTP {e.code}.",
                         code="fetch_failed") from None
    except (TimeoutError, socket.timeout):
        raise MediaError(f"Could not fetch {url}: no answer within {policy.timeout:g} s.",
                         code="fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise MediaError(f"Could not fetch {url}: {reason}. Check the address and the network, or download it "
                         f"and pass the file.", code="fetch_failed") from None
    if not data:
        raise MediaError(f"{url} returned no data (0 bytes).", code="fetch_failed")
    return Blob(bytes(data), label)


def _opener(url: str):
    """urllib's opener; loopback hosts bypass any configured proxy, which could not reach them."""
    host = (urlparse(url).hostname or "").lower()
    if host in ("localhost", "127.0.0.1", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _too_big(url: str, policy: Policy) -> MediaError:
    return MediaError(f"{url} is larger than the {policy.max_bytes / (1 << 20):g} MB download limit.",
                      code="too_large")


def _check_type(mime: str | None, kind: str, label: str) -> None:
    """Refuse a download or data: URL that declares another kind of content (an HTML error page, a JSON body)."""
    if not mime or kind not in _TYPES:
        return
    mime = mime.lower()
    if mime.startswith(_TYPES[kind]) or mime in _GENERIC_TYPES:
        return
    raise MediaError(f"{label[0].upper()}{label[1:]} is {mime}, not {_noun(kind, article=True)} file.",
                     code="wrong_content_type")


# ---------------------------------------------------------------------------------------------- local files

def _file_url_path(url: str) -> str:
    """file:///abs/path, file://localhost/abs/path, and qwen-omni-utils' file://relative/path (it strips the
    first 7 characters); percent-escapes are decoded when the literal name does not exist."""
    rest = url[7:]
    if rest.lower().startswith("localhost/"):
        rest = rest[9:]
    if not Path(rest).exists() and Path(unquote(rest)).exists():
        return unquote(rest)
    return rest


def _local(path: str, kind: str, policy: Policy, ref: str | None = None) -> str:
    label = describe(ref or path)
    if not policy.allow_local:
        raise MediaError(f"local file paths are refused here ({label})", code="local_media_refused")
    if not path.strip():
        raise MediaError(f"The {_noun(kind)} reference {ref!r} names no file.", code="empty_reference")
    p = Path(path).expanduser()
    if policy.local_root is not None:
        root = policy.local_root.resolve()
        p = (p if p.is_absolute() else root / p).resolve()
        if not p.is_relative_to(root):
            raise MediaError(f"{path!r} is outside the media folder", code="local_media_refused")
    if not p.exists():
        raise MediaError(f"{_noun(kind).capitalize()} file {label} was not found.", code="not_found")
    if not p.is_file():
        raise MediaError(f"{label} is a folder, not {_noun(kind, article=True)} file." if p.is_dir() else
                         f"{label} is not a regular file.", code="not_a_file")
    if p.stat().st_size == 0:
        raise MediaError(f"{_noun(kind).capitalize()} file {label} is empty (0 bytes).")
    return str(p)


def _noun(kind: str, article: bool = False) -> str:
    word = kind if kind in KINDS else "media"
    return (("an " if word[0] in "aeiou" else "a ") + word) if article and word != "media" else word


def _short(ref: str) -> str:
    return repr(ref if len(ref) <= 80 else ref[:77] + "...")
