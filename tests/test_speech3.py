"""Qwen3-Omni speech output (talker + code predictor + Code2Wav) against transformers 5.24.

The reference is a tiny random `Qwen3OmniMoeForConditionalGeneration` (the config of
/work/shared/reference/tiny_hf_probe.py `tiny_q3_full_config`: talker 2 MoE layers, 4 experts top-2 + shared
expert, 4 code groups; Code2Wav 1 layer, window 8) saved with `save_pretrained`, then run by HF's own `generate`
(greedy thinker, `talker_do_sample=False`, which also makes the code predictor greedy) on a prompt with a system
turn, an image and audio. HF's talker reads `config.audio_config`, which its talker config lacks: we set it from
the thinker (the documented workaround) after saving. Code2Wav weights are re-drawn with a gain that gives a
clip of std ~0.1 and no clamping, so that a 1e-5 comparison means something.
1. Our talker, streamed token by token from HF's thinker embeddings / hidden states, gives HF's code matrix.
   Our own thinker's prompt hidden states (`return_hidden_layer`) match HF's and give the same codes.
2. Code2Wav3 on HF's codes (and on random codes) matches HF's code2wav within 1e-5 (float32 rounding).
3. `Code2Wav3.stream` equals whole-clip decoding within 1e-4 for several chunkings; the conv receptive field is
   tight (one frame less of left context breaks exactness); the released config's fields are as documented.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from qwen_omni.speech.qwen3.code2wav import Code2Wav3  # noqa: E402
from qwen_omni.models.loader import empty_weights  # noqa: E402
from qwen_omni.models.registry import build_model  # noqa: E402
from qwen_omni.models.omni_config import ThinkerConfig  # noqa: E402
from qwen_omni.models.positions import RopeSpec, rope_index  # noqa: E402
from qwen_omni.speech.qwen3.config import Code2WavConfig  # noqa: E402
from qwen_omni.speech.qwen3.pipeline import load_speech3  # noqa: E402
from qwen_omni.speech.qwen3.talker import PREDICTOR_GREEDY, TALKER_GREEDY  # noqa: E402
from tests.tiny_omni import (Q3_AUDIO, Q3_CODE2WAV, Q3_TALKER, Q3_TEXT, Q3_VISION, init_stacked_experts,  # noqa: E402
                             part)

IM_START, IM_END, SYSTEM, USER, ASSISTANT, NL = 151644, 151645, 8948, 872, 77091, 198
VISION_BOS, VISION_EOS, IMAGE_PAD = 151652, 151653, 151655
AUDIO_PAD, AUDIO_BOS, AUDIO_EOS = 151675, 151669, 151670
TALKER_TOKENS = 16  # HF talker_max_new_tokens -> 15 complete frames


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_full_config():
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

    thinker = Qwen3OmniMoeThinkerConfig(
        audio_config=part(Q3_AUDIO), vision_config=part(Q3_VISION), text_config=part(Q3_TEXT, vocab_size=152064),
        audio_token_id=AUDIO_PAD, audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS,
        vision_start_token_id=VISION_BOS, vision_end_token_id=VISION_EOS, position_id_per_seconds=13)
    return Qwen3OmniMoeConfig(
        thinker_config=thinker.to_dict(),
        talker_config=part(Q3_TALKER, audio_token_id=AUDIO_PAD, audio_start_token_id=AUDIO_BOS,
                           vision_start_token_id=VISION_BOS, speaker_id={"ethan": 2302}),
        code2wav_config=part(Q3_CODE2WAV))


def spread_code2wav(c2w: torch.nn.Module) -> None:
    """Weights with a sane gain: the clip has std ~0.1, is never clamped, and float32 rounding stays ~1e-6."""
    with torch.no_grad():
        for name, p in c2w.named_parameters():
            owner = c2w.get_submodule(name.rsplit(".", 1)[0])
            if name.endswith(("alpha", "beta")):
                p.normal_(0, 0.2)
            elif name.endswith(("scale", "gamma")):
                p.uniform_(0.3, 0.6)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "norm" in name:
                continue
            elif "embedding" in name:
                p.normal_(0, 1.0)
            elif isinstance(owner, torch.nn.ConvTranspose1d):  # (in, out, k); each output sums 2 * in terms
                p.normal_(0, 0.85 / math.sqrt(p.shape[0] * 2))
            elif isinstance(owner, torch.nn.Conv1d):
                gain = 0.3 if ".block." in name else 0.85  # residual units: small branches
                p.normal_(0, gain / math.sqrt(p.shape[1] * p.shape[2]))
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
        c2w.decoder[-1].conv.weight.mul_(0.3)


def prompt_inputs():
    from PIL import Image
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    rng = np.random.default_rng(0)
    audio = WhisperFeatureExtractor(feature_size=128)(
        (rng.standard_normal(48000) * 0.1).astype(np.float32), sampling_rate=16000, return_attention_mask=True,
        padding=True, truncation=False, return_tensors="pt")
    n_audio = int(_get_feat_extract_output_lengths(audio["attention_mask"].sum()))
    image = Qwen2VLImageProcessorPil(patch_size=16)(
        images=[Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8))], return_tensors="pt")
    n_image = int(image["image_grid_thw"].prod() // 4)
    ids = ([IM_START, SYSTEM, NL, 11, 12, 13, IM_END, NL, IM_START, USER, NL, VISION_BOS] + [IMAGE_PAD] * n_image
           + [VISION_EOS, AUDIO_BOS] + [AUDIO_PAD] * n_audio + [AUDIO_EOS, 100, 200, 300, IM_END, NL, IM_START,
                                                                ASSISTANT, NL])
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=image["pixel_values"],
                image_grid_thw=image["image_grid_thw"], input_features=audio["input_features"],
                feature_attention_mask=audio["attention_mask"]), n_audio


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """HF model saved to disk, and what its greedy `generate` did (thinker output, talker codes, waveform)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    d = tmp_path_factory.mktemp("q3full")
    torch.manual_seed(0)
    hf = Qwen3OmniMoeForConditionalGeneration(tiny_full_config()).eval()
    init_stacked_experts(hf)
    spread_code2wav(hf.code2wav)
    hf.save_pretrained(d)
    hf.talker.config.audio_config = hf.config.thinker_config.audio_config  # HF 5.24 workaround (see docstring)
    seen = {}
    thinker_generate, chunked_decode = hf.thinker.generate, hf.code2wav.chunked_decode

    def keep_thinker(*a, **k):
        seen["thinker"] = thinker_generate(*a, **k)
        return seen["thinker"]

    def keep_codes(codes, **k):
        seen["codes"] = codes
        return chunked_decode(codes, **k)

    hf.thinker.generate, hf.code2wav.chunked_decode = keep_thinker, keep_codes
    inputs, n_audio = prompt_inputs()
    _, wav = hf.generate(**inputs, speaker="Ethan", thinker_max_new_tokens=6, thinker_do_sample=False,
                         talker_max_new_tokens=TALKER_TOKENS, talker_do_sample=False)
    th = seen["thinker"]
    layer = hf.config.talker_config.accept_hidden_layer
    tts_ids = torch.tensor([[hf.config.tts_bos_token_id, hf.config.tts_eos_token_id, hf.config.tts_pad_token_id]])
    return dict(dir=d, hf=hf, inputs=inputs, n_audio=n_audio, wav=wav, codes=seen["codes"][0],
                sequences=th.sequences, embeds=torch.cat([h[0] for h in th.hidden_states], dim=1),
                hidden=torch.cat([h[layer] for h in th.hidden_states], dim=1),
                tts_embeds=hf.thinker.get_input_embeddings()(tts_ids)[0].detach())


@pytest.fixture(scope="module")
def ours(ref):
    raw = json.loads((ref["dir"] / "config.json").read_text())
    return load_speech3(ref["dir"], ThinkerConfig.parse(raw))


def talker_context(talker, ref, embeds, hidden):
    P = ref["inputs"]["input_ids"].shape[1]
    ids = ref["sequences"][:, :P]
    media = dict(image_grid_thw=ref["inputs"]["image_grid_thw"], audio_lengths=[ref["n_audio"]])
    return talker.prepare(ids, embeds[:, :P], hidden[:, :P], talker.cfg.multimodal_mask(ids), ref["tts_embeds"],
                          "Ethan", media)


def greedy(max_frames=TALKER_TOKENS - 1):
    return dict(max_frames=max_frames, params=TALKER_GREEDY, predictor_params=PREDICTOR_GREEDY)


def test_talker_codes_match_hf_streamed_token_by_token(ours, ref):
    talker, _ = ours
    P = ref["inputs"]["input_ids"].shape[1]
    ctx = talker_context(talker, ref, ref["embeds"], ref["hidden"])
    # HF's thinker_embed: the input embedding of every thinker step, so every generated token but the last (EOS)
    generated = ref["embeds"][0, P:]
    assert generated.shape[0] == ref["sequences"].shape[1] - P - 1
    assert ref["codes"].shape == (4, TALKER_TOKENS - 1)
    frames = list(talker.stream_codes(ctx, iter(generated), **greedy()))
    codes = torch.stack(frames, dim=1)
    assert torch.equal(codes, ref["codes"]), (codes, ref["codes"])

    # Push API: the talker never runs ahead of the text. Frame k needs the (k+1)-th generated token.
    stream = talker.stream(ctx, **greedy())
    for k, row in enumerate(generated):
        stream.push_text(row)
        got = list(stream.frames())
        assert len(got) == 1 and torch.equal(got[0], ref["codes"][:, k])
    stream.finish()
    rest = list(stream.frames())
    assert stream.done and torch.equal(torch.stack(rest, 1), ref["codes"][:, len(generated):])


def test_our_thinker_feeds_the_talker_like_hf(ours, ref):
    """Our Thinker's embeddings and `return_hidden_layer` states for the prompt reproduce HF's (and its codes)."""
    talker, _ = ours
    thinker, _ = build_model(ref["dir"], torch.float32, torch.device("cpu"))
    inputs = dict(ref["inputs"])
    spec = RopeSpec.from_thinker_config(json.loads((ref["dir"] / "config.json").read_text()))
    inputs["position_ids"], _ = rope_index(inputs["input_ids"], spec, image_grid_thw=inputs["image_grid_thw"],
                                           audio_lengths=[ref["n_audio"]])
    P = inputs["input_ids"].shape[1]
    with torch.no_grad():
        h, deep, vmask = thinker.embed(inputs)
        _, hidden = thinker.model(h, inputs["position_ids"], None, deep, vmask,
                                  return_hidden_layer=talker.cfg.talker.accept_hidden_layer)
        # the thinker's input embedding of every step: all tokens but the last generated one (never fed back)
        embeds = thinker.model.embed_tokens(ref["sequences"][:, :-1])
    assert (hidden - ref["hidden"][:, :P]).abs().max() < 1e-4
    text = ~talker.cfg.multimodal_mask(ref["sequences"][:, :-1])
    assert torch.equal(embeds[text], ref["embeds"][text])
    ctx = talker_context(talker, ref, embeds, torch.cat([hidden, ref["hidden"][:, P:]], dim=1))
    codes = talker.generate_codes(ctx, embeds[0, P:], **greedy())
    assert torch.equal(codes, ref["codes"])


def test_code2wav_matches_hf(ours, ref):
    _, vocoder = ours
    wav = vocoder(ref["codes"][None])
    assert wav.shape == ref["wav"].shape == (1, 1, vocoder.output_length(TALKER_TOKENS - 1))
    assert 0.02 < float(wav.std()) and float(wav.abs().max()) < 1  # a real signal, not clamped
    assert (wav - ref["wav"]).abs().max() <= 1e-5  # float32 rounding; measured 0
    codes = torch.randint(0, 2048, (1, 4, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref["hf"].code2wav(codes)
        assert float(theirs.std()) > 0.02 and (vocoder(codes) - theirs).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def vocoder():
    """Our Code2Wav on the tiny config alone (no transformers needed), weights spread like the reference's."""
    torch.manual_seed(3)
    net = Code2Wav3(Code2WavConfig.parse(tiny_full_config().code2wav_config.to_dict())).eval()
    spread_code2wav(net)
    return net


def test_code2wav_stream_equals_whole_clip(vocoder):
    codes = torch.randint(0, 2048, (4, 24), generator=torch.Generator().manual_seed(2))
    whole = vocoder(codes[None])[0, 0]
    assert float(whole.std()) > 0.02 and float((whole.abs() >= 1).float().mean()) < 1e-3  # hardly ever clamped
    rf, need = vocoder.conv_receptive_field, vocoder.context_frames(vocoder.output_length(20))
    assert (rf, need, vocoder.transformer_receptive_field) == (10, 9, 7)
    for chunk, left in ((1, None), (5, None), (7, rf), (4, need), (24, None)):
        parts = list(vocoder.stream(iter(codes.T), chunk=chunk, left_context=left))
        assert all(p.dtype == torch.float32 and p.dim() == 1 for p in parts)
        audio = torch.cat(parts)
        assert audio.shape == whole.shape
        assert (audio - whole).abs().max() < 1e-4, (chunk, left)


def test_conv_context_is_exact_and_tight(vocoder):
    """`first_frame` is the conv stack's exact dependency: run from frame first_frame(E) it reproduces every
    sample >= E bit for bit (float64), and per module the bound is tight (perturbing input i moves outputs up
    to the last t with first_input(t) <= i, and no further). Through the whole stack the outermost frame's
    influence is tiny (products of edge taps), so 1 frame less than `stream` needs costs < 1e-4 here."""
    net = copy.deepcopy(vocoder).double()
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(1, 30, net.cfg.hidden_size, dtype=torch.float64, generator=gen)
    spf = net.samples_per_frame
    with torch.no_grad():
        whole = net.convs(h)[0, 0]
        for E in (20 * spf, 20 * spf + 173, 20 * spf + 174, net.output_length(21)):
            s = net.first_frame(E)
            assert E // spf - s == (10 if E % spf < 174 else 9)
            part = net.convs(h[:, s:])[0, 0][E - s * spf:]
            assert (part - whole[E:E + part.shape[0]]).abs().max() < 1e-12
        for m in net._conv_modules():
            x = torch.randn(1, m_channels(m), 40, dtype=torch.float64, generator=gen)
            bumped = x.clone()
            bumped[..., 8] += 1
            moved = (m(bumped) - m(x)).abs().amax(1)[0].nonzero().flatten()
            last = int(moved.max())
            assert m.first_input(last) <= 8 and m.first_input(last + 1) == 9, type(m).__name__


def m_channels(m: torch.nn.Module) -> int:
    """Input channels of a conv-stack module."""
    convs = [x for x in m.modules() if isinstance(x, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    return convs[0].in_channels if convs else m.alpha.shape[0]


def test_released_code2wav_geometry():
    """The released Code2Wav (config values in /work/shared/reference/hf-omni-internals.md §2.2) on meta."""
    cfg = Code2WavConfig.parse(dict(
        codebook_size=2048, hidden_size=1024, max_position_embeddings=8000, num_attention_heads=16,
        num_key_value_heads=16, sliding_window=72, intermediate_size=3072, layer_scale_initial_scale=0.01,
        rms_norm_eps=1e-5, num_hidden_layers=8, num_quantizers=16, upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2], decoder_dim=1536, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    with empty_weights():
        vocoder = Code2Wav3(cfg)
    assert vocoder.samples_per_frame == 1920
    assert vocoder.output_length(300) == 300 * 1920 - 555
    assert vocoder.transformer_receptive_field == 568 and vocoder.conv_receptive_field == 10
