"""`serve --engine-process`: the same API with the model in a child process (qwen_omni/serving/process_backend.py).

One server on a free loopback port, its model process spawned by `ProcessBackend`; answers are compared with
`Assistant.chat` on a separately loaded copy of the model, as in test_server.py.
"""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

import qwen_omni

from .serve_utils import ask, data_url, omni_model_dir, png_bytes, wait_idle, wait_ready


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return omni_model_dir(tmp_path_factory.mktemp("engine-process-model"))


@pytest.fixture(scope="module")
def served(model_dir):
    from qwen_omni.serving.process_backend import ProcessBackend
    from qwen_omni.serving.server import ServeConfig, create_app, serve_in_thread

    holder = {}

    def load():  # max_batch 2, max_queue 1: the queue limit is reachable with three requests
        holder["backend"] = ProcessBackend(str(model_dir), {"device": "cpu"}, (2, 1, 2048, 16), threads=1)
        return holder["backend"]
    url, stop = serve_in_thread(create_app(ServeConfig(), load))
    wait_ready(url)
    yield url, holder["backend"]
    stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_answers_streaming_and_prefix_reuse_match_the_in_process_model(served, client, model_dir):
    ref = qwen_omni.load(model_dir, device="cpu")
    image = png_bytes(80, 64, seed=9)
    content = [{"type": "image_url", "image_url": {"url": data_url("image/png", image)}},
               {"type": "text", "text": "What color is the shape?"}]
    want = ref.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "What color is the shape?"}]}],
                    max_new_tokens=12)
    r1 = ask(client, content)
    assert r1.choices[0].message.content == want
    stream = ask(client, content, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r1.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r1.usage.prompt_tokens
    # the second identical request reused the first one's KV state, kept in the model process
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert wait_idle(served[0])["free_slots"] == 2


def test_errors_keep_their_status_codes(served, client):
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, [{"type": "text", "text": "look"},
                     {"type": "image_url", "image_url": {"url": data_url("image/png", b"nope" * 9)}}])
    assert e.value.status_code == 400 and e.value.body["message"].startswith("messages[0].content[1]: ")
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "blue " * 2100)  # rows hold 2048 positions
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    # two rows busy and one request waiting: the fourth is refused with 429, and cancelling frees everything
    streams = [ask(client, "hello", max_tokens=1500, stream=True, extra_body={"ignore_eos": True}) for _ in range(2)]
    for s in streams:
        next(iter(s))
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(r=ask(client, "hi", max_tokens=4)))
    waiter.start()
    deadline = time.monotonic() + 10
    while httpx.get(served[0] + "/health").json()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "hi", max_tokens=4)
    assert e.value.status_code == 429
    for s in streams:
        s.close()
    waiter.join(60)
    assert queued["r"].choices[0].message.content
    assert wait_idle(served[0])["free_slots"] == 2


def test_a_dead_model_process_fails_requests_with_503(model_dir):
    from qwen_omni.serving.process_backend import ProcessBackend
    from qwen_omni.serving.server import ServeConfig, create_app, serve_in_thread

    holder = {}

    def load():
        holder["backend"] = ProcessBackend(str(model_dir), {"device": "cpu"}, (2, 4, 512, 4), threads=1)
        return holder["backend"]
    url, stop = serve_in_thread(create_app(ServeConfig(), load))
    try:
        wait_ready(url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = ask(c, "hello", max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        holder["backend"]._proc.kill()
        with pytest.raises(openai.APIError, match="the model process exited"):  # in-band: headers were sent
            for _ in stream:
                pass
        with pytest.raises(openai.APIStatusError) as e:
            ask(c, "hi")
        assert e.value.status_code == 503 and "model process exited" in e.value.body["message"]
    finally:
        stop()
