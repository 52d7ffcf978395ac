"""Spoken replies through `Assistant.chat(speech=True, stream=True)` on tiny random FULL Omni checkpoints.

Checkpoints: tests/tiny_speech.py (built by transformers, saved with `save_pretrained`, chatted with through
`qwen_omni.load`). Random thinkers stop whenever greedy decoding happens to pick `<|im_end|>`; the seeds used
here give replies longer than the budgets asked for, so "before the thinker finished" is meaningful.

Parity of the parts is established elsewhere and not repeated: talker codes and vocoder waveforms against
transformers 5.24 in tests/test_speech3.py / tests/test_speech25.py (greedy codes, `speak`, token2wav), exact
streaming of each vocoder there too. Here:
(a) streaming: an audio chunk is yielded before the thinker's last text piece (both families);
(b) Qwen3: the streamed audio equals our whole-clip decode of the same codes (1e-4), and the chat's greedy codes
    and waveform equal transformers' `generate(return_audio=True)` end to end (image + audio + text prompt);
    a follow-up turn that reuses the cached prefix (hidden states kept with it) speaks exactly as a fresh
    prefill does. Qwen2.5: the chat's greedy codes equal `talker25.speak` (which test_speech25 ties to the
    reference), the exact-mode stream equals the whole decode, and the windowed (default) mode's seam error
    is bounded;
(c) lazy loading: a text-only chat never loads the talker; speech=False refuses spoken replies clearly; voices.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qwen_omni
from qwen_omni.webapp import session as cs
from qwen_omni.errors import InputError

from .tiny_speech import make_qwen3_full, make_qwen25_full

Q3_SEED = 2  # this seed's greedy replies run past 30 tokens without <|im_end|>
QUESTION = [{"role": "user", "content": "what is in this picture? describe the image."}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def q3(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("q3_full")
    return dict(dir=d, hf=make_qwen3_full(d, seed=Q3_SEED))


@pytest.fixture(scope="module")
def q25(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("q25_full")
    return dict(dir=d, hf=make_qwen25_full(d))


def greedy_assistant(d, seconds: float):
    from qwen_omni.speech.qwen3.talker import PREDICTOR_GREEDY, TALKER_GREEDY
    from qwen_omni.speech.qwen25.talker import TALKER_GREEDY as TALKER25_GREEDY

    a = qwen_omni.load(d, device="cpu", dtype="float32")
    e = a.speech.load()
    e.max_audio_seconds = seconds  # a random talker never says EOS
    e.record_codes = []
    if a.speech.family == "qwen3":
        e.talker_params, e.predictor_params = TALKER_GREEDY, PREDICTOR_GREEDY
    else:
        e.talker_params = TALKER25_GREEDY
    return a


def spoken(a, messages, max_new_tokens, stats=None, **kw):
    """(events, text, audio, codes) of one streamed spoken reply."""
    events = list(a.chat(messages, max_new_tokens=max_new_tokens, temperature=0, stream=True, speech=True,
                         stats=stats if stats is not None else {}, **kw))
    audio = [e for e in events if not isinstance(e, str)]
    assert all(x.dtype == np.float32 and x.ndim == 1 and x.size for x in audio)
    return (events, "".join(e for e in events if isinstance(e, str)),
            np.concatenate(audio) if audio else np.zeros(0, np.float32), a.speech.pipeline.record_codes[-1])


def audio_before_last_text(events) -> bool:
    kinds = ["t" if isinstance(e, str) else "a" for e in events]
    return "a" in kinds and kinds.index("a") < len(kinds) - 1 - kinds[::-1].index("t")


# ------------------------------------------------------------------------------------------------ Qwen3-Omni

def test_qwen3_streams_audio_during_the_text_and_equals_the_whole_decode(q3):
    a = greedy_assistant(q3["dir"], seconds=2.56)  # 32 frames
    stats = {}
    events, text, audio, codes = spoken(a, QUESTION, max_new_tokens=24, stats=stats)
    assert stats["completion_tokens"] == 24 and stats["speech"] == "talker" and stats["voice"] == "Ethan"
    assert audio_before_last_text(events), ["t" if isinstance(e, str) else "a" for e in events]
    assert len(codes) == 32
    whole = a.speech.pipeline.vocoder(torch.stack(codes, dim=1)[None])[0, 0].numpy()
    assert audio.shape == whole.shape and float(whole.std()) > 0.02  # a real signal
    assert np.abs(audio - whole).max() < 1e-4
    assert 0 < stats["time_to_first_audio"] < stats["total_time"]  # heard before the thinker was done
    assert stats["audio_seconds"] == pytest.approx(audio.size / 24000) and stats["real_time_factor"] > 0
    assert text == a.chat(QUESTION, max_new_tokens=24, temperature=0)  # speaking does not change the text


def q3_media_question():
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8))
    clip = (rng.standard_normal(32000) * 0.1).astype(np.float32)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "audio", "audio": clip},
                                         {"type": "text", "text": "what do you see and hear?"}]}]


def test_qwen3_greedy_codes_and_wave_equal_reference_generate(q3):
    """End to end through the chat API: prompt template, processor, thinker, recorder, talker, Code2Wav stream."""
    hf, frames, n_text = q3["hf"], 12, 10
    a = greedy_assistant(q3["dir"], seconds=frames / 12.5)
    msgs = q3_media_question()
    _, text, audio, codes = spoken(a, msgs, max_new_tokens=n_text)
    inputs = a.prepare(msgs)
    seen = {}
    chunked_decode = hf.code2wav.chunked_decode

    def keep_codes(c, **k):
        seen["codes"] = c
        return chunked_decode(c, **k)

    hf.code2wav.chunked_decode = keep_codes
    try:
        ids, wav = hf.generate(
            input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
            input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"],
            speaker="Ethan", thinker_max_new_tokens=n_text, thinker_do_sample=False, thinker_eos_token_id=a.stop_ids,
            talker_max_new_tokens=frames + 1, talker_do_sample=False)
    finally:
        del hf.code2wav.chunked_decode
    L = inputs["input_ids"].shape[1]
    assert a.tokenizer.decode(ids[0, L:].tolist(), skip_special_tokens=True) == text
    assert torch.equal(torch.stack(codes, dim=1), seen["codes"][0]) and len(codes) == frames
    assert audio.shape == wav.reshape(-1).shape and float(wav.std()) > 0.02  # a real signal
    assert np.abs(audio - wav.reshape(-1).numpy()).max() <= 1e-5  # float32 rounding (measured 4.5e-7)


def test_qwen3_follow_up_turn_reuses_the_prefix_exactly(q3):
    a = greedy_assistant(q3["dir"], seconds=0.8)
    msgs = q3_media_question()
    first = {}
    reply = a.chat(msgs, max_new_tokens=6, temperature=0, speech=True, stats=first)[0]
    turn2 = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the colour?"}]
    stats = {}
    _, _, audio, codes = spoken(a, turn2, max_new_tokens=8, stats=stats)
    assert stats["reused_tokens"] >= first["prompt_tokens"]  # image and audio placeholders not prefilled again
    a.prefix_cache.clear()
    a.chat(msgs, max_new_tokens=6, temperature=0)  # a text-only turn caches no hidden states ...
    stats2 = {}
    _, _, audio2, codes2 = spoken(a, turn2, max_new_tokens=8, stats=stats2)
    assert stats2["reused_tokens"] == 0  # ... so the spoken turn prefills everything
    assert torch.equal(torch.stack(codes), torch.stack(codes2)) and np.abs(audio - audio2).max() < 1e-5


# ------------------------------------------------------------------------------------------------ Qwen2.5-Omni

def test_qwen25_streams_and_matches_speak_and_the_whole_decode(q25):
    from qwen_omni.engine.generate import make_generator
    from qwen_omni.speech.qwen25.pipeline import persona_in_first_user_turn
    from qwen_omni.speech.qwen25.talker import TALKER_GREEDY, speak
    from qwen_omni.speech.qwen25.token2wav_stream import FrameNoise

    a = greedy_assistant(q25["dir"], seconds=2.0)  # 100 codes
    e = a.speech.pipeline
    events, text, audio, codes = spoken(a, QUESTION, max_new_tokens=60, seed=5)
    assert audio_before_last_text(events), ["t" if isinstance(x, str) else "a" for x in events]
    assert len(codes) == 100 and audio.size == 100 * e.token2wav.samples_per_code

    # the same codes as talker25.speak (tied to transformers in test_speech25) on the speech-prompted inputs
    inputs = a.prepare(persona_in_first_user_turn(QUESTION))
    tokens = []
    ref = list(speak(a.model, e.talker, inputs, e.speakers["Chelsie"], max_new_tokens=60, stop_ids=a.stop_ids,
                     talker_params=TALKER_GREEDY, talker_max_new_tokens=100, on_token=tokens.append))
    assert codes == ref and a.tokenizer.decode(tokens, skip_special_tokens=True) == text

    # the whole decode of these codes, from the noise the stream drew (seed + 2)
    spk = e.speakers["Chelsie"]
    noise = FrameNoise(make_generator(5 + 2), 80).get(0, 2 * len(codes))
    whole = e.token2wav(torch.tensor([codes]), spk["cond"][None], spk["ref_mel"], noise=noise)[0].numpy()
    seam = np.abs(audio - whole).max()  # windowed: edges see truncated context (qwen_omni/speech/qwen25/pipeline.py)
    assert whole.std() > 0.02 and seam <= 1e-4 * np.abs(whole).max(), seam  # ~3e-6 on this tiny DiT (short
    # reach); bench/tta.py measures realistic shapes
    e.exact = True
    _, _, exact, codes2 = spoken(a, QUESTION, max_new_tokens=60, seed=5)
    assert codes2 == codes and np.abs(exact - whole).max() < 1e-4


def test_qwen25_speech_prompt_and_persona():
    from qwen_omni.speech.qwen25.pipeline import persona_in_first_user_turn
    from qwen_omni.speech.qwen25.talker import SPEECH_SYSTEM_PROMPT

    out = persona_in_first_user_turn([{"role": "system", "content": "You are a pirate."}, *QUESTION])
    assert out[0] == {"role": "system", "content": SPEECH_SYSTEM_PROMPT}
    assert out[1]["content"] == "You are a pirate.\n\n" + QUESTION[0]["content"] and len(out) == 2
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert persona_in_first_user_turn(parts)[1]["content"][0] == {"type": "text", "text": "Be brief.\n\n"}
    assert persona_in_first_user_turn(QUESTION) == [{"role": "system", "content": SPEECH_SYSTEM_PROMPT}, *QUESTION]


# ------------------------------------------------------------------------------------------------ loading, voices

def test_lazy_loading_voices_and_disabling(q3, q25):
    a = qwen_omni.load(q3["dir"], device="cpu", dtype="float32")
    assert a.speech.family == "qwen3" and not a.speech.loaded
    a.chat(QUESTION, max_new_tokens=4)
    assert a.speech.pipeline is None and not any("talker" in n or "code2wav" in n for n, _ in a.model.named_modules())
    assert a.speech.voices == ["Ethan", "Aiden", "Chelsie"]
    with pytest.raises(InputError, match="Aiden, Chelsie"):
        a.chat(QUESTION, speech=True, voice="Nobody", stream=True)
    assert not a.speech.loaded  # refused before anything was loaded
    assert a.speech.resolve_voice("aiden") == "Aiden"

    off = qwen_omni.load(q3["dir"], device="cpu", dtype="float32", speech=False)
    with pytest.raises(InputError, match="speech=False"):
        off.chat(QUESTION, speech=True, stream=True)
    assert off.speech.voices == [] and cs.voice_choices(off) == []

    eager = qwen_omni.load(q25["dir"], device="cpu", dtype="float32", speech=True)
    assert eager.speech.loaded and eager.speech.voices == ["Chelsie", "Ethan"]
    with pytest.raises(InputError, match="Chelsie, Ethan"):
        eager.chat(QUESTION, speech=True, voice="Aiden")


def test_chat_session_streams_wav_chunks_and_stats(q3):
    import io
    import wave

    a = greedy_assistant(q3["dir"], seconds=1.28)
    session = cs.ChatSession(a)
    steps = list(session.submit({"text": "describe the image."}, [], "", cs.Sampling(
        temperature=0, max_new_tokens=16, speak=True, voice="Chelsie"), with_audio=True))
    chunks = [s[2] for s in steps if s[2] is not None]
    assert chunks and all(s[1] is None for s in steps)
    with wave.open(io.BytesIO(chunks[0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2) and w.getnframes() > 0
    *_, reply, audio = steps[-1][0]  # the spoken reply's text (with its stats footer), then its audio message
    assert "first audio" in reply["content"] and "RTF" in reply["content"]
    assert audio["role"] == "assistant" and str(audio["content"]["path"]).endswith(".wav")
    # callers without a player get (history, warning) steps as before
    assert all(len(s) == 2 for s in session.submit({"text": "hi"}, [], "", cs.Sampling(max_new_tokens=2)))
