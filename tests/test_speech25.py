"""Qwen2.5-Omni speech output (talker + token2wav) against transformers 5.24 on a tiny random full checkpoint.

The checkpoint is a `Qwen2_5OmniForConditionalGeneration` built by transformers (thinker as in
tests/tiny_omni.py, talker 2 layers, DiT 3 layers with look-back layers [0, 2] and look-ahead [1] and 4-frame
blocks so that streaming is exercised on short inputs, BigVGAN with the released upsampling), weights spread so
that a miswired part shows, saved with `save_pretrained`, plus a `spk_dict.pt` of plain tensors and ints.

What is compared:
(1) codes: our thinker -> talker stream (`speak`, greedy talker) against HF `generate(talker_do_sample=False)`
    on an image + audio + text prompt under the speech system prompt; thinker tokens and every code equal; the
    resulting waveforms (the same seed, so the same initial noise) within 1e-5;
(2) token2wav with the same codes and an explicit shared noise: waveform within 1e-5 (in practice 0), with and
    without classifier-free guidance, for both speakers;
(3) chunking: BigVGAN in chunks with its context equals one pass; the exact streaming sampler equals the whole
    decode within 1e-4; the windowed (low-latency) sampler equals it when its windows cover the utterance,
    and its seam error at a practical context is measured (it cannot be exact: see qwen_omni/speech/qwen25/token2wav_stream.py);
(4) the generator APIs: codes stream while the thinker is still producing text, and `token2wav_stream25.stream`
    yields audio chunks before the last code arrives.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from PIL import Image

import qwen_omni  # noqa: E402
from qwen_omni.errors import CheckpointError, InputError  # noqa: E402
from qwen_omni.engine.generate import make_generator  # noqa: E402
from qwen_omni.engine.sampling import SamplingParams  # noqa: E402
from qwen_omni.speech.qwen25.pipeline import load_speakers, load_speech25  # noqa: E402
from qwen_omni.speech.qwen25.talker import (SPEECH_SYSTEM_PROMPT, TALKER_GREEDY, VOICES, pick_voice, speak,  # noqa: E402
                                speech_messages)
from qwen_omni.speech.qwen25.token2wav_stream import FrameNoise, stream  # noqa: E402

from .tiny_omni import thinker_config  # noqa: E402

TTS_TEXT = dict(tts_text_start_token_id=597, tts_text_end_token_id=598, tts_text_pad_token_id=599)
N_TEXT, N_CODES = 6, 16


def full_config(ids):
    from transformers import Qwen2_5OmniConfig

    th = thinker_config("qwen2_5", ids)
    return Qwen2_5OmniConfig(
        thinker_config=th.to_dict(),
        talker_config=dict(
            vocab_size=8448, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, **TTS_TEXT,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            audio_token_index=ids["audio"], image_token_index=ids["image"], video_token_index=ids["video"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
            audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"]),
        token2wav_config=dict(
            dit_config=dict(num_embeds=8448, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, head_dim=16,
                            ff_mult=2, emb_dim=16, mel_dim=80, enc_emb_dim=16, enc_dim=16, block_size=4,
                            enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8,
                            look_ahead_layers=[1], look_backward_layers=[0, 2],
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            # 240 samples per frame as released, in 3 stages instead of 6 to keep the test quick
            bigvgan_config=dict(mel_dim=80, upsample_initial_channel=32, upsample_rates=[8, 6, 5],
                                upsample_kernel_sizes=[16, 12, 11], resblock_kernel_sizes=[3, 5],
                                resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]])))


def spread(module: torch.nn.Module) -> None:
    """Fan-in scaled weights and visible biases, so signals neither vanish nor saturate the [-1, 1] clamp."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("alpha", "beta")):  # SnakeBeta log-parameters
                p.normal_(0, 0.3)
            elif "norm" in name and p.dim() == 1:
                p.normal_(1, 0.1)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 1.0 / max(1, p[0].numel()) ** 0.5 if "embed" not in name else 1.0)
        if hasattr(module, "token2wav"):  # a log-mel in the vocoder's range ([-11, 2]), audio mostly unclipped
            dit, voc = module.token2wav.code2wav_dit_model, module.token2wav.code2wav_bigvgan_model
            dit.proj_out.weight.mul_(0.2)
            dit.proj_out.bias.normal_(-4, 0.5)
            voc.conv_post.weight.mul_(0.15)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    from .tiny_speech import make_qwen25_full

    d = tmp_path_factory.mktemp("omni25_speech")
    hf = make_qwen25_full(d, seed=0)
    talker, t2w, speakers = load_speech25(d)
    return dict(dir=d, hf=hf, talker=talker, t2w=t2w, speakers=speakers, ours=qwen_omni.load(d, device="cpu",
                                                                                          dtype="float32"))


def spk(env, name="Chelsie"):
    s = env["speakers"][name]
    return s["cond"][None], s["ref_mel"]


# ------------------------------------------------------------------------------------------ (1) talker codes

@contextlib.contextmanager
def talker_gets_mask(hf):
    """Give HF's talker forward the all-ones attention mask that 5.24's `generate` drops for an unpadded sample,
    so HF's own code runs the talker as designed (TMRoPE positions, codec pad/bos embeddings)."""
    orig = hf.talker.forward

    @functools.wraps(orig)
    def forward(*args, **kw):
        if kw.get("attention_mask") is None:
            cache = kw.get("cache")
            seen = cache.get_seq_length() if cache is not None else 0
            new = kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else kw["input_ids"]
            kw["attention_mask"] = torch.ones(1, seen + new.shape[1], dtype=torch.long)
        return orig(*args, **kw)

    hf.talker.forward = forward
    try:
        yield
    finally:
        del hf.talker.forward


@pytest.mark.parametrize("mode", ["designed", "hf524_batch1"])
def test_talker_codes_and_wave_match_reference_generate(env, mode):
    a, hf = env["ours"], env["hf"]
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((56, 84, 3)) * 255).astype(np.uint8))
    audio = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    msgs = speech_messages([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "audio", "audio": audio},
        {"type": "text", "text": "what is in the picture?"}]}])
    inputs = a.prepare(msgs)
    stop = a.stop_ids

    captured = {}
    talker_generate = hf.talker.generate

    def capture(*args, **kw):
        captured["codes"] = talker_generate(*args, **kw)
        return captured["codes"]

    hf.talker.generate = capture
    hf.talker.rope_deltas = None  # set by HF's talker only on its masked (designed) path
    try:
        with talker_gets_mask(hf) if mode == "designed" else contextlib.nullcontext():
            torch.manual_seed(11)  # greedy thinker and talker draw nothing: the seed reaches token2wav's noise
            text_ids, wav_ref = hf.generate(
                input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                thinker_pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"],
                speaker="Chelsie", thinker_max_new_tokens=N_TEXT, thinker_do_sample=False,
                thinker_eos_token_id=stop, talker_do_sample=False, talker_max_new_tokens=N_CODES)
    finally:
        del hf.talker.generate
    assert (hf.talker.rope_deltas is not None) == (mode == "designed")
    L = inputs["input_ids"].shape[1]
    ref_codes = captured["codes"][0, L + 2:].tolist()
    ref_codes = ref_codes[:next((i for i, c in enumerate(ref_codes) if c in (8292, 8294)), len(ref_codes))]

    text: list[int] = []
    seen_text_at: list[int] = []
    codes = []
    for c in speak(a.model, env["talker"], inputs, env["speakers"]["Chelsie"], max_new_tokens=N_TEXT,
                   stop_ids=stop, talker_params=TALKER_GREEDY, talker_max_new_tokens=N_CODES,
                   on_token=text.append, hf524_batch1=mode == "hf524_batch1"):
        seen_text_at.append(len(text))
        codes.append(c)
    assert text == text_ids[0, L:].tolist() and len(text) >= 2
    assert codes == ref_codes and len(codes) > len(text)  # the talker runs past the reply (eos, pad slots)
    assert seen_text_at[0] < len(text)  # streamed: the first code came before the thinker finished

    torch.manual_seed(11)
    ours = env["t2w"](torch.tensor([codes]), *spk(env))[0]
    assert ours.shape == wav_ref.shape == (len(codes) * 480,)
    assert (ours - wav_ref).abs().max().item() <= 1e-5  # float32 rounding (measured 0)
    assert wav_ref.std().item() > 0.02  # a real signal, far above the allowance


# --------------------------------------------------------------------------------------- (2) token2wav parity

@pytest.mark.parametrize("speaker,guidance,steps", [("Chelsie", 0.5, 10), ("Ethan", 0.0, 3)])
def test_token2wav_matches_reference_with_shared_noise(env, speaker, guidance, steps):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8448, (1, 14), generator=g)
    s = env["speakers"][speaker]
    torch.manual_seed(5)
    with torch.no_grad():
        ref = env["hf"].token2wav(codes, conditioning=s["cond"][None], reference_mel=s["ref_mel"],
                                  num_steps=steps, guidance_scale=guidance)
    torch.manual_seed(5)
    noise = torch.randn(1, 28, 80)  # what the reference draws first, made explicit
    ours = env["t2w"](codes, s["cond"][None], s["ref_mel"], noise=noise, num_steps=steps, guidance_scale=guidance)[0]
    assert ref.std().item() > 0.02 and (ours - ref).abs().max().item() <= 1e-5
    torch.manual_seed(5)
    with torch.no_grad():
        ref_mel = env["hf"].token2wav.code2wav_dit_model.sample(s["cond"][None], s["ref_mel"], codes,
                                                                num_steps=steps, guidance_scale=guidance)
    mel = env["t2w"].mel(codes, s["cond"][None], s["ref_mel"], noise=noise, num_steps=steps, guidance_scale=guidance)
    assert (mel - ref_mel).abs().max().item() <= 1e-4 * ref_mel.abs().max().item()
    assert ref.std().item() > 1e-2 and (ref.abs() < 1).float().mean().item() > 0.5  # a signal, mostly unclipped


# ------------------------------------------------------------------------------------------- (3) chunking

def whole(env, codes, noise: FrameNoise, steps):
    n = len(codes) * 2
    return env["t2w"](torch.tensor([codes]), *spk(env), noise=noise.get(0, n), num_steps=steps)[0]


def test_bigvgan_chunks_with_context_equal_one_pass(env):
    t2w = env["t2w"]
    mel = torch.randn(1, 80, 37) - 4
    one = t2w.vocode(mel)
    for chunk in (5, 16):
        assert (t2w.vocode(mel, chunk_frames=chunk) - one).abs().max().item() <= 1e-5
    from qwen_omni.speech.qwen25.bigvgan import BigVGAN25
    from qwen_omni.models.loader import empty_weights
    from qwen_omni.speech.qwen25.config import BigVGANConfig25

    with empty_weights():
        released = BigVGAN25(BigVGANConfig25())
    assert released.context_frames() == 34 and t2w.code2wav_bigvgan_model.context_frames() == 12
    # a perturbed frame changes nothing beyond the derived receptive field
    mel2 = mel.clone()
    mel2[..., 18] += 3
    changed = ((t2w.vocode(mel2) - one).abs() > 0).nonzero()[:, 1]
    assert 18 - changed.min().item() / 240 <= 12 and changed.max().item() / 240 - 19 <= 12


@pytest.mark.parametrize("steps", [4, 10])
def test_exact_stream_equals_whole_decode(env, steps):
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 8448, (40,), generator=g).tolist()
    noise = FrameNoise(torch.Generator().manual_seed(9), 80, page=32)  # pages smaller than the utterance
    ref = whole(env, codes, noise, steps=steps)
    pulled = []

    def source():
        for c in codes:
            pulled.append(c)
            yield c

    chunks, pulled_at = [], []
    for wav in stream(env["t2w"], source(), *spk(env), noise=noise, num_steps=steps, vocoder_chunk_frames=8):
        chunks.append(wav)
        pulled_at.append(len(pulled))
    out = torch.cat(chunks)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    # first audio: the last evaluation finalises blocks 4*(steps-1) blocks (of 2 codes) behind the input, and the
    # vocoder wants its first chunk (8 frames) plus context (12 frames) final, i.e. 5 blocks
    expect_first = (4 * (steps - 1) + 5) * 2
    assert pulled_at[0] == min(len(codes), expect_first)
    assert steps == 10 or len(chunks) > 1  # at 4 steps, audio comes before the last code arrives


def test_windowed_stream_seams(env):
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 8448, (40,), generator=g).tolist()
    noise = FrameNoise(torch.Generator().manual_seed(9), 80)
    ref = whole(env, codes, noise, steps=4)
    t2w = env["t2w"]
    covering = torch.cat(list(stream(t2w, iter(codes), *spk(env), noise=noise, num_steps=4, exact=False,
                                         chunk_codes=8, left_codes=40, right_codes=40)))
    assert (covering - ref).abs().max().item() <= 1e-4  # windows spanning the utterance: exact
    errors = {}
    for ctx in (0, 2, 8):  # codes of context each side of 8-code chunks (2-code blocks)
        out = torch.cat(list(stream(t2w, iter(codes), *spk(env), noise=noise, num_steps=4, exact=False,
                                        chunk_codes=8, left_codes=ctx, right_codes=ctx)))
        assert out.shape == ref.shape
        errors[ctx] = (out - ref).abs().max().item()
    # truncated context changes the result (why: qwen_omni/speech/qwen25/token2wav_stream.py), less so with more context; on this
    # random model the cross-block influence is weak, so the seam error is small in absolute terms
    assert errors[0] > 1e-5 and errors[8] <= errors[0]


# --------------------------------------------------------------------------------- (4) end-to-end streaming

def test_speak_then_stream_audio(env):
    a = env["ours"]
    inputs = a.prepare(speech_messages([{"role": "user", "content": "say something"}]))
    text: list[int] = []
    codes: list[int] = []

    def code_source():
        for c in speak(a.model, env["talker"], inputs, env["speakers"]["Ethan"], max_new_tokens=4,
                       stop_ids=a.stop_ids, talker_params=SamplingParams(0.9, 40, 0.8, 1.05),
                       talker_max_new_tokens=12, talker_generator=make_generator(0), on_token=text.append):
            codes.append(c)
            yield c

    noise = FrameNoise(torch.Generator().manual_seed(2), 80)
    s = env["speakers"]["Ethan"]
    chunks = list(stream(env["t2w"], code_source(), s["cond"][None], s["ref_mel"], noise=noise, num_steps=3))
    assert text and codes and all(0 <= c < 8448 for c in codes)
    ref = env["t2w"](torch.tensor([codes]), s["cond"][None], s["ref_mel"], noise=noise.get(0, 2 * len(codes)),
                     num_steps=3)[0]
    assert (torch.cat(chunks) - ref).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------ loading, prompt rules

def test_loader_dtypes_strictness_and_speaker_file(env, tmp_path):
    talker, t2w, speakers = load_speech25(env["dir"], dtype=torch.bfloat16)
    assert talker.codec_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in t2w.parameters())  # token2wav stays float32
    assert set(speakers) == set(VOICES) and speakers["Ethan"]["ref_mel"].shape == (1, 50, 80)
    assert pick_voice(speakers) is speakers["Chelsie"] and pick_voice(speakers, "Ethan")["bos_token"] == 596
    with pytest.raises(InputError, match="available"):
        pick_voice(speakers, "Nobody")

    from safetensors.torch import load_file, save_file

    for f in env["dir"].iterdir():
        if f.suffix in (".json", ".pt"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for f in env["dir"].glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    del tensors["token2wav.code2wav_dit_model.proj_out.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="proj_out.bias"):
        load_speech25(tmp_path)

    class Evil:  # anything but plain tensors/containers is refused by weights_only loading
        def __reduce__(self):
            return (print, ("pickle ran",))

    torch.save({"Chelsie": Evil()}, tmp_path / "spk_dict.pt")
    with pytest.raises(CheckpointError, match="plain tensors"):
        load_speakers(tmp_path)


def test_codes_outside_the_dit_table_are_refused(env):
    with pytest.raises(InputError, match="outside the DiT"):
        env["t2w"](torch.tensor([[1, 8449]]), *spk(env), num_steps=2)


def test_speech_system_prompt():
    msgs = [{"role": "user", "content": "hi"}]
    assert speech_messages(msgs)[0] == {"role": "system", "content": SPEECH_SYSTEM_PROMPT}
    assert speech_messages(speech_messages(msgs)) == speech_messages(msgs)
    mine = [{"role": "system", "content": "be brief"}, *msgs]
    with pytest.raises(InputError, match="system prompt"):
        speech_messages(mine)
    assert speech_messages(mine, replace_system=True) == speech_messages(msgs)
