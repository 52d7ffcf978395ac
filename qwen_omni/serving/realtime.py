"""`WS /v1/realtime`: a voice conversation over one WebSocket, a subset of the OpenAI Realtime protocol.

Design
- One `RealtimeSession` per connection. Client events: `session.update` (voice, instructions, max_output_tokens,
  turn detection `server_vad` or null, in the GA shape `session.audio.{input,output}` or the beta shape), `input_audio_buffer.append`
  (base64 pcm16, 24 kHz mono), `input_audio_buffer.commit` / `.clear`, `conversation.item.create` (a user text
  message), `response.create`, `response.cancel`. Server events: `session.created` / `.updated`,
  `input_audio_buffer.speech_started` / `speech_stopped` / `committed` / `cleared`, `response.created`,
  `response.output_audio.delta`, `response.output_audio_transcript.delta`, their `.done`, `response.done`, `error`.
- Server VAD: with turn detection on (the default), appended audio goes through a `speech.vad.Endpointer` (silero-vad)
  of this connection; "speech_stopped" commits the utterance and starts a reply by itself. Off, the client commits
  and asks for a reply.
- A reply is `Assistant.chat(speech=True)` on a worker thread (speech_api.start_chat_speech, under the scheduler's
  `exclusive()`), on the whole conversation: user turns as their recorded audio, assistant turns as the text they
  said. Earlier turns come from the assistant's KV prefix cache, so each turn prefills only its new part.
- Playback pacing: audio deltas are sent as they are produced but never more than `lead_s` ahead of real time from
  the first one, so a reply stays in progress while the client plays it. Barge-in: "speech_started" while a reply is
  in progress cancels it at once (its unsent audio is dropped, `response.done` says "cancelled"), and the history
  keeps only the transcript sent so far.
- Bad clients get `error` events and the connection goes on: invalid JSON, unknown or malformed events, invalid
  base64, frames above `max_frame_bytes`, a buffer that grows past `max_buffer_s` without a commit (it is
  cleared), a reply asked for while one runs. Each connection is isolated; the server keeps serving.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint's `WebSocket` annotation (imported inside
# install_realtime) at definition time.
import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
import uuid

import numpy as np

from ..speech.vad import Endpointer
from .backends import api_error
from .openai_api import APIError
from .speech_api import check_voice, start_chat_speech

log = logging.getLogger("qwen_omni.serving.realtime")
IN_RATE = 24000  # pcm16 input and output rate of the protocol


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeSession:
    def __init__(self, ws, backend, model: str, max_frame_bytes: int = 1 << 20, max_buffer_s: float = 60.0,
                 lead_s: float = 1.0):
        self.ws, self.backend, self.model = ws, backend, model
        self.max_frame_bytes, self.max_buffer = max_frame_bytes, int(max_buffer_s * IN_RATE)
        self.lead_s = lead_s
        self.assistant = backend.assistant
        self.voice = check_voice(self.assistant, None)
        self.instructions = ""
        self.vad_on = True
        self.max_output_tokens = 256
        self.endpointer = None
        self.buffer: list[np.ndarray] = []  # 24 kHz audio appended since the last commit
        self.buffered = 0
        self.history: list[dict] = []
        self.response: asyncio.Task | None = None
        self.job = None
        self.id = _id("sess")
        self._send_lock = asyncio.Lock()
        self.closed = False

    # ---- sending -------------------------------------------------------------------------------------------------
    async def send(self, event: dict) -> None:
        """Send one server event; once the client has gone, events are dropped (a reply may still be ending)."""
        from starlette.websockets import WebSocketDisconnect

        if self.closed:
            return
        event.setdefault("event_id", _id("event"))
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(event))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.closed = True

    async def error(self, message: str, code: str = "invalid_request_error", param: str | None = None,
                    event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code,
                                                    "message": message, "param": param, "event_id": event_id}})

    def session_object(self) -> dict:
        td = {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 600, "prefix_padding_ms": 300,
              "create_response": True, "interrupt_response": True} if self.vad_on else None
        fmt = {"type": "audio/pcm", "rate": IN_RATE}
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
                "output_modalities": ["audio"], "instructions": self.instructions,
                "max_output_tokens": self.max_output_tokens,
                "audio": {"input": {"format": fmt, "turn_detection": td},
                          "output": {"format": fmt, "voice": self.voice}}}

    # ---- the connection's loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        await self.send({"type": "session.created", "session": self.session_object()})
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                raw = msg.get("text")
                if raw is None:
                    raw = (msg.get("bytes") or b"").decode("utf-8", "replace")
                if len(raw) > self.max_frame_bytes:
                    await self.error(f"the frame is {len(raw)} bytes; the limit is {self.max_frame_bytes} "
                                     f"(send audio in smaller appends)", code="frame_too_large")
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    await self.error("the frame is not valid JSON", code="invalid_json")
                    continue
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    await self.error("each event must be a JSON object with a 'type'", code="invalid_event")
                    continue
                try:
                    await self.handle(event)
                except APIError as e:
                    await self.error(e.message, code=e.code or "invalid_request_error", param=e.param,
                                     event_id=event.get("event_id"))
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            self.cancel_response()

    async def handle(self, event: dict) -> None:
        kind = event["type"]
        if kind == "session.update":
            self.update(event.get("session"))
            await self.send({"type": "session.updated", "session": self.session_object()})
        elif kind == "input_audio_buffer.append":
            await self.append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            audio, rate = self.endpointer.flush() if self.endpointer is not None and self.vad_on else None, 16000
            raw = self.take_buffer()
            if audio is None:
                audio, rate = raw, IN_RATE
            if audio is None or audio.size == 0:
                raise APIError(400, "the input audio buffer is empty: append audio before committing",
                               code="input_audio_buffer_commit_empty")
            await self.commit(audio, rate)
            if not self.vad_on:
                return
            self.start_response(None)  # server VAD creates the response of a manually committed turn too
        elif kind == "input_audio_buffer.clear":
            self.take_buffer()
            if self.endpointer is not None:
                self.endpointer.reset()
            await self.send({"type": "input_audio_buffer.cleared"})
        elif kind == "conversation.item.create":
            self.add_item(event.get("item"))
        elif kind == "response.create":
            if self.response is not None and not self.response.done():
                raise APIError(400, "a response is already in progress; cancel it or wait for response.done",
                               code="conversation_already_has_active_response")
            r = event.get("response") or {}
            self.start_response(r.get("instructions") if isinstance(r, dict) else None)
        elif kind == "response.cancel":
            if self.response is None or self.response.done():
                raise APIError(400, "there is no response in progress to cancel", code="response_cancel_not_active")
            self.cancel_response()
        else:
            raise APIError(400, f"unknown or unsupported event type {kind!r}", code="unknown_event_type")

    # ---- client events -------------------------------------------------------------------------------------------
    def update(self, s) -> None:
        if not isinstance(s, dict):
            raise APIError(400, "session.update needs a 'session' object", param="session")
        audio = s.get("audio") if isinstance(s.get("audio"), dict) else {}
        out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        inp = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        voice = out.get("voice", s.get("voice"))
        if voice is not None:
            self.voice = check_voice(self.assistant, voice if isinstance(voice, str) else str(voice))
        limit = s.get("max_output_tokens", s.get("max_response_output_tokens"))
        if limit is not None:
            if limit == "inf":
                limit = 4096
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 4096:
                raise APIError(400, "max_output_tokens must be an integer from 1 to 4096 or \"inf\"",
                               param="session.max_output_tokens")
            self.max_output_tokens = limit
        if "instructions" in s:
            if not isinstance(s["instructions"], str):
                raise APIError(400, "session.instructions must be a string", param="session.instructions")
            self.instructions = s["instructions"]
        for td in ([inp["turn_detection"]] if "turn_detection" in inp else []) + \
                ([s["turn_detection"]] if "turn_detection" in s else []):
            if td is None:
                self.vad_on = False
            elif isinstance(td, dict) and td.get("type") == "server_vad":
                self.vad_on = True
                self.endpointer = None  # rebuilt with the new settings at the next append
                self._vad_settings = td
            else:
                raise APIError(400, "turn_detection must be {\"type\": \"server_vad\", ...} or null",
                               param="session.turn_detection")

    async def append(self, b64) -> None:
        if not isinstance(b64, str) or not b64:
            raise APIError(400, "input_audio_buffer.append needs 'audio': base64 pcm16", param="audio")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "invalid base64 in 'audio'", param="audio", code="invalid_base64") from None
        if len(raw) % 2:
            raw = raw[:-1]
        audio = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        self.buffer.append(audio)
        self.buffered += audio.size
        if not self.vad_on:
            if self.buffered > self.max_buffer:
                self.take_buffer()
                raise APIError(400, f"the input audio buffer passed {self.max_buffer / IN_RATE:g} s without a "
                                    f"commit; it was cleared", code="input_audio_buffer_too_long")
            return
        if self.endpointer is None:
            self.endpointer = await asyncio.to_thread(self._new_endpointer)
        for ev in self.endpointer.push(audio, IN_RATE):
            ms = int(ev.at * 1000)
            if ev.kind == "speech_started":
                barged = self.cancel_response()
                await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms,
                                 "item_id": _id("item"), "interrupted_response": barged})
            else:
                await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms,
                                 "item_id": _id("item")})
                self.take_buffer()
                utt = self.endpointer.take_utterance()
                if utt is not None and utt.size:
                    await self.commit(utt, 16000)
                    self.start_response(None)
        if not self.endpointer.speaking and self.buffered > self.max_buffer:
            self.take_buffer()  # silence only: nothing to keep (the endpointer holds just its padding)

    def _new_endpointer(self):
        td = getattr(self, "_vad_settings", {}) or {}
        return Endpointer(threshold=float(td.get("threshold", 0.5)), silence_ms=int(td.get("silence_duration_ms", 600)),
                          padding_ms=int(td.get("prefix_padding_ms", 300)),
                          max_utterance_s=self.max_buffer / IN_RATE)

    def take_buffer(self) -> np.ndarray | None:
        audio = np.concatenate(self.buffer) if self.buffer else None
        self.buffer, self.buffered = [], 0
        return audio

    async def commit(self, audio: np.ndarray, rate: int) -> None:
        item = _id("item")
        self.history.append({"role": "user", "content": [{"type": "audio", "audio": (rate, audio)}]})
        await self.send({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": None})

    def add_item(self, item) -> None:
        if not isinstance(item, dict) or item.get("role") != "user" or not isinstance(item.get("content"), list):
            raise APIError(400, "conversation.item.create takes a user message with content parts", param="item")
        text = "".join(p.get("text", "") for p in item["content"] if isinstance(p, dict)
                       and p.get("type") in ("input_text", "text"))
        if not text:
            raise APIError(400, "the item has no input_text part", param="item.content")
        self.history.append({"role": "user", "content": text})

    # ---- replies ---------------------------------------------------------------------------------------------------
    def messages(self, instructions: str | None) -> list[dict]:
        system = instructions if instructions is not None else self.instructions
        return ([{"role": "system", "content": system}] if system else []) + list(self.history)

    def start_response(self, instructions: str | None) -> None:
        if not self.history or self.history[-1]["role"] != "user":
            asyncio.ensure_future(self.error("nothing to answer: commit audio or add a user item first",
                                             code="no_user_turn"))
            return
        self.response = asyncio.ensure_future(self.reply(self.messages(instructions)))

    def cancel_response(self) -> bool:
        """Cancel the reply in progress (True if there was one)."""
        if self.response is None or self.response.done():
            return False
        if self.job is not None:
            self.job.cancel()
        self.response.cancel()
        return True

    async def reply(self, messages: list[dict]) -> None:
        rid, item = _id("resp"), _id("item")
        base = {"response_id": rid, "item_id": item, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.created", "response": {"id": rid, "object": "realtime.response",
                                                                 "status": "in_progress", "output": []}})
        texts: list[str] = []
        status, reason = "completed", None
        job = self.job = start_chat_speech(self.assistant, self.backend.scheduler.exclusive(), messages, self.voice,
                                           {"temperature": 0.0}, self.max_output_tokens, {})
        first_audio, sent_s = None, 0.0
        try:
            while not job.done:
                for kind, value in await job.next():
                    if kind == "text":
                        texts.append(value)
                        await self.send({"type": "response.output_audio_transcript.delta", **base, "delta": value})
                        continue
                    now = time.monotonic()
                    if first_audio is None:
                        first_audio = now
                    ahead = first_audio + sent_s - self.lead_s - now
                    if ahead > 0:  # do not run more than lead_s ahead of the client's playback
                        await asyncio.sleep(ahead)
                    pcm = (np.clip(value, -1, 1) * 32767).astype("<i2").tobytes()
                    await self.send({"type": "response.output_audio.delta", **base,
                                     "delta": base64.b64encode(pcm).decode()})
                    sent_s += value.size / IN_RATE
            if first_audio is not None and (rest := first_audio + sent_s - self.lead_s - time.monotonic()) > 0:
                await asyncio.sleep(rest)
        except asyncio.CancelledError:
            status, reason = "cancelled", "turn_detected"
        except Exception as e:  # noqa: BLE001 - this reply failed; the session goes on
            status = "failed"
            err = api_error(e)
            await self.error(err.message, code=err.code or "response_failed")
        finally:
            job.cancel()
        transcript = "".join(texts)
        if transcript:
            self.history.append({"role": "assistant", "content": transcript})
        if status == "completed":
            await self.send({"type": "response.output_audio.done", **base})
            await self.send({"type": "response.output_audio_transcript.done", **base, "transcript": transcript})
        s = job.stats
        await self.send({"type": "response.done", "response": {
            "id": rid, "object": "realtime.response", "status": status,
            "status_details": {"type": status, "reason": reason} if reason else None,
            "output": [{"id": item, "type": "message", "role": "assistant", "status": status,
                        "content": [{"type": "output_audio", "transcript": transcript}]}],
            "usage": {"input_tokens": s.get("prompt_tokens", 0), "output_tokens": s.get("completion_tokens", 0),
                      "total_tokens": s.get("prompt_tokens", 0) + s.get("completion_tokens", 0),
                      "input_token_details": {"cached_tokens": s.get("reused_tokens", 0)}}}})


def install_realtime(app, cfg, state, model_name) -> None:
    """Add `WS /v1/realtime` to the server's app."""
    from fastapi import WebSocket

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await ws.accept()
        if cfg.api_key is not None:
            got = ws.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
                await ws.send_text(json.dumps({"type": "error", "error": {
                    "type": "invalid_request_error", "code": "invalid_api_key",
                    "message": "missing or wrong API key: send 'Authorization: Bearer <key>'"}}))
                await ws.close(1008)
                return
        backend = state.backend
        problem = None
        if backend is None:
            problem = "the model is still loading; retry in a few seconds"
        elif getattr(backend, "assistant", None) is None:
            problem = ("the realtime endpoint needs the model in the server process; this server runs it elsewhere "
                       "(--backend openai or --engine-process)")
        if problem is None:
            try:
                session = RealtimeSession(ws, backend, model_name())
            except APIError as e:
                problem = e.message
        if problem is not None:
            await ws.send_text(json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                                      "code": "unavailable", "message": problem}}))
            await ws.close(1011)
            return
        try:
            await session.run()
        except Exception:  # noqa: BLE001 - one connection's failure must not touch the others
            log.exception("realtime session failed")
