"""The OpenAI chat-completions wire format: request validation -> library messages, and response shapes.

Design
- `parse_chat_request(body, policy)` checks everything a client can get wrong before any model work, and raises
  `APIError` (status, message, type, param) whose message names the offending place, e.g.
  "messages[0].content[1]: invalid base64 in input_audio.data". Nothing here touches the model.
- Content parts -> library parts (`{"type": "image", "image": <bytes>}`, ...): `text`, `image_url`, `input_audio`
  (`{"data": base64, "format": ...}`), `video_url` and vLLM's `audio_url`. URLs may be `data:` URLs (always),
  http(s) (only with `MediaPolicy.allow_remote`; fetched with a size cap) or local files (only under
  `MediaPolicy.media_dir`, after resolving symlinks and `..`), read by the library's resolver
  (`encoders.sources`) under the policy. Media stay undecoded bytes here: the processor
  decodes them, and its errors are renamed to the part they came from (`ChatRequest.name_error`).
- Sampling fields: temperature, top_p, max_tokens / max_completion_tokens, seed, stop (string or up to 4), n=1,
  stream + stream_options.include_usage, and vLLM's extensions top_k, repetition_penalty, ignore_eos and
  mm_processor_kwargs.use_audio_in_video. `modalities: ["text", "audio"]` with `audio: {voice, format}` asks for a
  spoken reply (`ChatRequest.audio`; the voice is checked against the model's by the server); an assistant message
  that carries `audio: {"id": ...}` (an earlier spoken reply sent back) keeps the id in `audio_id`, and the
  server puts that reply's transcript in its place.
- `StopText` applies stop strings to streamed text: it holds back any tail that could still become a stop string,
  and trims the stop string itself.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encoders import sources

from .audio_out import FORMATS, canonical

AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "oga", "opus", "m4a", "aac", "webm", "weba", "pcm16"}
PART_KINDS = sources.OPENAI_PARTS
MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(where: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{where}: {message}", param=where, code=code)


@dataclass
class MediaPolicy:
    allow_remote: bool = False
    media_dir: Path | None = None
    max_remote_bytes: int = 50 << 20
    fetch_timeout: float = 10.0

    def resolver_policy(self) -> sources.Policy:
        """The same rules for the shared resolver: no local paths without a media folder, none outside it."""
        return sources.Policy(allow_remote=self.allow_remote, allow_local=self.media_dir is not None,
                              local_root=self.media_dir, max_bytes=self.max_remote_bytes,
                              timeout=self.fetch_timeout, deadline=max(60.0, 6 * self.fetch_timeout))


@dataclass
class ChatRequest:
    messages: list[dict]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    use_audio_in_video: bool | None = None
    part_names: dict[tuple[str, int], str] = field(default_factory=dict)  # ("image", 1) -> "messages[0].content[1]"
    modalities: list[str] | None = None  # as sent (None: not sent)
    audio: dict | None = None  # {"voice": str | None, "format": str} when a spoken reply is asked for

    def sampling(self, defaults: dict | None = None) -> dict:
        """Keyword arguments for `chat` / `submit`; unset fields fall back to `defaults` then OpenAI's."""
        d = defaults or {}
        return dict(temperature=self.temperature if self.temperature is not None else d.get("temperature", 1.0),
                    top_p=self.top_p if self.top_p is not None else d.get("top_p", 1.0),
                    top_k=self.top_k or d.get("top_k", 0), repetition_penalty=self.repetition_penalty,
                    seed=self.seed)

    def name_error(self, message: str) -> str:
        """Rename the processor's "image 2 of the request: ..." to "messages[1].content[0]: ..."."""
        m = re.match(r"^(image|audio|video) (\d+) of the request: ", message)
        if m and (where := self.part_names.get((m.group(1), int(m.group(2))))):
            return f"{where}: {message[m.end():]}"
        return message


# ---------------------------------------------------------------------------------------------- request parsing

def parse_chat_request(body: Any, policy: MediaPolicy) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    req = ChatRequest(messages=[], model=body.get("model"))
    counts = {"image": 0, "audio": 0, "video": 0}
    for i, m in enumerate(msgs):
        req.messages.append(_message(m, f"messages[{i}]", policy, counts, req.part_names))
    _sampling(body, req)
    return req


def _message(m: Any, where: str, policy: MediaPolicy, counts: dict, names: dict) -> dict:
    if not isinstance(m, dict):
        raise bad(where, "each message must be an object with 'role' and 'content'")
    role = m.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise bad(f"{where}.role", f"unsupported role {role!r}; use system, user or assistant")
    content = m.get("content")
    audio_id = None
    if role == "assistant" and m.get("audio") is not None:
        a = m["audio"]
        if not isinstance(a, dict) or not isinstance(a.get("id"), str) or not a["id"]:
            raise bad(f"{where}.audio", "an assistant message's audio must be {\"id\": \"<id of an earlier reply>\"}")
        audio_id = a["id"]
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        out = {"role": role, "content": content}
        if audio_id is not None:
            out["audio_id"] = audio_id
        return out
    if not isinstance(content, list):
        raise bad(f"{where}.content", "content must be a string or a list of content parts")
    parts = []
    for j, p in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(p, dict):
            raise bad(pw, "each content part must be an object with a 'type'")
        kind = p.get("type")
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise bad(pw, "a text part needs a string 'text'")
            parts.append({"type": "text", "text": p["text"]})
            continue
        if kind not in PART_KINDS:
            raise bad(pw, f"unknown content part type {kind!r}; use text, image_url, input_audio, video_url or "
                          f"audio_url", code="unknown_part_type")
        if role != "user":
            raise bad(pw, f"{kind} parts are only accepted in user messages")
        lib = PART_KINDS[kind]
        data = _input_audio(p, pw) if kind == "input_audio" else _url_part(p, kind, pw, policy)
        counts[lib] += 1
        names[(lib, counts[lib])] = pw
        parts.append({"type": lib, lib: data})
    return {"role": role, "content": parts}


def _b64(s: Any, pw: str, what: str) -> bytes:
    try:
        return sources.b64decode(s, what)
    except sources.MediaError as e:
        raise bad(pw, str(e), code=e.code) from None


def _input_audio(p: dict, pw: str) -> bytes:
    a = p.get("input_audio")
    if not isinstance(a, dict):
        raise bad(pw, "input_audio must be an object {\"data\": base64, \"format\": \"wav\" | \"mp3\" | ...}")
    fmt = a.get("format")
    if fmt is not None and str(fmt).lower() not in AUDIO_FORMATS:
        raise bad(pw, f"unsupported input_audio.format {fmt!r}; use one of {', '.join(sorted(AUDIO_FORMATS))}")
    return _b64(a.get("data"), pw, "input_audio.data")


def _url_part(p: dict, kind: str, pw: str, policy: MediaPolicy) -> bytes:
    v = p.get(kind)
    url = v.get("url") if isinstance(v, dict) else v
    if not isinstance(url, str) or not url:
        raise bad(pw, f"{kind} must be an object with a 'url'")
    return load_url(url, pw, f"{kind}.url", policy, PART_KINDS[kind])


def load_url(url: str, pw: str, what: str, policy: MediaPolicy, kind: str = "media") -> bytes:
    """Bytes of a data: URL, an allowed http(s) URL or a local file under the media folder: the library's resolver
    (`encoders.sources`) under this server's policy; its refusals get the server's hints."""
    try:
        return sources.read_bytes(url, kind, policy.resolver_policy())
    except sources.MediaError as e:
        if e.code == "remote_media_refused":
            raise bad(pw, f"remote URLs are refused by this server ({what}); send the media inline as a data: URL "
                          f"(or start the server with --allow-remote-media)", code=e.code) from None
        if e.code == "local_media_refused" and policy.media_dir is None:
            raise bad(pw, f"local file paths are refused by this server ({what}); send the media inline as a data: "
                          f"URL (or start the server with --media-dir DIR)", code=e.code) from None
        if e.code == "local_media_refused":
            raise bad(pw, f"{url!r} is outside the server's media folder", code=e.code) from None
        if e.code == "not_found":
            raise bad(pw, f"file {url!r} was not found in the server's media folder", code=e.code) from None
        raise bad(pw, f"{what}: {e}", code=e.code) from None


def _sampling(body: dict, req: ChatRequest) -> None:
    def num(name: str, lo: float, hi: float, kind=float):
        v = body.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise APIError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}", param=name)
        if not lo <= v <= hi:
            raise APIError(400, f"'{name}' must be between {lo} and {hi}; got {v}", param=name)
        return kind(v)

    if body.get("modalities") is not None:
        mods = body["modalities"]
        if not isinstance(mods, list) or not mods or not set(mods) <= {"text", "audio"}:
            raise APIError(400, "'modalities' must be a list of \"text\" and/or \"audio\"", param="modalities")
        req.modalities = list(mods)
        if "audio" in mods:
            req.audio = _audio_param(body.get("audio"))
    if num("n", 1, 1, int) not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tool calling is not supported by this server", param="tools")
    req.stream = bool(body.get("stream", False))
    opts = body.get("stream_options") or {}
    req.include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
    mt, mct = num("max_tokens", 1, 1 << 30, int), num("max_completion_tokens", 1, 1 << 30, int)
    req.max_tokens = mct if mct is not None else mt
    req.temperature = num("temperature", 0, 2)
    req.top_p = num("top_p", 1e-9, 1)
    req.top_k = num("top_k", -1, 1 << 20, int) or 0
    req.top_k = max(req.top_k, 0)  # vLLM: -1 means off
    rp = num("repetition_penalty", 1e-3, 100)
    req.repetition_penalty = rp if rp is not None else 1.0
    req.seed = num("seed", -(1 << 63), (1 << 63) - 1, int)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    req.stop = [s for s in stops if s]
    req.ignore_eos = bool(body.get("ignore_eos", False))
    mm = body.get("mm_processor_kwargs") or {}
    uav = mm.get("use_audio_in_video") if isinstance(mm, dict) else None
    uav = body.get("use_audio_in_video", uav)
    req.use_audio_in_video = None if uav is None else bool(uav)


def _audio_param(a: Any) -> dict:
    if a is None:
        a = {}
    if not isinstance(a, dict):
        raise APIError(400, "'audio' must be an object {\"voice\": ..., \"format\": ...}", param="audio")
    fmt = a.get("format", "wav")
    if not isinstance(fmt, str) or canonical(fmt) is None:
        raise APIError(400, f"unsupported audio.format {fmt!r}; use one of {', '.join(FORMATS)}",
                       param="audio.format", code="unsupported_audio_format")
    voice = a.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise APIError(400, "audio.voice must be a string", param="audio.voice")
    return {"voice": voice, "format": canonical(fmt)}


# ---------------------------------------------------------------------------------------------- stop strings

class StopText:
    """Streams text through, cutting it at the first stop string (the stop string itself is not emitted)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self.held + piece
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = 0  # the longest tail that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


# ---------------------------------------------------------------------------------------------- responses

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int | None = None, audio_tokens: int | None = None) -> dict:
    """OpenAI's usage object; with `audio_tokens` (a spoken reply) completion tokens are text + audio tokens and
    `completion_tokens_details` splits them, as the OpenAI API reports audio output."""
    total_completion = completion + (audio_tokens or 0)
    u = {"prompt_tokens": prompt, "completion_tokens": total_completion, "total_tokens": prompt + total_completion}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    if audio_tokens is not None:
        u["completion_tokens_details"] = {"text_tokens": completion, "audio_tokens": audio_tokens,
                                          "reasoning_tokens": 0}
    return u


def completion(cid: str, model: str, text: str, finish: str, use: dict, reasoning: str | None = None,
               audio: dict | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:  # vLLM's field for a thinking model's <think> part
        message["reasoning_content"] = reasoning
    if audio is not None:
        message["audio"] = audio
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}], "usage": use}


def chunk(cid: str, model: str, delta: dict | None, finish: str | None = None, use: dict | None = None) -> dict:
    c = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
         "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}]}
    if use is not None:
        c["usage"] = use
    return c
