"""Qwen2.5-Omni Thinker end to end against transformers 5.24 on a tiny random checkpoint.

What is compared, per case (text only, one image, two images of different sizes, 3-s audio, video without sound,
video with its sound (`use_audio_in_video`), a two-turn conversation with an image and an audio):

(a) the processor: our `Assistant.prepare` against the reference `Qwen2_5OmniProcessor` built offline from the
    same tokenizer file (`PreTrainedTokenizerFast` with the named multimodal tokens), `Qwen2VLImageProcessorPil`
    and `WhisperFeatureExtractor(feature_size=128)`, fed the same chat template. Prompt ids and every tensor the
    reference returns must be equal (values, shape and dtype; audio features included, padded to 30 s as there),
    and nothing else may be returned. TMRoPE position ids and rope deltas must equal the HF model's
    `get_rope_index` on the reference inputs.
(b) logits of the whole prompt: max |delta| <= 1e-4 in float32 (in practice 0);
(c) 24 greedy tokens: our generation loop (the one `Assistant.chat` runs) against HF
    `generate(do_sample=False, max_new_tokens=24, min_new_tokens=24)`; stop tokens are off on both sides so all
    24 tokens are compared.

Video: torchvision is not installed, so `Qwen2VLVideoProcessor` cannot run. The reference processor gets a
stand-in video processor that applies the documented Qwen2VLVideoProcessor formulas (`preprocess.video_patches`,
checked against those formulas in test_preprocess.py) to the frames our decoder sampled. So for video
`pixel_values_videos` is ours against our formula implementation, while everything else (placeholder count,
the chunked audio-in-video interleave of `replace_video_with_audio_token`, `video_second_per_grid` = 2 / fps,
the sound's features, positions, logits, tokens) comes from the real reference processor and model.

Deliberate difference: the reference processor cuts audio at 30 s; we encode a longer clip whole. For a 40-s
clip the reference prompt has 750 audio tokens and ours 1000. The test checks that, that our processor on the
clip's first 30 s equals the reference on the whole clip exactly, and that the HF model given our 40-s inputs
gives our logits (the difference is the processor's alone).

Also: the thinker loads out of a thinker-only checkpoint (all the cases above) and out of a full
`Qwen2_5OmniForConditionalGeneration` checkpoint, whose talker.* and token2wav.* tensors are ignored.
"""
from __future__ import annotations

import json
import wave
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from transformers import PreTrainedTokenizerFast, Qwen2_5OmniProcessor, WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.processing_utils import OmniModalProcessorMixin  # noqa: E402

import qwen_omni  # noqa: E402
from encoders import preprocess, video  # noqa: E402
from qwen_omni.engine.generate import generate  # noqa: E402
from qwen_omni.engine.sampling import SamplingParams  # noqa: E402

from .tiny_omni import Q25_TEMPLATE, TOKENS, make_thinker, save_tokenizer, thinker_config  # noqa: E402

N_NEW = 24
SR = 16000
NAMED_TOKENS = {"image_token": "image", "audio_token": "audio", "video_token": "video",
                "vision_bos_token": "vision_start", "vision_eos_token": "vision_end",
                "audio_bos_token": "audio_start", "audio_eos_token": "audio_end"}


# ---------------------------------------------------------------------------------------- reference processor

class NoVideoQwen2_5OmniProcessor(Qwen2_5OmniProcessor):
    """The reference processor minus its video processor, which needs torchvision (absent here); the probe's
    workaround (/work/shared/reference/tiny_hf_probe.py). A video stand-in can be attached afterwards."""

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None):
        OmniModalProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer,
                                         chat_template=chat_template)
        for a in ("image_token", "audio_token", "video_token", "image_token_id", "audio_token_id",
                  "video_token_id", "vision_bos_token", "vision_eos_token", "audio_bos_token", "audio_eos_token"):
            setattr(self, a, getattr(self.tokenizer, a))


class FormulaVideoProcessor:
    """Stand-in for Qwen2VLVideoProcessor with the Qwen2.5-Omni video defaults (128..768 merged tokens of 28 px
    per frame): the documented formulas, implemented by `preprocess.video_patches`."""
    patch_size, merge_size, temporal_patch_size = 14, 2, 2

    def __call__(self, videos, **_):
        out = [preprocess.video_patches(np.asarray(v), 14, 2, 2, 128 * 28 * 28, 768 * 28 * 28) for v in videos]
        return {"pixel_values_videos": torch.cat([p for p, _ in out]), "video_grid_thw": torch.cat([g for _, g in out])}


def reference_processor(d: Path) -> Qwen2_5OmniProcessor:
    names = TOKENS["qwen2_5"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                  extra_special_tokens={k: names[v] for k, v in NAMED_TOKENS.items()})
    proc = NoVideoQwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessorPil(),
                                       feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                                       chat_template=Q25_TEMPLATE)
    proc.video_processor = FormulaVideoProcessor()
    return proc


# ---------------------------------------------------------------------------------------------- media files

def write_wav16(path: Path, x: np.ndarray) -> np.ndarray:
    """16-bit mono 16-kHz WAV; returns the samples as the reference reads them (int16 / 32768)."""
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
        w.writeframes(pcm.tobytes())
    return pcm.astype(np.float32) / 32768.0


def speechy(secs: float, seed: int) -> np.ndarray:
    """A tone sweep with noise, loud then quiet, so the log-mel max-8 clamp matters."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(secs * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * (200 + 150 * (t % 4)) * t) + 0.03 * rng.standard_normal(t.size)
    x[t.size // 2:] *= 0.05
    return x.astype(np.float32)


def write_video(path: Path, sound: bool, secs: int = 3, fps: int = 10, size=(84, 56)) -> None:
    """A bar moving over a flat background; 3 s at 10 fps samples to 6 frames at exactly 2 fps, so
    `video_second_per_grid` is 1.0 on both sides, and 3 grids span two 2-s chunks of the audio-in-video
    interleave. Optional 16-kHz FLAC sound."""
    from .test_media import _mux_audio

    rng = np.random.default_rng(1)
    with av.open(str(path), "w", format="matroska") as c:
        v = c.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        a = c.add_stream("flac", rate=SR) if sound else None
        if a is not None:
            a.layout = "mono"
        for i in range(secs * fps):
            img = np.empty((size[1], size[0], 3), np.uint8)
            img[:] = rng.integers(0, 256, 3)
            img[10:30, 2 * i:2 * i + 20] = 255
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        if a is not None:
            _mux_audio(c, a, speechy(secs, 7)[None], SR)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25")
    hf = make_thinker(d / "ckpt", "qwen2_5")
    m = d / "media"
    m.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(m / "a.png")
    Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8)).save(m / "b.png")
    wav = {"3s": write_wav16(m / "3s.wav", speechy(3.0, 1)), "40s": write_wav16(m / "40s.wav", speechy(40.0, 2))}
    write_video(m / "silent.mkv", sound=False)
    write_video(m / "sound.mkv", sound=True)
    return SimpleNamespace(hf=hf, ours=qwen_omni.load(d / "ckpt", device="cpu", dtype="float32"),
                           proc=reference_processor(d / "ckpt"), m=m, wav=wav, cache={})


# ------------------------------------------------------------------------------------------------------ cases

def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def case(env, name: str):
    """(messages, reference processor kwargs, use_audio_in_video)."""
    m = env.m
    img = lambda f: {"type": "image", "image": str(m / f)}  # noqa: E731
    pil = lambda f: Image.open(m / f).convert("RGB")  # noqa: E731
    aud = lambda k: {"type": "audio", "audio": str(m / f"{k}.wav")}  # noqa: E731
    vid = lambda f: {"type": "video", "video": str(m / f)}  # noqa: E731
    if name == "text":
        return [user("what is in this picture?")], {}, False
    if name == "image":
        return [user(img("a.png"), "describe the image.")], dict(images=[pil("a.png")]), False
    if name == "two_images":
        return ([user(img("a.png"), img("b.png"), "a red circle and a blue square?")],
                dict(images=[pil("a.png"), pil("b.png")]), False)
    if name == "audio_3s":
        return [user(aud("3s"), "what do you hear in the audio clip?")], dict(audio=[env.wav["3s"]]), False
    if name == "video":
        frames = video.load_video(m / "silent.mkv", fps=2.0).frames
        return [user(vid("silent.mkv"), "it moves to the left.")], dict(videos=[frames]), False
    if name == "video_audio":
        v = video.load_video(m / "sound.mkv", fps=2.0, with_audio=True)
        return ([user(vid("sound.mkv"), "what do you hear?")],
                dict(videos=[v.frames], audio=[v.audio], audio_from_video_indices=[0], load_audio_from_video=True),
                True)
    if name == "two_turn":
        return ([user(img("a.png"), "describe the image."),
                 {"role": "assistant", "content": "a red circle and a blue square."},
                 user(aud("3s"), "how many beeps?")],
                dict(images=[pil("a.png")], audio=[env.wav["3s"]]), False)
    raise KeyError(name)


CASES = ["text", "image", "two_images", "audio_3s", "video", "video_audio", "two_turn"]


def prepared(env, name: str):
    """(ours, reference inputs, use_audio_in_video), computed once per case."""
    if name not in env.cache:
        msgs, kw, aiv = case(env, name)
        text = env.proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ref = dict(env.proc(text=[text], return_tensors="pt", **kw))
        env.cache[name] = (env.ours.prepare(msgs, use_audio_in_video=aiv), ref, aiv)
    return env.cache[name]


def assert_same_inputs(ours: dict, ref: dict) -> None:
    assert bool((ref.pop("attention_mask") == 1).all())  # one unpadded row: nothing to compare
    ours_tensors = {k for k in ours if k not in ("position_ids", "rope_deltas", "cache_key")}
    assert ours_tensors == set(ref), (sorted(ours_tensors), sorted(ref))
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, (k, ours[k].dtype, v.dtype)
        assert torch.equal(ours[k], v), k


def ref_positions(env, ref: dict, aiv: bool):
    return env.hf.model.get_rope_index(
        ref["input_ids"], ref.get("image_grid_thw"), ref.get("video_grid_thw"), torch.ones_like(ref["input_ids"]),
        aiv, ref["feature_attention_mask"].sum(-1) if "feature_attention_mask" in ref else None,
        ref.get("video_second_per_grid"))


def ours_greedy(env, inputs: dict, n: int = N_NEW) -> tuple[list[int], torch.Tensor]:
    """The loop `Assistant.chat` runs, with stop tokens off (HF's min_new_tokens) and a fresh cache: the tokens,
    and the (n, V) logits each was picked from (prefill, then every decode step)."""
    model = env.ours.model
    cache = model.new_cache(1, inputs["input_ids"].shape[1] + n)
    logits: list[torch.Tensor] = []

    def keep(out: torch.Tensor) -> torch.Tensor:
        logits.append(out.reshape(-1, out.shape[-1])[-1:].float().clone())
        return out

    with torch.no_grad():
        ids = list(generate(lambda: keep(model.prefill(inputs, cache)), lambda t: keep(model.decode_step(t, cache)),
                            context_ids=inputs["input_ids"], max_new_tokens=n, stop_ids=[],
                            params=SamplingParams(), generator=None))
    return ids, torch.cat(logits)[:len(ids)]


def hf_greedy(env, ref: dict, aiv: bool, n: int = N_NEW) -> tuple[list[int], torch.Tensor]:
    kw = dict(ref, use_audio_in_video=True) if aiv else dict(ref)
    out = env.hf.generate(**kw, do_sample=False, max_new_tokens=n, min_new_tokens=n, output_logits=True,
                          return_dict_in_generate=True)
    return out.sequences[0, ref["input_ids"].shape[1]:].tolist(), torch.cat(out.logits).float()


def max_logit_delta(env, ours: dict, ref: dict, aiv: bool) -> float:
    kw = dict(ref, use_audio_in_video=True) if aiv else dict(ref)
    with torch.no_grad():
        return (env.ours.model(ours) - env.hf(**kw).logits).abs().max().item()


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", CASES)
def test_processor_matches_reference(env, name):
    ours, ref, aiv = prepared(env, name)
    ref = dict(ref)
    pos, deltas = ref_positions(env, ref, aiv)
    assert_same_inputs(ours, ref)
    assert torch.equal(ours["position_ids"], pos.float()) and torch.equal(ours["rope_deltas"], deltas)
    if name == "video_audio":  # the interleave really alternates: video, audio, video, audio
        c = env.ours.model.cfg
        kinds = [t for t in ours["input_ids"][0].tolist() if t in (c.video_token_id, c.audio_token_id)]
        runs = [t for i, t in enumerate(kinds) if i == 0 or kinds[i - 1] != t]
        assert runs == [c.video_token_id, c.audio_token_id] * 2


@pytest.mark.parametrize("name", CASES)
def test_logits_match(env, name):
    ours, ref, aiv = prepared(env, name)
    assert max_logit_delta(env, ours, ref, aiv) <= 1e-4


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_match(env, name):
    """Identical tokens, and every step's logits agree too: on random weights greedy output can repeat one token,
    which alone would say little about the decode positions (rope delta) of later steps."""
    ours, ref, aiv = prepared(env, name)
    expected, ref_logits = hf_greedy(env, ref, aiv)
    ids, logits = ours_greedy(env, ours)
    assert len(expected) == N_NEW and ids == expected
    assert logits.shape == ref_logits.shape == (N_NEW, env.hf.config.text_config.vocab_size)
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_two_turn_chat_reuses_the_first_turn(env):
    """Through `Assistant.chat`: the second turn reuses the first turn's KV state (its image is not encoded
    again) and still produces the reference's 24 greedy tokens."""
    msgs, _, _ = case(env, "two_turn")
    _, ref, _ = prepared(env, "two_turn")
    a = env.ours
    a.prefix_cache.clear()
    stops, a.stop_ids = a.stop_ids, []  # HF's min_new_tokens: compare all 24 tokens
    try:
        a.chat(msgs[:1], max_new_tokens=4)
        stats: dict = {}
        text = a.chat(msgs, max_new_tokens=N_NEW, stats=stats)
    finally:
        a.stop_ids = stops
        a.prefix_cache.clear()
    first_prompt = a.prepare(msgs[:1])["input_ids"].shape[1]
    assert stats["reused_tokens"] == first_prompt and stats["completion_tokens"] == N_NEW
    assert text == a.tokenizer.decode(hf_greedy(env, ref, False)[0], skip_special_tokens=True)


def test_audio_over_30s_is_encoded_whole(env):
    """40-s clip: reference 750 audio tokens (cut at 30 s), ours 1000 (whole); ours on the first 30 s equals the
    reference on the whole clip exactly; the HF model on our 40-s inputs gives our logits."""
    a = env.ours
    audio_id = env.ours.model.cfg.audio_token_id
    msgs = [user({"type": "audio", "audio": str(env.m / "40s.wav")}, "what do you hear in the audio clip?")]
    text = env.proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ref = dict(env.proc(text=[text], audio=[env.wav["40s"]], return_tensors="pt"))
    whole = a.prepare(msgs)
    assert int((ref["input_ids"] == audio_id).sum()) == 750 and int((whole["input_ids"] == audio_id).sum()) == 1000
    assert whole["input_features"].shape == (1, 128, 4000) and int(whole["feature_attention_mask"].sum()) == 4000

    first30 = [user({"type": "audio", "audio": env.wav["40s"][:30 * SR]}, "what do you hear in the audio clip?")]
    assert_same_inputs(a.prepare(first30), dict(ref))

    with torch.no_grad():
        theirs = env.hf(input_ids=whole["input_ids"], input_features=whole["input_features"],
                        feature_attention_mask=whole["feature_attention_mask"]).logits
        assert (a.model(whole) - theirs).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------- checkpoint forms

def tiny_full_config(thinker):
    """A tiny Qwen2_5OmniConfig around our tiny thinker config (talker/token2wav sized as in the probe)."""
    from transformers import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig(
        thinker_config=thinker.to_dict(),
        talker_config=dict(vocab_size=8448, embedding_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                           vision_start_token_id=thinker.vision_start_token_id),
        token2wav_config=dict(
            dit_config=dict(num_embeds=8448, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                            ff_mult=2, emb_dim=32, mel_dim=80, enc_emb_dim=192, enc_dim=128,
                            enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_se_channels=16,
                            look_ahead_layers=[1], look_backward_layers=[0],
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            bigvgan_config=dict(mel_dim=80, upsample_initial_channel=64)))


def test_loads_from_full_checkpoint(env, tmp_path):
    from safetensors import safe_open
    from transformers import Qwen2_5OmniForConditionalGeneration

    ids = save_tokenizer(tmp_path, "qwen2_5")
    torch.manual_seed(3)
    full = Qwen2_5OmniForConditionalGeneration(tiny_full_config(thinker_config("qwen2_5", ids))).eval()
    full.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        (env.m.parent / "ckpt" / "preprocessor_config.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"thinker", "talker", "token2wav"}  # the speech parts are really there to be skipped

    a = qwen_omni.load(tmp_path, device="cpu", dtype="float32")
    assert a.kind == "qwen2_5_omni_thinker"
    _, ref, _ = prepared(env, "two_turn")
    inputs = a.prepare(case(env, "two_turn")[0])
    with torch.no_grad():
        delta = (a.model(inputs) - full.thinker(**ref).logits).abs().max().item()
    assert delta <= 1e-4
