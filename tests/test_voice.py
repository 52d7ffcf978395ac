"""The offline voice: espeak-ng speech streamed sentence by sentence beside the text."""
from __future__ import annotations

import numpy as np
import pytest

import qwen_omni
from qwen_omni.speech import offline_voice as voice

pytestmark = pytest.mark.skipif(not voice.available(), reason="espeak-ng is not installed (CI installs it)")


def test_synthesize_gives_24khz_speech():
    a = voice.synthesize("The red circle is at the top left.")
    assert a.dtype == np.float32 and 0.8 < a.size / voice.SAMPLE_RATE < 6
    assert np.abs(a).max() > 0.05  # not silence


def test_sentence_speaker_speaks_each_sentence_when_complete():
    sp = voice.SentenceSpeaker()
    assert sp.push("Hello there") == []  # no sentence end yet
    first = sp.push(". How are")
    assert len(first) == 1 and first[0].size > 0
    assert len(sp.flush()) == 1
    assert sp.flush() == []  # nothing pending


def test_option_like_text_is_spoken_not_parsed():
    assert voice.synthesize("--help me").size > 0


def test_chat_speaks_the_reply():
    """Through `Assistant.chat(speech=True)` on the embedded model: the same text as without speech, and exactly the
    offline voice's audio of that text, streamed as chunks after the text they speak (sentence timing itself:
    `test_first_audio_is_yielded_before_the_text_ends`)."""
    assistant = qwen_omni.load()
    msgs = [{"role": "user", "content": "What can you do?"}]
    stats = {}
    events = list(assistant.chat(msgs, max_new_tokens=80, stream=True, speech=True, stats=stats))
    text = "".join(e for e in events if isinstance(e, str))
    assert text == assistant.chat(msgs, max_new_tokens=80) and text.startswith("I can")
    kinds = ["t" if isinstance(e, str) else "a" for e in events]
    assert kinds[0] == "t" and "a" in kinds
    streamed = np.concatenate([e for e in events if not isinstance(e, str)])
    np.testing.assert_array_equal(streamed, voice.synthesize(text))
    text2, audio = assistant.chat(msgs, max_new_tokens=80, speech=True)
    assert text2 == text and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, streamed)
    assert stats["time_to_first_audio"] > 0 and stats["speech"] == "offline"
    assert abs(stats["audio_seconds"] - streamed.size / voice.SAMPLE_RATE) < 1e-6


def test_unknown_voice_is_a_clear_error():
    with pytest.raises(qwen_omni.InputError, match="could not speak"):
        voice.synthesize("hello", voice="xx-nonexistent")


def test_first_audio_is_yielded_before_the_text_ends():
    import time

    from qwen_omni.speech.offline_voice import speak

    def text():
        yield "The circle is red. "
        yield "It sits"
        yield " at the top left."

    stats = {}
    events = list(speak(text(), "default", stats, time.perf_counter()))
    kinds = ["t" if isinstance(e, str) else "a" for e in events]
    assert kinds == ["t", "a", "t", "t", "a"]  # sentence one is heard while sentence two is still being written
    assert stats["real_time_factor"] < 1.0  # faster than real time
