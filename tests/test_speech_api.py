"""Spoken replies through the server, driven by the official `openai` client: chat completions with audio
(non-streaming, streaming, every format, voices, `audio: {id}` follow-ups, usage, errors), `/v1/audio/speech`, and
the `/v1/realtime` WebSocket (server VAD on espeak-ng speech, a second turn, barge-in, a bad client).

Each test runs on the embedded model (offline espeak-ng voice) and on a tiny random full Qwen3-Omni checkpoint
(its talker and vocoder). Audio is checked by decoding it with PyAV.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import av
import httpx
import numpy as np
import openai
import pytest

from .serve_utils import EMBEDDED, start_local_server

pytestmark = pytest.mark.skipif(not __import__("shutil").which("espeak-ng"), reason="needs espeak-ng")


@pytest.fixture(scope="module", params=["embedded", "qwen3-talker"])
def served(request, tmp_path_factory):
    if request.param == "embedded":
        d = EMBEDDED
    else:
        from .tiny_speech import make_qwen3_full

        d = tmp_path_factory.mktemp("q3-full") / "tiny-qwen3-omni-full"
        make_qwen3_full(d, seed=2)
    url, stop, backend = start_local_server(d, max_batch=2)
    if request.param != "embedded":  # a random talker rarely emits its end code: cap each reply (as --max-audio-seconds)
        from qwen_omni.engine.sampling import SamplingParams

        backend.assistant.speech.max_audio_seconds = 3.0
        # greedy talker: the reference's sampled codes may end a random talker's audio at once, which made the
        # realtime tests depend on chance; greedy, every reply here has its full 3 s
        backend.assistant.speech.load().talker_params = SamplingParams(temperature=0.0)
    yield request.param, url, backend
    stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def decode(raw: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(raw)) as c:
        frames = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
        rate = c.streams.audio[0].sample_rate
    x = np.concatenate(frames).astype(np.float32)
    return (x / 32768.0 if np.abs(x).max() > 2 else x), rate


def audible(x: np.ndarray, rate: int) -> None:
    assert x.size / rate > 0.3, f"only {x.size / rate:.2f} s of audio"
    assert float(np.sqrt(np.mean(x ** 2))) > 1e-3, "the audio is silent"


def say(client, model, text="hello", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 24), **kw)


def test_voices_listed(client, served):
    voices = client.models.list().data[0].model_extra["voices"]
    assert voices == served[2].assistant.speech.voices and voices


def test_non_streaming_audio(client, model):
    r = say(client, model, modalities=["text", "audio"], audio={"voice": "default", "format": "wav"})
    msg = r.choices[0].message
    assert msg.audio.transcript == msg.content and msg.content
    assert msg.audio.id.startswith("audio_") and msg.audio.expires_at > time.time()
    audible(*decode(base64.b64decode(msg.audio.data)))
    d = r.usage.completion_tokens_details
    assert d.audio_tokens > 0 and d.text_tokens + d.audio_tokens == r.usage.completion_tokens


def test_text_only_unchanged(client, model):
    a, b = say(client, model), say(client, model, modalities=["text"])
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.audio is None and a.usage.completion_tokens_details is None


def test_streaming_audio_before_last_text(client, model):
    events, audio = [], []
    for ch in say(client, model, modalities=["text", "audio"], audio={"voice": "default", "format": "pcm16"},
                  stream=True, stream_options={"include_usage": True}, max_tokens=40):
        if not ch.choices:
            assert ch.usage.completion_tokens_details.audio_tokens > 0
            continue
        d = ch.choices[0].delta
        if d.audio is not None and d.audio.data:  # the client's ChoiceDeltaAudio
            events.append("audio")
            audio.append(np.frombuffer(base64.b64decode(d.audio.data), "<i2"))
        if d.content:
            events.append("text")
    assert "audio" in events and "text" in events
    first_audio = events.index("audio")
    last_text = len(events) - 1 - events[::-1].index("text")
    assert first_audio < last_text, events
    audible(np.concatenate(audio).astype(np.float32) / 32768, 24000)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "pcm16"])
def test_formats_decode(client, model, fmt):
    r = say(client, model, modalities=["text", "audio"], audio={"format": fmt}, max_tokens=12)
    raw = base64.b64decode(r.choices[0].message.audio.data)
    if fmt == "pcm16":
        audible(np.frombuffer(raw, "<i2").astype(np.float32) / 32768, 24000)
    else:
        audible(*decode(raw))


def test_audio_id_follow_up(client, model):
    first = say(client, model, modalities=["text", "audio"], audio={"format": "mp3"}, max_tokens=12)
    a = first.choices[0].message.audio

    def follow(assistant_msg):
        return client.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": "hello"}, assistant_msg, {"role": "user", "content": "and again?"}])
    by_id = follow({"role": "assistant", "audio": {"id": a.id}})
    by_text = follow({"role": "assistant", "content": a.transcript})
    assert by_id.usage.prompt_tokens == by_text.usage.prompt_tokens
    assert by_id.choices[0].message.content == by_text.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="unknown or has expired"):
        follow({"role": "assistant", "audio": {"id": "audio_nope"}})


def test_errors(client, model, served):
    with pytest.raises(openai.BadRequestError, match="voices are") as e:
        say(client, model, modalities=["text", "audio"], audio={"voice": "Nobody", "format": "wav"})
    assert e.value.body["code"] == "unknown_voice"
    with pytest.raises(openai.BadRequestError, match="wav, pcm16, mp3, flac, opus"):
        say(client, model, modalities=["text", "audio"], audio={"voice": "default", "format": "aiff"})
    speech = served[2].assistant.speech
    mode, speech.mode = speech.mode, False  # as loaded with speech=False
    try:
        with pytest.raises(openai.BadRequestError, match="audio output is not available"):
            say(client, model, modalities=["text", "audio"], audio={"format": "wav"})
        with pytest.raises(openai.BadRequestError, match="audio output is not available"):
            client.audio.speech.create(model=model, input="hi", voice="default")
    finally:
        speech.mode = mode
    assert say(client, model).choices[0].message.content  # still serving


@pytest.mark.parametrize("fmt", ["mp3", "wav", "opus"])
def test_audio_speech(client, model, fmt):
    r = client.audio.speech.create(model=model, input="Hello there. The sky is blue.", voice="default",
                                   response_format=fmt)
    audible(*decode(r.content))


def test_audio_speech_streamed(client, model):
    with client.audio.speech.with_streaming_response.create(
            model=model, input="Hello there. The sky is blue.", voice="default", response_format="pcm",
            extra_body={"stream_format": "audio"}) as r:
        parts = list(r.iter_bytes())
    raw = b"".join(parts)
    audible(np.frombuffer(raw[:len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768, 24000)
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model=model, input="", voice="default")


# ------------------------------------------------------------------------------------------------ realtime

def spoken(text: str, silence_s: float = 1.2) -> bytes:
    """espeak-ng speech of `text` then silence, as 24 kHz pcm16."""
    from qwen_omni.speech.offline_voice import synthesize

    x = np.concatenate([np.zeros(4800, np.float32), synthesize(text), np.zeros(int(silence_s * 24000), np.float32)])
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def append(conn, pcm: bytes, step: int = 4800) -> None:
    for i in range(0, len(pcm), step):
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())


def until(conn, kind: str, seen: list, timeout: float = 120) -> object:
    watchdog = threading.Timer(timeout, conn.close)  # a missing event fails the test instead of hanging it
    watchdog.start()
    try:
        for ev in conn:
            seen.append(ev)
            if ev.type == kind:
                return ev
    finally:
        watchdog.cancel()
    raise AssertionError(f"no {kind} before the connection closed: {[e.type for e in seen]}")


def test_realtime_session(client, model, served):
    with client.realtime.connect(model=model) as conn:
        seen = []
        until(conn, "session.created", seen)
        conn.session.update(session={"type": "realtime", "instructions": "", "max_output_tokens": 16,
                                     "audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
        until(conn, "session.updated", seen)
        conn.send_raw("{not json")  # garbage: an error event, the session goes on
        err = until(conn, "error", seen)
        assert "not valid JSON" in err.error.message
        for turn in range(2):  # spoken question, server VAD ends the turn, a spoken reply; then a second turn
            seen = []
            append(conn, spoken("what is this word?" if turn == 0 else "and this one?"))
            until(conn, "input_audio_buffer.speech_started", seen)
            until(conn, "input_audio_buffer.speech_stopped", seen)
            done = until(conn, "response.done", seen)
            assert done.response.status == "completed"
            assert any(e.type == "response.output_audio.delta" for e in seen)
            assert any(e.type == "response.output_audio_transcript.delta" for e in seen)
            pcm = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
            audible(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, 24000)
            if turn == 1:  # the first turn came from the KV prefix cache
                assert done.response.usage.input_token_details.cached_tokens > 0
    def start_reply(conn) -> list:
        """Ask by text for a (long) reply and wait until its audio is playing; the events seen so far."""
        seen = []
        until(conn, "session.created", seen)
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hello"}]})
        conn.response.create()
        until(conn, "response.output_audio.delta", seen)
        return seen

    with client.realtime.connect(model=model) as conn:  # barge-in: a long reply, the user speaks while it plays
        seen = start_reply(conn)
        append(conn, spoken("stop please", silence_s=0.1))
        started = until(conn, "input_audio_buffer.speech_started", seen)
        done = until(conn, "response.done", seen)
        assert done.response.status == "cancelled"
        assert started.model_extra.get("interrupted_response") is True
    with client.realtime.connect(model=model) as conn:  # response.cancel from the client (a fresh, long reply)
        seen = start_reply(conn)
        conn.response.cancel()
        assert until(conn, "response.done", seen).response.status == "cancelled"
    assert say(client, model).choices[0].message.content  # the server keeps serving


def test_realtime_bad_client(served, model):
    """Oversized frames, bad base64, unknown events and a buffer that is never committed: error events only."""
    from websockets.sync.client import connect

    url = served[1].replace("http://", "ws://") + f"/v1/realtime?model={model}"
    with connect(url, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        assert json.loads(ws.recv())["type"] == "session.updated"
        for frame, code in [(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (2 << 20)}),
                             "frame_too_large"),
                            (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_base64"),
                            (json.dumps({"type": "bogus.event"}), "unknown_event_type"),
                            (json.dumps([1, 2]), "invalid_event"),
                            (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty")]:
            ws.send(frame)
            ev = json.loads(ws.recv())
            assert ev["type"] == "error" and ev["error"]["code"] == code, ev
        second = base64.b64encode(np.zeros(24000, "<i2").tobytes()).decode()
        codes = []
        for _ in range(61):  # 61 s of audio without a commit
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": second}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for _ in range(2):
            codes.append(json.loads(ws.recv())["error"]["code"])
        assert codes == ["input_audio_buffer_too_long", "input_audio_buffer_commit_empty"]
        # turn detection off: the client commits and asks for the reply
        pcm = spoken("what is this word?")
        for i in range(0, len(pcm), 9600):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + 9600]).decode()}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send(json.dumps({"type": "response.create"}))
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            ev = json.loads(ws.recv(timeout=120))
            kinds.append(ev["type"])
        assert kinds[0] == "input_audio_buffer.committed" and "response.output_audio.delta" in kinds
        assert ev["response"]["status"] == "completed"
    assert httpx.get(served[1] + "/health").json()["status"] == "ok"


def test_remote_sends_modalities_and_passes_audio_through():
    """`--backend openai`: `modalities` is always explicit; the upstream's pcm16 deltas come out as float32."""
    from qwen_omni.serving.remote import RemoteAssistant

    bodies = []
    pcm = (np.sin(np.arange(2400) / 10) * 8000).astype("<i2").tobytes()

    def upstream(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        events = [{"choices": [{"index": 0, "delta": {"content": "Hi."}}]},
                  {"choices": [{"index": 0, "delta": {"audio": {"id": "audio_up", "data": base64.b64encode(pcm)
                                                                 .decode(), "expires_at": 1}}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    remote = RemoteAssistant("http://upstream.invalid/v1", model="m")
    remote._client = httpx.Client(transport=httpx.MockTransport(upstream))
    assert remote.chat([{"role": "user", "content": "hi"}]) == "Hi."
    stats = {}
    parts = list(remote.chat([{"role": "user", "content": "hi"}], speech=True, voice="Ethan", stream=True,
                              stats=stats))
    assert bodies[0]["modalities"] == ["text"] and "audio" not in bodies[0]
    assert bodies[1]["modalities"] == ["text", "audio"] and bodies[1]["audio"] == {"format": "pcm16", "voice": "Ethan"}
    assert parts[0] == "Hi." and parts[1].dtype == np.float32 and parts[1].size == 2400
    assert stats["audio_id"] == "audio_up"
