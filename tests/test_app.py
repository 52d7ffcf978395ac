"""The Gradio app: webapp.session logic without a server, then the real app over HTTP and in a headless browser.

The main server is the app as a user starts it: `app.main` with no --model, so the embedded assets/tiny-omni,
on a free port. Decoding is slowed to ~30 ms/token so that streams can be observed and stopped mid-way. Every
example in assets/examples is asked about through gradio_client, and its answer checked. Spoken replies run on
both that server (the offline voice) and a tiny random full Qwen3-Omni checkpoint (talker + Code2Wav).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from qwen_omni.webapp import settings as st  # noqa: E402
from qwen_omni.webapp import session as cs  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Spoken replies stream to the player through ffmpeg; the embedded model speaks with espeak-ng. Without them these
# tests skip, and conftest.py names the packages in one line at the end of the run.
NEEDS_FFMPEG = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                  reason="the streamed player needs ffmpeg: apt-get install -y ffmpeg")
NEEDS_ESPEAK = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="the offline voice needs espeak-ng: apt-get install -y espeak-ng")
TOKEN_DELAY = 0.03
MAX_NEW = 64


# ------------------------------------------------------------------------------------------ pure logic

def test_settings_flags_env_and_gradio_env():
    s = st.parse_settings([], {})
    assert (s.model, s.host, s.port, s.concurrency, s.share) == (None, "127.0.0.1", 7860, 1, False)
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7000", "QWEN_OMNI_MODEL": "m",
           "QWEN_OMNI_SHARE": "true", "QWEN_OMNI_MAX_NEW_TOKENS": "99", "QWEN_OMNI_CONCURRENCY": "3"}
    s = st.parse_settings([], env)
    assert (s.model, s.host, s.port, s.share, s.max_new_tokens, s.concurrency) == ("m", "0.0.0.0", 7000, True, 99, 3)
    s = st.parse_settings(["--port", "8000", "--model", "x"], {**env, "QWEN_OMNI_PORT": "7100"})
    assert (s.port, s.model) == (8000, "x")
    assert st.parse_settings([], {**env, "QWEN_OMNI_PORT": "7100"}).port == 7100
    with pytest.raises(SystemExit):
        st.parse_settings([], {"QWEN_OMNI_PORT": "abc"})
    assert st.queue_options(s) == {"default_concurrency_limit": 3, "max_size": 64}
    assert st.launch_options(s)["show_error"] is False


def test_missing_default_model_is_explained(monkeypatch, tmp_path, capsys):
    import app
    import qwen_omni.assistant as assistant_mod

    monkeypatch.setattr(assistant_mod, "DEFAULT_MODEL", tmp_path / "tiny-omni")
    monkeypatch.setattr(st, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as e:
        app.main([])
    assert "--model" in str(e.value) and "tiny-omni" in str(e.value)


def test_history_to_messages():
    hist = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/x/a.png", "mime_type": "image/png"}},
                                     {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat.\n\n" + cs.stats_line(
            {"prompt_tokens": 5, "completion_tokens": 2, "time_to_first_token": 0.1})}]},
        {"role": "user", "content": [{"path": "/x/broken.wav"}, "and this?"]},
        cs.error_message("could not decode"),
        {"role": "user", "content": "the clip"}, {"role": "user", "content": {"path": "/x/v.mp4"}},
    ]
    msgs = cs.history_to_messages(hist, system_prompt="  Be brief. ")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert msgs[1]["content"] == [{"type": "image", "image": "/x/a.png"}, {"type": "text", "text": "what is this?"}]
    assert msgs[2] == {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}
    # the failed turn is gone; consecutive user messages merge with media first
    assert msgs[3] == {"role": "user", "content": [{"type": "video", "video": "/x/v.mp4"},
                                                   {"type": "text", "text": "the clip"}]}
    assert len(msgs) == 4 and cs.history_to_messages([]) == []


def test_undo_and_split():
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": [{"path": "/x/a.png"}, "look"]}, {"role": "assistant", "content": "ok"}]
    before, msg = cs.undo(hist)
    assert before == hist[:2] and msg == {"text": "look", "files": ["/x/a.png"]}
    assert cs.undo([]) == ([], None)


def test_edit_and_api_history():
    hist = [{"role": "user", "content": [{"path": "/x/a.png"}, "what colour?"]}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "and now?"}, {"role": "assistant", "content": {"path": "/x/reply.wav"}}]
    # an edited user message keeps its files, takes the new text and drops everything after it
    assert cs.edit(hist, 0, "what shape?") == [{"role": "user", "content": [{"path": "/x/a.png"}, "what shape?"]}]
    assert cs.edit(hist, 2, "") == [*hist[:2], {"role": "user", "content": []}]
    api = cs.api_history(hist)
    assert api[0]["content"] == [{"type": "file", "file": {"path": "/x/a.png"}}, {"type": "text", "text": "what colour?"}]
    assert api[3]["content"] == [{"type": "file", "file": {"path": "/x/reply.wav"}}] and api[3]["metadata"] is None
    # what gradio_client hands back (file parts as bare paths) reads as the same conversation
    back = [{**m, "content": [{**c, "file": c["file"]["path"]} if c["type"] == "file" else c for c in m["content"]]}
            for m in api]
    assert cs.history_to_messages(back) == cs.history_to_messages(hist)


def test_validate_upload(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "e.wav").write_bytes(b"")
    (tmp_path / "n.txt").write_text("hello")
    assert cs.validate_upload(str(tmp_path / "a.png")) == "image"
    assert cs.media_kind("clip.webm", None) == "video" and cs.media_kind("rec", "audio/wav") == "audio"
    for name, words in (("e.wav", "empty"), ("n.txt", "not an image"), ("gone.mp4", "again")):
        with pytest.raises(cs.InputError, match=words):
            cs.validate_upload(str(tmp_path / name))


def test_find_examples(tmp_path):
    assert cs.find_examples(tmp_path / "none") == []
    (tmp_path / "red.png").write_bytes(b"x")
    (tmp_path / "talk.wav").write_bytes(b"x")
    (tmp_path / "examples.json").write_text(
        '[{"file": "red.png", "text": "what colour?"}, {"file": "missing.mp4", "text": "no"}, {"text": "hi"}]')
    ex = cs.find_examples(tmp_path)
    assert ex == [{"text": "what colour?", "files": [str(tmp_path / "red.png")]}, {"text": "hi", "files": []},
                  {"text": cs.DEFAULT_QUESTIONS["audio"], "files": [str(tmp_path / "talk.wav")]}]


class FakeAssistant:
    path, kind, device, dtype = Path("/m/Qwen3-30B-A3B"), "qwen3_moe", "cuda:0", "torch.bfloat16"
    context_window = 32768
    num_parameters, num_active_parameters = 30_500_000_000, 3_300_000_000


def test_examples_appear_in_the_page(monkeypatch, tmp_path):
    import gradio as gr
    from PIL import Image

    import app

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red_circle.png")
    (tmp_path / "examples.json").write_text('[{"file": "red_circle.png", "text": "what colour is the shape?"}]')
    monkeypatch.setattr(cs, "EXAMPLES_DIR", tmp_path)
    demo = app.build_demo(FakeAssistant(), st.parse_settings([], {}))
    sets = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]
    assert len(sets) == 1 and sets[0].samples[0][0]["text"] == "what colour is the shape?"


def test_model_card_and_stats_line():
    card = cs.model_card(FakeAssistant())
    for words in ("Qwen3-30B-A3B", "qwen3_moe", "MoE", "30.50 B total, 3.30 B active", "32,768", "cuda:0", "bfloat16"):
        assert words in card
    line = cs.stats_line({"prompt_tokens": 40, "reused_tokens": 30, "completion_tokens": 9, "time_to_first_token": 0.25,
                          "tokens_per_second": 12.34, "encode_time": 0.5})
    assert "first token 0.25 s · 12.3 tokens/s · 40 in (30 reused) → 9 out · media encode 0.50 s" in line


def test_unexpected_error_is_generic_and_logged(caplog):
    class Broken:
        def chat(self, *a, **k):
            raise RuntimeError("secret internals")

    steps = list(cs.ChatSession(Broken()).submit({"text": "hi"}, [], "", cs.Sampling()))
    history, warning = steps[-1]
    assert warning == cs.GENERIC_ERROR and cs.is_error(history[-1]) and "secret" not in str(history)
    assert "secret internals" in caplog.text


# ------------------------------------------------------------------------------------------ live server

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def server():
    """The app as users start it: `python app.py` with no --model, i.e. the embedded assets/tiny-omni."""
    import app

    calls, held = [], {}
    load = st.load_assistant

    def slow_load(settings):
        a = load(settings)
        held["assistant"] = a
        step = a.model.decode_step

        def decode_step(tok, cache):
            calls.append(time.monotonic())
            time.sleep(TOKEN_DELAY)  # a realistic pace, so streaming and Stop can be observed
            return step(tok, cache)

        a.model.decode_step = decode_step
        return a

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(st, "load_assistant", slow_load)
        demo = app.main(["--port", str(port), "--max-new-tokens", str(MAX_NEW)], block=False)
    a = held["assistant"]
    assert a.path.name == "tiny-omni"
    yield {"url": f"http://127.0.0.1:{port}/", "calls": calls, "assistant": a, "voice": cs.voice_choices(a)[0]}
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def ask(client, text, history=(), files=(), max_new=MAX_NEW, audio_in_video=True):
    from gradio_client import handle_file

    msg = {"text": text, "files": [handle_file(str(f)) for f in files]}
    # The client hands back file parts of the history as local paths; to send them again they must be wrapped.
    history = [{**m, "content": [{**c, "file": handle_file(c["file"])} if c.get("type") == "file" else c
                                 for c in m["content"]]} for m in history]
    return client.submit(msg, history, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new, seed=0,
                         use_audio_in_video=audio_in_video, api_name="/chat")


def last_text(history) -> str:
    return "".join(c["text"] for c in history[-1]["content"] if c.get("type") == "text")


def answer_of(history) -> str:
    """The reply without its stats footer."""
    return re.sub(r"<sub.*$", "", last_text(history), flags=re.S).strip()


def answer_kind(kind: str) -> set[str]:
    """Every normalised answer of a kind: numbers, colours, spoken words or motions."""
    from qwen_omni.synthetic import audio as sa
    from qwen_omni.synthetic import media as sm
    from qwen_omni.synthetic.tasks import normalize_answer

    words = {"number": [str(i) for i in range(1000)], "colour": sm.COLORS, "motion": sm.MOTIONS,
             "spoken_word": sa.SPOKEN_WORDS}[kind]
    return {normalize_answer(w) for w in words}


def example(name: str, question_start: str) -> dict:
    entries = json.loads((EXAMPLES / "examples.json").read_text())
    return next(e for e in entries if e["file"] == name and e["text"].startswith(question_start))


def test_text_turns_stream_and_reuse(client):
    job = ask(client, "hi, what can you do?")
    history = job.result(timeout=60)
    texts = [last_text(o) for o in job.outputs() if o and o[-1]["role"] == "assistant"]
    assert len(texts) >= 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # grew piece by piece
    assert "tokens/s" in texts[-1] and "first token" in texts[-1] and "media encode" not in texts[-1]
    assert "picture" in answer_of(history) or "shape" in answer_of(history)  # it describes what it can do
    history = ask(client, "who are you?", history).result(timeout=60)
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert "reused)" in last_text(history)  # the first turn's KV state was reused by the library


@pytest.mark.parametrize("name,question", [("shapes.png", "What colour"), ("number.jpg", "What number"),
                                           ("beeps.wav", "How many beeps"), ("spoken.mp3", "Which word"),
                                           ("moving.mp4", "Which way"), ("moving.mp4", "How many beeps")])
def test_media_questions_on_the_examples(client, name, question):
    """Each example we ship, as a user sends it: the media is encoded and the embedded model answers it."""
    from qwen_omni.synthetic.tasks import normalize_answer

    ex = example(name, question)
    history = ask(client, ex["text"], files=[EXAMPLES / name],
                  audio_in_video=bool(ex.get("use_audio_in_video"))).result(timeout=60)
    assert history[-1]["role"] == "assistant" and not history[-1].get("metadata"), last_text(history)
    assert "media encode" in last_text(history)
    # An answer of the asked kind (how often it is the right one is the eval's business: tests/test_train.py).
    reply = normalize_answer(answer_of(history))
    assert reply in answer_kind(ex["kind"]), (ex, answer_of(history))


def test_follow_up_reuses_the_image(client):
    ex = example("shapes.png", "What colour")
    history = ask(client, ex["text"], files=[EXAMPLES / "shapes.png"]).result(timeout=60)
    first = last_text(history)
    history = ask(client, "and what shape is it?", history).result(timeout=60)
    follow = last_text(history)
    assert not history[-1].get("metadata") and answer_of(history)
    assert "reused)" in follow and "media encode" not in follow, (first, follow)  # the image was not re-encoded
    n_in = int(re.search(r"(\d+) in \((\d+) reused\)", follow).group(2))
    assert n_in > 36  # the reused prefix holds the image's vision tokens


def test_bad_requests_show_errors_then_recover(client, server, tmp_path):
    window = server["assistant"].context_window
    history = ask(client, "hello world " * (window // 2 + 50), max_new=4).result(timeout=60)
    assert history[-1]["metadata"]["title"] == cs.ERROR_TITLE and "context window" in last_text(history)
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(os.urandom(300))
    history = ask(client, "what is in the picture?", history, files=[corrupt]).result(timeout=30)
    assert history[-1]["metadata"]["title"] == cs.ERROR_TITLE and len(last_text(history)) > 10
    assert "Traceback" not in str(history)
    history = ask(client, "hi", history, max_new=8).result(timeout=30)
    assert history[-1]["role"] == "assistant" and not history[-1]["metadata"] and "tokens/s" in last_text(history)
    assert len(history) == 6


def test_stop_mid_stream_and_queue_position(client, server):
    from gradio_client.utils import Status

    calls, a = server["calls"], server["assistant"]
    stops, a.stop_ids = a.stop_ids, []  # no EOS: the reply would run to MAX_NEW tokens unless Stop works
    try:
        n0 = len(calls)
        long = ask(client, "tell me a story", max_new=MAX_NEW)
        deadline = time.monotonic() + 20
        while len(long.outputs()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = ask(client, "hi", max_new=4)  # concurrency 1: this one queues behind the story
        seen_rank = None
        while seen_rank is None and time.monotonic() < deadline:
            st = waiting.status()
            if st.code == Status.IN_QUEUE and st.rank is not None:
                seen_rank = st.rank
            time.sleep(0.02)
        assert seen_rank == 0
        long.cancel()
        history = waiting.result(timeout=30)  # runs at once: the cancelled stream released the model
        assert "tokens/s" in last_text(history)
        time.sleep(0.3)
        # a Stop that did not stop would have decoded all MAX_NEW tokens before the queued turn could start
        assert len(calls) - n0 < MAX_NEW
    finally:
        a.stop_ids = stops


# ------------------------------------------------------------------------------------------ browser

def first_screen(browser, url, viewport=(1280, 900)):
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.goto(url)
    box = page.locator("#qo-input textarea")
    # No speed bound here (a loaded 2-core CI machine took over 5 s): the page must load, and bench/ measures time.
    box.wait_for(state="visible", timeout=30000)
    return page, box


def send(page, box, text, files=()):
    if files:
        page.locator("#qo-input input[type=file]").set_input_files([str(f) for f in files])
        # the upload has landed when its thumbnail shows (Enter is ignored while a file is still uploading)
        page.locator("#qo-input .thumbnail-item").last.wait_for(state="visible", timeout=10000)
    box.fill(text)
    box.press("Enter")


def watch_reply(page, until: str, timeout: float = 30) -> list[str]:
    """Successive texts of the last bot message until `until` shows in it."""
    reply = page.locator('#qo-chat [data-testid="bot"]').last
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = reply.inner_text() if reply.count() else ""
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        if until in text:
            break
        time.sleep(0.03)
    return seen


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's Chromium: apt-get install -y chromium")
def test_browser_streams_and_fits_a_phone(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, box = first_screen(browser, server["url"])
            send(page, box, "Describe the image.", files=[EXAMPLES / "shapes.png"])
            seen = watch_reply(page, "tokens/s")
            assert "tokens/s" in seen[-1] and "first token" in seen[-1] and "media encode" in seen[-1], seen[-1:]
            growing = [t for t in seen if "tokens/s" not in t]
            assert len(growing) >= 2 and len(growing[-1]) > len(growing[0]), seen  # streamed, not all at once
            assert page.locator('#qo-chat [data-testid="user"] img').count() >= 1  # the upload shows inline
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            corrupt = tmp_path / "holiday.jpg"
            corrupt.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(400))  # a JPEG header, then garbage
            send(page, box, "what is in this photo?", files=[corrupt])
            seen = watch_reply(page, "holiday.jpg")
            assert "holiday.jpg" in seen[-1] and "Traceback" not in seen[-1], seen[-1:]
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

            phone, _ = first_screen(browser, server["url"], (390, 844))
            for sel in ("#qo-input textarea", "#qo-chat"):
                el = phone.locator(sel)
                el.wait_for(state="visible", timeout=5000)
                b = el.bounding_box()
                assert b and b["x"] >= 0 and b["x"] + b["width"] <= 390 and b["y"] < 844, (sel, b)
            phone.screenshot(path=str(tmp_path / "phone.png"))
        finally:
            browser.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's Chromium: apt-get install -y chromium")
def test_browser_chat_retry_edit_undo(server):
    """The Chatbot's own icons replace the old buttons: retry answers again, edit re-asks with the new text, undo
    takes the turn back into the input box."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, box = first_screen(browser, server["url"])
            assert page.get_by_role("button", name="Regenerate").count() == 0  # the chat's own icons instead
            send(page, box, "hi, what can you do?")
            chat = page.locator("#qo-chat")
            bots = chat.locator('[data-testid="bot"]')
            bots.filter(has_text="tokens/s").first.wait_for(timeout=30000)
            first = bots.last.inner_text()
            chat.get_by_role("button", name="Retry").click()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (bots.last.inner_text() == first or "tokens/s" not in
                                                   bots.last.inner_text()):
                time.sleep(0.05)
            assert bots.count() == 1 and "tokens/s" in bots.last.inner_text() and bots.last.inner_text() != first

            before = bots.last.inner_text()
            chat.get_by_role("button", name="Edit").click()
            editor = chat.locator("textarea").first
            editor.fill("who are you?")
            chat.get_by_role("button", name="Submit").click()
            user = chat.locator('[data-testid="user"]')
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not ("who are you?" in user.last.inner_text() and bots.count()
                                                       and "tokens/s" in bots.last.inner_text() != before):
                time.sleep(0.05)
            assert user.count() == 1 and "who are you?" in user.last.inner_text(), user.all_inner_texts()
            assert bots.count() == 1 and "tokens/s" in bots.last.inner_text()

            chat.get_by_role("button", name="Undo").click()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (user.count() or box.input_value() != "who are you?"):
                time.sleep(0.05)
            assert user.count() == 0 and box.input_value() == "who are you?"
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------ spoken replies

SPEECH_QUESTION = "what is in this picture? describe the image."  # this checkpoint answers it at length


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory):
    """The app on a tiny full Qwen3-Omni checkpoint: thinker, talker and Code2Wav (tests/tiny_speech.py). A random
    talker never says EOS, so spoken replies are capped at 2 s with the app's own --max-audio-seconds."""
    import app
    from tests.tiny_speech import make_qwen3_full

    ckpt = tmp_path_factory.mktemp("tiny-omni-speech")
    make_qwen3_full(ckpt, seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.main(["--model", str(ckpt), "--port", str(port), "--max-new-tokens", "24", "--max-audio-seconds", "2"],
                    block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "voice": "Ethan", "question": SPEECH_QUESTION}
    demo.close()


def decode_audio(data: bytes) -> tuple[float, float]:
    """(seconds, RMS) of an encoded audio file (the player's AAC stream)."""
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as f:
        frames = [fr.to_ndarray().astype(np.float32).reshape(-1) for fr in f.decode(audio=0)]
        rate = f.streams.audio[0].rate
    pcm = np.concatenate(frames) if frames else np.zeros(0, np.float32)
    return pcm.size / rate, float(np.sqrt((pcm ** 2).mean())) if pcm.size else 0.0


def test_public_api_is_chat_only(client):
    """/chat (message, history) is the one public endpoint: no /undo, /clear or UI-only events."""
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/chat"] and not api["unnamed_endpoints"]
    params = api["named_endpoints"]["/chat"]["parameters"]
    assert [p["parameter_name"] for p in params[:2]] == ["message", "history"]
    assert all(p["parameter_has_default"] for p in params[2:])
    job = client.submit({"text": "hi, what can you do?", "files": []}, [], api_name="/chat")  # nothing else given
    history = job.result(timeout=60)
    assert [m["role"] for m in history] == ["user", "assistant"] and "tokens/s" in last_text(history)
    assert len(job.outputs()) >= 3  # streamed


def test_spoken_reply_through_the_api(speech_server):
    """Through gradio_client: a spoken reply ends with its audio as a file message (> 0.3 s, not silent), and
    the stats name the first audio and the real-time factor."""
    from gradio_client import Client

    client = Client(speech_server["url"], verbose=False)
    job = client.submit({"text": SPEECH_QUESTION, "files": []}, [], temperature=0.0, max_new_tokens=24, seed=0,
                        speak=True, voice="Aiden", api_name="/chat")
    history = job.result(timeout=60)
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert "first audio" in last_text(history[:2]) and "RTF" in last_text(history[:2])
    (part,) = history[-1]["content"]
    assert part["type"] == "file" and part["file"].endswith(".wav")
    seconds, rms = decode_audio(Path(part["file"]).read_bytes())
    assert seconds > 0.3 and rms > 1e-3, (seconds, rms)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's Chromium: apt-get install -y chromium")
@NEEDS_FFMPEG
@pytest.mark.parametrize("which", [pytest.param("server", marks=NEEDS_ESPEAK), "speech_server"])
def test_browser_hears_the_spoken_reply(which, request):
    """The embedded model speaks through the offline voice (espeak-ng); a full Qwen3-Omni through its talker."""
    import httpx
    from playwright.sync_api import expect, sync_playwright

    speech_server = request.getfixturevalue(which)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=[*CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(speech_server["url"])
            box = page.locator("#qo-input textarea")
            box.wait_for(state="visible", timeout=10000)
            # the model's voices, its default first
            assert page.locator("#qo-voice input").input_value() == speech_server["voice"]
            page.get_by_label("Temperature (0 = greedy)").first.fill("0")
            page.get_by_label("Seed (-1 = random)").first.fill("0")  # the same sampled talker codes every run
            speak = page.locator("#qo-speak input")
            speak.check()
            expect(speak).to_be_checked()
            box.fill(speech_server.get("question", "hi, what can you do?"))
            box.press("Enter")
            reply = page.locator('#qo-chat [data-testid="bot"]').filter(has_text="first")
            player = page.locator("#qo-player audio")
            deadline = time.monotonic() + 60
            state = {}
            while time.monotonic() < deadline:
                text = reply.last.inner_text() if reply.count() else ""
                state = player.evaluate("a => ({src: a.currentSrc, dur: a.duration, t: a.currentTime})") \
                    if player.count() else {}
                if "first audio" in text and state.get("dur", 0) > 0.3 and state.get("t", 0) > 0:
                    break
                time.sleep(0.1)
            assert "first audio" in text and "RTF" in text, text
            assert state.get("src") and state["dur"] > 0.3 and state["t"] > 0, state  # it has a source and plays
            href = page.locator("#qo-player a[download]").get_attribute("href")
            seconds, rms = decode_audio(httpx.get(href, timeout=10).content)
            assert seconds > 0.3 and rms > 1e-3, (seconds, rms)  # what it plays is the reply, not silence
        finally:
            browser.close()
