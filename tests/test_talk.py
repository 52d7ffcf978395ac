"""Talk mode: TalkSession with the real silero-vad endpointer, then the app in Chromium with a fake microphone.

The fake microphone is Chromium's own (--use-file-for-fake-audio-capture), which loops a WAV file: a question
spoken by espeak-ng with silence before and after, so each loop is one more turn. Screenshots of every state are
saved under pytest's tmp dir (printed with -s).
"""
from __future__ import annotations

import io
import shutil
import socket
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from qwen_omni.speech.offline_voice import SAMPLE_RATE
from qwen_omni.webapp import session as cs
from qwen_omni.webapp import talk as tk

CHROMIUM = "/usr/bin/chromium"
NEEDS_ESPEAK = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="the offline voice needs espeak-ng: apt-get install -y espeak-ng")
NEEDS_BROWSER = pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("ffmpeg") is None,
                                   reason="needs Debian's Chromium and ffmpeg: apt-get install -y chromium ffmpeg")
QUESTION = "which word do you hear?"


def spoken(text: str = QUESTION, before: float = 1.0, after: float = 5.0) -> np.ndarray:
    """espeak-ng's voice saying `text`, 24 kHz float32, padded with silence."""
    from qwen_omni.speech.offline_voice import synthesize

    speech = synthesize(text)
    return np.concatenate([np.zeros(int(before * SAMPLE_RATE), np.float32), speech,
                           np.zeros(int(after * SAMPLE_RATE), np.float32)])


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def chunks(audio: np.ndarray, seconds: float = 0.1):
    """Gradio's microphone chunks: (rate, int16 samples)."""
    n = int(seconds * SAMPLE_RATE)
    for i in range(0, audio.size, n):
        yield SAMPLE_RATE, (audio[i:i + n] * 32767).astype(np.int16)


class SpeakingAssistant:
    """Answers every question with two sentences, each spoken as a 1 s tone; records what it was asked."""

    def __init__(self):
        self.asked, self.closed = [], 0

    def chat(self, messages, stream, stats, **kw):
        self.asked.append(messages)
        assert kw.get("speech") is True

        def pieces():
            try:
                for sentence in ("It is blue.", " Anything else?"):
                    yield sentence
                    yield (0.3 * np.sin(np.arange(SAMPLE_RATE) * 0.05)).astype(np.float32)
                stats.update(real_time_factor=0.1, audio_seconds=2.0)
            finally:
                self.closed += 1
        return pieces()


@pytest.fixture(scope="module")
def endpointer():
    from qwen_omni.speech.vad import Endpointer

    return Endpointer()


@NEEDS_ESPEAK
def test_turn_without_a_click_then_spoken_reply_in_history(endpointer, tmp_path):
    clock = [100.0]
    talk = tk.TalkSession(endpointer, tmp_path, clock=lambda: clock[0])
    talk.see(np.full((32, 32, 3), 200, np.uint8))  # the webcam rides along
    events, states = [], set()
    audio = spoken(after=1.5)
    for rate, c in chunks(audio):
        clock[0] += c.size / rate
        events += [(a, clock[0]) for a in talk.hear(rate, c)]
        states.add(talk.state)
    assert [a for a, _ in events] == ["turn"] and {"listening", "hearing"} <= states
    speech_end = 100.0 + np.flatnonzero(np.abs(audio) > 0.01)[-1] / SAMPLE_RATE  # the last audible sample
    bot = SpeakingAssistant()
    steps = list(talk.answer(bot, [], "", cs.Sampling(speak=True)))
    history = steps[-1][0]
    user, reply, played = history[0], history[1], history[2]
    assert user["role"] == "user" and [Path(p["path"]).suffix for p in user["content"]] == [".wav", ".png"]
    with wave.open(user["content"][0]["path"]) as w:  # the utterance, padded, not the trailing silence
        assert 1.0 < w.getnframes() / w.getframerate() < audio.size / SAMPLE_RATE - 1.0
    assert reply["content"].startswith("It is blue. Anything else?") and "end of speech → first audio" in reply["content"]
    # the end of speech is placed where the speech ended, not where the endpointer decided (600 ms later)
    eos_to_audio = float(reply["content"].split("first audio ")[1].split(" s")[0])
    assert abs((clock[0] - speech_end) - eos_to_audio) < 0.15, (clock[0] - speech_end, eos_to_audio)
    with wave.open(played["content"]["path"]) as w:
        assert abs(w.getnframes() / w.getframerate() - 2.0) < 0.01  # the whole spoken reply stays playable
    assert sum(1 for _, a in steps if a) == 2  # audio streamed in two chunks
    asked = bot.asked[0][-1]["content"]
    assert [p["type"] for p in asked] == ["audio", "image"]
    # the spoken reply's text (not its stats, not its audio file) is what the model sees next turn
    assert cs.history_to_messages(history)[1] == {"role": "assistant",
                                                  "content": [{"type": "text", "text": "It is blue. Anything else?"}]}


@NEEDS_ESPEAK
def test_barge_in_cancels_the_reply(endpointer, tmp_path):
    endpointer.reset()
    clock = [0.0]
    talk = tk.TalkSession(endpointer, tmp_path, clock=lambda: clock[0])
    for rate, c in chunks(spoken(after=1.0)):
        clock[0] += c.size / rate
        talk.hear(rate, c)
    bot = SpeakingAssistant()
    steps = talk.answer(bot, [], "", cs.Sampling(speak=True))
    next(steps), next(steps)
    _, audio = next(steps)  # the first audio chunk has gone out: the reply is being spoken
    assert audio and talk.state == "speaking"
    heard = []
    for rate, c in chunks(spoken(before=0.2, after=0.0)):  # the user talks over it
        clock[0] += c.size / rate
        heard += talk.hear(rate, c)
    assert "barge_in" in heard and talk.barge_ins == 1
    history = list(steps)[-1][0]
    assert bot.closed == 1  # the library stream was closed: the model is free
    assert "interrupted" in history[1]["content"] and "Anything else" not in history[1]["content"]
    with wave.open(history[2]["content"]["path"]) as w:
        assert w.getnframes() == SAMPLE_RATE  # only what had been spoken
    assert talk.state in ("hearing", "listening")


# ------------------------------------------------------------------------------------------ browser

# A microphone the test (or bench/talk_browser.py) speaks into at a moment of its choosing: getUserMedia returns a
# Web Audio stream that is silent until `__talk.say(base64 WAV, seconds to the end of speech)`, which records on
# the page's clock when that speech ends (`ends`); `plays` records every `playing` of the Talk tab's player.
FAKE_MIC = """
(() => {
  const T = window.__talk = {ends: [], plays: []};
  document.addEventListener('playing', e => {
    if (e.target.closest && e.target.closest('#qo-talk-player')) T.plays.push(performance.now());
  }, true);
  const original = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => {
    if (!c || !c.audio || c.video) return original(c);
    const ctx = T.ctx = new AudioContext({sampleRate: 48000});
    await ctx.resume();
    const dest = ctx.createMediaStreamDestination();
    dest.channelCount = 1;
    const hum = ctx.createConstantSource();  // keeps the track producing (silent) frames between questions
    hum.offset.value = 0;
    hum.connect(dest);
    hum.start();
    const [track] = dest.stream.getAudioTracks();
    const settings = track.getSettings.bind(track);  // Gradio's WAV recorder needs both, a Web Audio track lacks them
    track.getSettings = () => ({...settings(), channelCount: 1, sampleRate: ctx.sampleRate});
    T.say = async (b64, speechEnd) => {
      const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
      const buf = await ctx.decodeAudioData(bytes.buffer);
      const src = ctx.createBufferSource();
      src.buffer = buf;
      src.connect(dest);
      const lead = 0.05;
      src.start(ctx.currentTime + lead);
      T.ends.push(performance.now() + (lead + speechEnd) * 1000);
    };
    return dest.stream;
  };
})();
"""


def question_b64(text: str = QUESTION) -> tuple[str, float]:
    """(base64 WAV of the spoken question, seconds to its last audible sample)."""
    import base64

    speech = spoken(text, before=0.0, after=0.0)
    end = (np.flatnonzero(np.abs(speech) > 0.01)[-1] + 1) / SAMPLE_RATE
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(speech, -1, 1) * 32767).astype(np.int16).tobytes())
    return base64.b64encode(out.getvalue()).decode(), float(end)


@pytest.fixture(scope="module")
def app_server():
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.main(["--port", str(port), "--max-new-tokens", "32"], block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def open_talk(p, url, wav: Path | None, width=1280, init_script: str | None = None):
    """Chromium on the app's Talk tab; its fake microphone loops `wav` (Chromium's own fake capture)."""
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
            *([f"--use-file-for-fake-audio-capture={wav}"] if wav else [])]
    browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
    page = browser.new_page(viewport={"width": width, "height": 900})
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    page.get_by_role("tab", name="Talk").click()
    return browser, page


def start_mic(page, tries: int = 3) -> None:
    """Press Record and wait for the first chunk to be heard (the state leaves "off"). Gradio's recorder now and
    then starts without sending chunks when getUserMedia resolves late (seen with FAKE_MIC): stop and retry."""
    state = page.locator("#qo-talk-state textarea")
    for _ in range(tries):
        page.locator("#qo-mic button", has_text="Record").click()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if state.input_value() != "off":
                return
            time.sleep(0.1)
        page.locator("#qo-mic button", has_text="Stop").click()
        time.sleep(0.5)
    raise AssertionError("the microphone never streamed")


def decode_audio(data: bytes) -> tuple[float, float]:
    """(seconds, RMS) of an audio file."""
    import av

    with av.open(io.BytesIO(data)) as f:
        frames = [fr.to_ndarray().astype(np.float32).reshape(-1) for fr in f.decode(audio=0)]
        rate = f.streams.audio[0].rate
    pcm = np.concatenate(frames) if frames else np.zeros(0, np.float32)
    if pcm.size and np.abs(pcm).max() > 1.5:  # integer PCM
        pcm = pcm / 32768.0
    return pcm.size / rate, float(np.sqrt((pcm ** 2).mean())) if pcm.size else 0.0


def audio_bytes(audio_element) -> bytes:
    """The file an <audio> element plays (often a blob: URL only the page can read)."""
    import base64

    b64 = audio_element.evaluate("""async a => {
        const buf = new Uint8Array(await (await fetch(a.currentSrc || a.src)).arrayBuffer());
        let s = ''; for (let i = 0; i < buf.length; i++) s += String.fromCharCode(buf[i]);
        return btoa(s); }""")
    return base64.b64decode(b64)


@NEEDS_ESPEAK
@NEEDS_BROWSER
def test_browser_talks_hands_free(app_server, tmp_path):
    """Two spoken questions, no click but Record: each turn ends on its own, gets a spoken reply and text, and
    both replies stay playable in the chat. One screenshot per state."""
    from playwright.sync_api import sync_playwright

    wav = write_wav(tmp_path / "question.wav", spoken(before=1.0, after=5.0))
    shots = tmp_path / "talk-states"
    shots.mkdir()
    with sync_playwright() as p:
        browser, page = open_talk(p, app_server, wav)
        try:
            state = page.locator("#qo-talk-state textarea")
            page.screenshot(path=str(shots / "off.png"))
            start_mic(page)
            bots = page.locator('#qo-chat [data-testid="bot"]')
            seen, played, deadline = [], 0.0, time.monotonic() + 45
            while time.monotonic() < deadline:
                s = state.input_value().split(" ")[0]
                if s and (not seen or seen[-1] != s):
                    seen.append(s)
                    if not (shots / f"{s}.png").exists():
                        page.screenshot(path=str(shots / f"{s}.png"))
                played = max(played, page.locator("#qo-talk-player audio").evaluate_all(
                    "as => Math.max(0, ...as.map(a => a.currentTime))"))
                if page.locator('#qo-chat audio').count() >= 4 and "listening" in seen[-1:]:
                    break
                time.sleep(0.05)
            assert {"listening", "hearing", "thinking", "speaking"} <= set(seen), seen
            assert sorted(f.stem for f in shots.iterdir()) == ["hearing", "listening", "off", "speaking", "thinking"]
            assert played > 0.3, played  # the streamed reply played in the browser
            # (at least) two voice turns: each user turn and each spoken reply is a playable audio message; the
            # looping question may have started a third turn by now
            assert page.locator('#qo-chat [data-testid="user"] audio').count() >= 2
            replies = page.locator('#qo-chat [data-testid="bot"] audio')
            assert replies.count() >= 2
            texts = [t for t in bots.all_inner_texts() if "first audio" in t]
            assert len(texts) >= 2 and all("end of speech → first audio" in t for t in texts), texts
            assert all(t.split("\n")[0].strip() for t in texts)  # the reply's words are there
            for i in range(2):
                seconds, rms = decode_audio(audio_bytes(replies.nth(i)))
                assert seconds > 0.3 and rms > 1e-3, (i, seconds, rms)
            assert "reused)" in texts[1]  # the second turn re-sent the conversation: its prefix came from cache

            phone = browser.new_page(viewport={"width": 390, "height": 844})  # the Talk tab fits a phone
            phone.goto(app_server)
            phone.get_by_role("tab", name="Talk").click()
            for sel in ("#qo-talk-state", "#qo-talk-stop", "#qo-mic", "#qo-talk-player"):
                el = phone.locator(sel)
                el.wait_for(state="visible", timeout=5000)
                b = el.bounding_box()
                assert b and b["x"] >= 0 and b["x"] + b["width"] <= 390, (sel, b)
            phone.screenshot(path=str(shots.parent / "talk-phone.png"), full_page=True)
            print("talk screenshots:", shots)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def talker_server(tmp_path_factory):
    """The app on a tiny full Qwen3-Omni checkpoint (tests/tiny_speech.py): its random talker never says EOS, so
    every spoken reply runs to --max-audio-seconds, long enough to be talked over."""
    import app
    from tests.tiny_speech import make_qwen3_full

    ckpt = tmp_path_factory.mktemp("tiny-omni-talker")
    make_qwen3_full(ckpt, seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.main(["--model", str(ckpt), "--port", str(port), "--max-new-tokens", "16",
                     "--max-audio-seconds", "14"], block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@NEEDS_ESPEAK
@NEEDS_BROWSER
def test_browser_barge_in_stops_the_reply(talker_server, tmp_path):
    """A question, then the same question injected once the 14 s reply is audibly playing: the player stops, the
    state says so, and the reply is marked interrupted in the chat. The microphone here is a Web Audio stream
    (FAKE_MIC), so the second question starts when the reply plays, however slow the machine is."""
    from playwright.sync_api import sync_playwright

    wav_b64, speech_end = question_b64()
    with sync_playwright() as p:
        browser, page = open_talk(p, talker_server, None, init_script=FAKE_MIC)
        try:
            state = page.locator("#qo-talk-state textarea")
            start_mic(page)
            player = page.locator("#qo-talk-player audio")

            def wait(cond, what, timeout=60):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if cond():
                        return
                    time.sleep(0.05)
                raise AssertionError(f"timed out waiting for {what}; state {state.input_value()!r}")

            def positions():
                return player.evaluate_all("as => as.map(a => [a.currentTime, a.paused])")

            wait(lambda: "listening" in state.input_value(), "listening")
            page.evaluate("([b, e]) => window.__talk.say(b, e)", [wav_b64, speech_end])
            wait(lambda: any(t > 0.5 and not paused for t, paused in positions()), "the reply to play")
            page.screenshot(path=str(tmp_path / "speaking.png"))
            page.evaluate("([b, e]) => window.__talk.say(b, e)", [wav_b64, speech_end])  # talk over it
            wait(lambda: "interrupted" in state.input_value() or all(p for _, p in positions()), "barge-in", 20)
            page.screenshot(path=str(tmp_path / "barge-in.png"))
            time.sleep(0.3)
            first = positions()
            time.sleep(0.7)
            later = positions()
            # paused, well before its 14 s end, and not moving on
            assert all(paused for _, paused in later) and all(t < 12 for t, _ in later), (first, later)
            assert [t for t, _ in first] == [t for t, _ in later], (first, later)
            page.locator('#qo-chat [data-testid="bot"]').filter(has_text="interrupted").first.wait_for(timeout=20000)
            # the utterance that interrupted becomes the next turn
            wait(lambda: page.locator('#qo-chat [data-testid="user"] audio').count() == 2, "the next turn", 30)
        finally:
            browser.close()
