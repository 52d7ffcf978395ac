"""Voice activity (qwen_omni/speech/vad.py): a spoken question between silences gives one start and one stop,
at the right times, and its utterance; silence and noise give none; bad audio is a clear error."""
import numpy as np
import pytest

from qwen_omni.errors import InputError
from qwen_omni.speech import offline_voice
from qwen_omni.speech.vad import RATE, Endpointer

pytestmark = pytest.mark.skipif(not offline_voice.available(), reason="needs espeak-ng")


def feed(ep, audio, rate, piece=0.1):
    events = []
    step = int(rate * piece)
    for i in range(0, audio.size, step):
        events += ep.push(audio[i:i + step], rate)
    return events


@pytest.mark.parametrize("rate", [24000, 16000])
def test_one_question_one_turn(rate):
    speech = offline_voice.synthesize("What colour is the circle?")  # 24 kHz
    if rate != 24000:
        from encoders.media import resample
        speech = resample(speech, 24000, rate)
    gap = np.zeros(rate, np.float32)
    ep = Endpointer(silence_ms=600)
    events = feed(ep, np.concatenate([gap, speech, gap, gap]), rate)
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
    spoken = speech.size / rate
    assert 0.9 <= events[0].at <= 1.5  # speech begins after the first second of silence
    assert 1.0 + spoken + 0.3 <= events[1].at <= 1.0 + spoken + 1.2  # ends ~silence_ms after the last word
    utt = ep.take_utterance()
    assert utt is not None and spoken * 0.8 <= utt.size / RATE <= spoken + 1.2
    assert ep.take_utterance() is None  # handed over once


def test_silence_and_hum_are_not_speech():
    ep = Endpointer()
    t = np.arange(3 * RATE) / RATE
    hum = 0.05 * np.sin(2 * np.pi * 50 * t).astype(np.float32)
    assert feed(ep, np.zeros(3 * RATE, np.float32), RATE) == [] and feed(ep, hum, RATE) == []
    assert ep.flush() is None


def test_flush_ends_a_turn_and_bad_audio_is_an_error():
    speech = offline_voice.synthesize("seven")
    ep = Endpointer()
    events = feed(ep, np.concatenate([np.zeros(24000, np.float32), speech]), 24000)
    assert [e.kind for e in events] == ["speech_started"]
    assert ep.flush().size > 0.3 * RATE and not ep.speaking
    with pytest.raises(InputError, match="NaN"):
        ep.push(np.array([0.0, np.nan], np.float32))
    with pytest.raises(InputError, match="threshold"):
        Endpointer(threshold=1.5)
