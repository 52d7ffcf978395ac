"""The OpenAI-compatible server, driven by the official `openai` client over loopback.

Servers run in this process on free ports (`serve_in_thread`); the `--backend openai` one runs as a real
`python -m qwen_omni serve` subprocess forwarding to the first. Greedy answers are compared with `Assistant.chat`
on a separately loaded copy of the same model. Generation lengths are small; the long streams that tests cancel
use `ignore_eos` and are closed after a few chunks.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import qwen_omni

from .serve_utils import ROOT, ask, b64, data_url, mp4_bytes, omni_model_dir, png_bytes, start_local_server, \
    wait_idle, wait_ready, wav_bytes

KEY = "test-secret"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return omni_model_dir(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served-media")
    (d / "cat.png").write_bytes(png_bytes(64, 64, seed=3))
    return d


@pytest.fixture(scope="module")
def served(model_dir, media_dir):
    from qwen_omni.serving.openai_api import MediaPolicy

    url, stop, backend = start_local_server(model_dir, max_batch=4, max_body_bytes=2 << 20,
                                           policy=MediaPolicy(media_dir=media_dir))
    yield url, backend
    stop()


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    return qwen_omni.load(model_dir, device="cpu")


# ------------------------------------------------------------------------------------------------ basics

def test_models_and_health(server, client, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [model_dir.name]
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["free_slots"] == 4


def test_text_non_streaming_equals_assistant_chat(client, reference):
    r = ask(client, "what is in this picture?", max_tokens=16)
    stats = {}
    expected = reference.chat([{"role": "user", "content": "what is in this picture?"}], max_new_tokens=16,
                              stats=stats)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == ("length" if stats["completion_tokens"] == 16 else "stop")
    assert r.usage.prompt_tokens == stats["prompt_tokens"]
    assert r.usage.completion_tokens == stats["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_is_sse_and_matches_non_streaming(server, client, model_dir):
    body = {"model": model_dir.name, "messages": [{"role": "user", "content": "describe the image."}],
            "max_tokens": 10, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert any(e["choices"] and e["choices"][0]["finish_reason"] for e in events)
    assert text == ask(client, "describe the image.", max_tokens=10).choices[0].message.content
    # the same through the official client's stream
    chunks = ask(client, "describe the image.", max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_stop_strings_end_and_are_trimmed(client):
    full = ask(client, "the quick brown fox", max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[6:9]
    expected = full[:full.find(stop)]
    r = ask(client, "the quick brown fox", max_tokens=24, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = ask(client, "the quick brown fox", max_tokens=24, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# ------------------------------------------------------------------------------------------------ media

def test_image_audio_video_and_local_file_equal_direct_chat(client, reference, media_dir):
    png, wav, mp4 = png_bytes(64, 48, seed=5), wav_bytes(1.0), mp4_bytes()
    cases = [
        ({"type": "image_url", "image_url": {"url": data_url("image/png", png)}}, {"type": "image", "image": png}),
        ({"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}}, {"type": "audio", "audio": wav}),
        ({"type": "video_url", "video_url": {"url": data_url("video/mp4", mp4)}}, {"type": "video", "video": mp4}),
        ({"type": "image_url", "image_url": {"url": "cat.png"}},
         {"type": "image", "image": (media_dir / "cat.png").read_bytes()}),
    ]
    for api_part, lib_part in cases:
        r = ask(client, [api_part, {"type": "text", "text": "what is this?"}], max_tokens=8)
        expected = reference.chat([{"role": "user", "content": [lib_part, {"type": "text", "text": "what is this?"}]}],
                                  max_new_tokens=8)
        assert r.choices[0].message.content == expected, api_part["type"]
        assert r.usage.prompt_tokens > 30  # the media placeholders were expanded


def test_follow_up_turn_reuses_the_prefix(client, model_dir, served):
    media_cache = served[1].assistant.processor  # CachingProcessor: the re-sent image is not decoded again
    hits = media_cache.hits
    turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("image/png", png_bytes(
        80, 64, seed=9))}}, {"type": "text", "text": "describe the image."}]}]
    r1 = client.chat.completions.create(model=model_dir.name, messages=turn1, max_tokens=6, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "and the colour?"}]
    raw = client.chat.completions.with_raw_response.create(model=model_dir.name, messages=turn2, max_tokens=6,
                                                           temperature=0)
    r2 = raw.parse()
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens and int(raw.headers["x-qwen-omni-cached-tokens"]) == cached
    assert r2.usage.prompt_tokens - cached < 40
    assert media_cache.hits == hits + 1


# ------------------------------------------------------------------------------------------------ errors

def error_of(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value.status_code, e.value.body


def test_bad_requests_get_openai_shaped_errors(server, client, model_dir):
    status, body = error_of(lambda: ask(client, [
        {"type": "text", "text": "listen"}, {"type": "input_audio", "input_audio": {"data": "@@not base64@@",
                                                                                    "format": "wav"}}]))
    assert status == 400 and body["message"] == "messages[0].content[1]: invalid base64 in input_audio.data"
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    status, body = error_of(lambda: ask(client, [{"type": "hologram", "hologram": {}}]))
    assert status == 400 and body["message"].startswith("messages[0].content[0]: unknown content part type 'hologram'")
    remote_url = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}
    status, body = error_of(lambda: ask(client, [remote_url]))
    assert status == 400 and "remote URLs are refused" in body["message"]
    status, body = error_of(lambda: ask(client, [{"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]))
    assert status == 400 and "outside the server's media folder" in body["message"]
    status, body = error_of(lambda: ask(client, [  # valid base64, not an image: named by its part
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": data_url("image/png", b"nope" * 9)}}]))
    assert status == 400 and body["message"].startswith("messages[0].content[1]: ")
    status, body = error_of(lambda: ask(client, "hi", extra_body={"modalities": ["text", "audio"],
                                                                  "audio": {"voice": "nobody", "format": "wav"}}))
    assert status == 400 and body["code"] == "unknown_voice" and "voices are default, female" in body["message"]
    status, body = error_of(lambda: ask(client, "hi", extra_body={"modalities": ["text", "audio"],
                                                                  "audio": {"format": "aiff"}}))
    assert status == 400 and body["code"] == "unsupported_audio_format"
    status, body = error_of(lambda: client.chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": "hi"}]))
    assert status == 404 and body["code"] == "model_not_found"
    big = {"model": model_dir.name, "messages": [{"role": "user", "content": "x" * (3 << 20)}]}
    r = httpx.post(server + "/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 413 and "larger than this server's limit" in r.json()["error"]["message"]
    status, body = error_of(lambda: ask(client, "blue " * 2100))  # the server's rows hold 2048 positions
    assert status == 400 and body["code"] == "context_length_exceeded"
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_client_disconnect_frees_the_slot(server, client):
    stream = ask(client, "hello", max_tokens=1500, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_idle(server, timeout=5)


def serve_files(folder):
    """A plain static file server on loopback (the "remote" host of --allow-remote-media)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_auth_queue_limits_and_remote_media(model_dir, media_dir, reference):
    from qwen_omni.serving.openai_api import MediaPolicy

    url, stop, backend = start_local_server(model_dir, max_batch=1, max_queue=1, api_key=KEY,
                                           policy=MediaPolicy(allow_remote=True))
    files = serve_files(media_dir)
    try:
        anon = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            anon.models.list()
        assert e.value.body["type"] == "authentication_error"
        assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401  # no header at all
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        name = c.models.list().data[0].id
        busy = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1500,
                                         stream=True, extra_body={"ignore_eos": True})
        next(iter(busy))  # holds the only slot
        queued = {}
        t = threading.Thread(target=lambda: queued.setdefault("r", c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)))
        t.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert e.value.body["code"] == "queue_full"
        busy.close()
        t.join(60)
        assert queued["r"].usage.completion_tokens >= 1
        wait_idle(url)
        # --allow-remote-media: http(s) URLs are fetched (here from a loopback file server)
        remote = f"http://127.0.0.1:{files.server_address[1]}/cat.png"
        r = c.chat.completions.create(model=name, max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": remote}}, {"type": "text", "text": "what is this?"}]}])
        assert r.choices[0].message.content == reference.chat([{"role": "user", "content": [
            {"type": "image", "image": (media_dir / "cat.png").read_bytes()}, {"type": "text", "text": "what is this?"}]}],
            max_new_tokens=6)
        status, body = error_of(lambda: c.chat.completions.create(model=name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": remote.replace("cat.png", "missing.png")}}]}]))
        assert status == 400 and "HTTP 404" in body["message"]
    finally:
        files.shutdown()
        stop()


def test_503_while_loading():
    from qwen_omni.serving.server import ServeConfig, create_app, serve_in_thread

    gate = threading.Event()

    def load():
        gate.wait(30)
        raise RuntimeError("no model in this test")
    url, stop = serve_in_thread(create_app(ServeConfig(), load))
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "Retry-After" in r.headers
        assert httpx.get(url + "/health").json()["status"] == "loading"
        gate.set()
        time.sleep(0.2)
        assert httpx.get(url + "/health").json()["status"] == "failed"
    finally:
        gate.set()
        stop()


# ------------------------------------------------------------------------------------------------ remote

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_backend_forwards_to_an_openai_compatible_peer(server, reference, model_dir):
    from qwen_omni.webapp import settings as st
    from qwen_omni.webapp import session as cs
    from qwen_omni.serving.remote import RemoteAssistant, RemoteUnsupportedError

    png = png_bytes(64, 64, seed=11)
    msgs = [{"role": "user", "content": [{"type": "image", "image": png}, {"type": "text", "text": "what is it?"}]}]
    expected = reference.chat(msgs, max_new_tokens=10)
    # the library class: same answer, stats from the server's usage
    remote = RemoteAssistant(server).connect()
    stats = {}
    assert "".join(remote.chat(msgs, max_new_tokens=10, stream=True, stats=stats)) == expected
    assert stats["prompt_tokens"] > 30 and stats["completion_tokens"] >= 1
    with pytest.raises(RemoteUnsupportedError, match="not available for a remote backend"):
        remote.prepare(msgs)
    text, audio = remote.chat(msgs, speech=True, max_new_tokens=10)  # the server's audio, passed through
    assert text == expected and audio.dtype == np.float32 and audio.size > 0.3 * 24000
    assert remote.chat(msgs, max_new_tokens=10, speech=False, voice="default") == expected
    # the app's --backend openai
    settings = st.parse_settings(["--backend", "openai", "--base-url", server + "/v1"], {})
    assistant = st.load_assistant(settings)
    steps = list(cs.ChatSession(assistant).submit({"text": "what is it?"}, [], "", cs.Sampling(temperature=0,
                                                                                              max_new_tokens=5)))
    assert steps[-1][1] is None and steps[-1][0][-1]["role"] == "assistant"
    # `serve --backend openai` in front of the first server: same greedy answer through two hops
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen_omni", "serve", "--backend", "openai", "--base-url",
                             server + "/v1", "--port", str(port), "--api-key", KEY, "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                wait_ready(url, timeout=60)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert c.models.list().data[0].id == model_dir.name
        r = c.chat.completions.create(model=model_dir.name, max_tokens=10, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("image/png", png)}},
                                         {"type": "text", "text": "what is it?"}]}])
        assert r.choices[0].message.content == expected and r.usage.prompt_tokens == stats["prompt_tokens"]
        status, body = error_of(lambda: c.chat.completions.create(model=model_dir.name, messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%", "format": "wav"}}]}]))
        assert status == 400 and "invalid base64" in body["message"]
        # spoken replies through two hops: modalities sent upstream, its pcm16 deltas passed through
        assert c.models.list().data[0].model_extra["voices"][0] == "default"
        events, pcm = [], b""
        for ch in c.chat.completions.create(model=model_dir.name, max_tokens=30, temperature=0, stream=True,
                                            modalities=["text", "audio"], audio={"voice": "male", "format": "pcm16"},
                                            messages=[{"role": "user", "content": "hello"}]):
            d = ch.choices[0].delta if ch.choices else None
            if d is not None and d.audio is not None and d.audio.data:
                events.append("audio")
                pcm += base64.b64decode(d.audio.data)
            elif d is not None and d.content:
                events.append("text")
        assert "audio" in events and events.index("audio") < len(events) - 1 - events[::-1].index("text")
        assert len(pcm) > 0.3 * 24000 * 2
        r = c.chat.completions.create(model=model_dir.name, max_tokens=10, temperature=0, messages=[
            {"role": "user", "content": "hello"}], modalities=["text", "audio"], audio={"format": "mp3"})
        assert r.choices[0].message.audio.transcript == r.choices[0].message.content
        assert r.usage.completion_tokens_details.audio_tokens > 0
    finally:
        proc.terminate()
        proc.wait(20)


# ------------------------------------------------------------------------------------------------ load

def test_short_load_run_has_no_failures_and_no_leaked_slots(server, model_dir):
    sys.path.insert(0, str(ROOT))
    from bench.load import run_load

    report = run_load(server, model_dir.name, clients=4, requests=5, max_tokens=8)
    assert report["failed"] == 0, report["errors"]
    assert report["ok"] + report["cancelled"] == 20 and report["cancelled"] >= 1
    assert report["leaked"] == {"active": 0, "waiting": 0}


def test_stop_text_holds_back_partial_matches():
    from qwen_omni.serving.openai_api import StopText

    s = StopText(["END", "xyz"])
    assert [s.push(p) for p in ["ab", "cE", "N", "q", "EN", "Dtail"]] == ["ab", "c", "", "ENq", "", ""]
    assert s.stopped and s.flush() == ""
    s = StopText(["END"])
    assert s.push("abE") == "ab" and s.flush() == "E"  # a held-back tail is released at the end
    assert StopText([]).push("anything") == "anything"


def test_base64_media_may_be_line_wrapped():
    """Plain, line-wrapped (MIME-style, 76 a line) and padded-with-whitespace base64 give the same bytes; a bad
    character is still a 400 that names the part."""
    import base64

    from qwen_omni.serving.openai_api import APIError, MediaPolicy, parse_chat_request

    raw = bytes(range(256)) * 20
    enc = base64.b64encode(raw).decode()
    wrapped = "\r\n".join(enc[i:i + 76] for i in range(0, len(enc), 76))

    def part(data: str) -> dict:
        return {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]}
    for data in (enc, wrapped, f" {enc}\n"):
        assert parse_chat_request(part(data), MediaPolicy()).messages[0]["content"][1]["audio"] == raw
    with pytest.raises(APIError) as e:
        parse_chat_request(part(enc[:-4] + "$AAA"), MediaPolicy())
    assert e.value.status == 400 and "messages[0].content[1]" in str(e.value) and "base64" in str(e.value)
