"""Acceptance tests of the Qwen3-Omni-MoE thinker against transformers 5.24 (issue "Qwen3-Omni-MoE Thinker").

1. Parity on a tiny random `Qwen3OmniMoeThinkerForConditionalGeneration` saved by transformers itself
   (`tests/tiny_omni.py`: 8 experts, top-2, norm_topk_prob, DeepStack after 3 layers, interleaved MRoPE), for
   text only, an image, 3-s audio, 40-s audio, two clips of different length, a video without audio, a video
   with its own sound (use_audio_in_video) and a two-turn conversation (an image in turn 1, audio in turn 2):
   a. what the model sees: `Assistant.prepare(messages)` equals the reference processor's output. The reference
      is transformers' `Qwen3OmniMoeProcessor`, built offline from the checkpoint's own tokenizer file with the
      named tokens it reads (`image_token`, `vision_bos_token`, ...), `Qwen2VLImageProcessorPil(patch_size=16)`
      and `WhisperFeatureExtractor(feature_size=128)`. torchvision is absent here, so its video processor cannot
      be built: the processor is a subclass without it (as `NoVideo...Processor` in
      /work/shared/reference/tiny_hf_probe.py), and video prompts are checked against a reference assembled
      from the documented formulas instead: frames sized so that no resize happens, normalised as
      (x - 255·mean) / (255·std) and patchified into the (t, block, in-block) row layout, grid (T/2, H/16, W/16),
      2/fps seconds per grid, placeholders from `qwen_omni.models.positions` (`vision_tokens`, `audio_in_video_tokens`,
      whose layouts tests/test_positions.py checks against the processors' own code). Position ids and rope
      deltas of every case are compared with the HF model's `get_rope_index`. The Qwen3 processor pads audio
      only to the longest clip of the prompt (padding=True, truncation=False), as we do: masks and valid frames
      must be equal (the padding frames differ, see the test).
   b. logits: `assistant.model(inputs)` against the HF thinker on the same tensors, max |Δ| <= 1e-4 in float32.
   c. 24 greedy tokens from `assistant.chat` (ids recorded at its stream decoder, stop tokens off) equal
      `hf.generate(do_sample=False, max_new_tokens=24, min_new_tokens=24)`.
   Multi-turn reuse: the second turn reuses the first turn's cache (reused_tokens > 0, the turn-1 image is not
   encoded again) and yields the same logits and tokens as a fresh full prefill.
2. The released Qwen3-Omni-30B-A3B-Instruct thinker config builds on the meta device, and its parameter counts
   (total, and active per generated token) equal hand formulas from the config and transformers' own model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: E402
    _get_feat_extract_output_lengths as hf_audio_tokens)
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor  # noqa: E402
from transformers.processing_utils import OmniModalProcessorMixin  # noqa: E402

import qwen_omni.assistant as assistant_module  # noqa: E402
from qwen_omni.assistant import count_parameters, load  # noqa: E402
from qwen_omni.models.positions import RopeSpec, audio_in_video_tokens, vision_tokens  # noqa: E402
from qwen_omni.engine.prefix_cache import PrefixCache  # noqa: E402
from qwen_omni.engine.tokenizer import StreamDecoder  # noqa: E402
from tests.tiny_omni import TOKENS, make_thinker  # noqa: E402

NEW_TOKENS = 24
ATOL = 1e-4
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
           "video_second_per_grid", "input_features", "feature_attention_mask")


# ---------------------------------------------------------------------------------------------- media --
def picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth gradient plus noise: resizing it exercises the bicubic filter on real structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, 128 + 90 * np.sin(xx / 7 + yy / 11)], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def sound(seconds: float, seed: int) -> np.ndarray:
    """A tone sweep with noise, quieter in its second half (so the log-mel max-8 clamp matters)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t) + 0.03 * rng.standard_normal(t.size)
    x[t.size // 2:] *= 0.05
    return x.astype(np.float32)


# Video frames are multiples of 32 px and inside the Qwen3 video pixel budget (128..768 × 32²), so the reference
# video processor would not resize them: the expected patches follow from the formulas alone.
VIDEO_H, VIDEO_W, VIDEO_FRAMES, VIDEO_FPS = 320, 416, 4, 1.0


def video(seed: int, with_audio: bool) -> dict:
    frames = np.stack([np.asarray(picture(VIDEO_W, VIDEO_H, seed + i)) for i in range(VIDEO_FRAMES)])
    v = {"frames": frames, "fps": VIDEO_FPS}
    if with_audio:
        v["audio"] = sound(VIDEO_FRAMES / VIDEO_FPS, seed + 100)
    return v


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


IMAGE_1 = picture(150, 100, 1)
TURN_1 = [user({"type": "image", "image": IMAGE_1}, "what is in this picture? describe the image.")]
TURN_2 = [{"role": "assistant", "content": "a red circle and a blue square."},
          user({"type": "audio", "audio": sound(2.0, 5)}, "what do you hear in the audio clip?")]
CASES = {
    "text": ([user("the quick brown fox jumps over the lazy dog. how many beeps?")], {}),
    "image": ([user({"type": "image", "image": picture(200, 130, 2)}, "describe the image.")], {}),
    "audio_3s": ([user({"type": "audio", "audio": sound(3.0, 3)}, "what do you hear?")], {}),
    "audio_40s": ([user({"type": "audio", "audio": sound(40.0, 4)}, "how many beeps?")], {}),
    "two_audios": ([user({"type": "audio", "audio": sound(3.0, 6)}, {"type": "audio", "audio": sound(2.02, 7)},
                         "which clip is longer?")], {}),  # padded to the longer clip in one feature batch
    "video": ([user({"type": "video", "video": video(10, False)}, "it moves to the left?")], {}),
    "video_audio": ([user({"type": "video", "video": video(20, True)}, "what do you hear?")],
                    {"use_audio_in_video": True}),
    "two_turn": (TURN_1 + TURN_2, {}),
}


# ------------------------------------------------------------------------------------------- fixtures --
@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(assistant, hf thinker, hf tokenizer, hf processor) on one tiny random checkpoint."""
    d = tmp_path_factory.mktemp("qwen3-thinker")
    hf = make_thinker(d, "qwen3")
    assistant = load(d, device="cpu", dtype="float32")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    names = TOKENS["qwen3"]
    # The processor reads these attribute names (vision_bos/eos, audio_bos/eos), whatever the token strings.
    named = {"image_token": names["image"], "audio_token": names["audio"], "video_token": names["video"],
             "vision_bos_token": names["vision_start"], "vision_eos_token": names["vision_end"],
             "audio_bos_token": names["audio_start"], "audio_eos_token": names["audio_end"]}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=cfg["chat_template"],
                                  extra_special_tokens=named)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=pre["patch_size"], merge_size=pre["merge_size"], temporal_patch_size=pre["temporal_patch_size"],
        min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], image_mean=pre["image_mean"],
        image_std=pre["image_std"])
    proc = NoVideoQwen3OmniMoeProcessor(image_processor=image_processor,
                                        feature_extractor=WhisperFeatureExtractor(feature_size=pre["feature_size"]),
                                        tokenizer=tok)
    return assistant, hf, tok, proc


@pytest.fixture
def fresh(omni):
    """`omni` with no cached turns: reuse left over from another test would hide the full-prefill path."""
    omni[0].prefix_cache = PrefixCache(capacity=4)
    return omni


class NoVideoQwen3OmniMoeProcessor(Qwen3OmniMoeProcessor):
    """The reference processor minus its video processor (which needs torchvision, absent here)."""

    def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None):
        OmniModalProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer,
                                         chat_template=chat_template)
        for a in ("image_token", "audio_token", "video_token", "image_token_id", "audio_token_id", "video_token_id",
                  "vision_bos_token", "vision_eos_token", "audio_bos_token", "audio_eos_token"):
            setattr(self, a, getattr(self.tokenizer, a))


# ---------------------------------------------------------------------------------------- references --
def media_parts(messages, kind):
    return [p[kind] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == kind]


def hf_rope(hf, ref: dict, use_audio_in_video: bool):
    mask = ref.get("feature_attention_mask")
    return hf.get_rope_index(ref["input_ids"], ref.get("image_grid_thw"), ref.get("video_grid_thw"),
                             torch.ones_like(ref["input_ids"]), use_audio_in_video,
                             mask.sum(-1) if mask is not None else None, ref.get("video_second_per_grid"))


def video_reference(frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2VLVideoProcessor's output for frames it need not resize: fused rescale+normalise, then patches."""
    tp, p, m = 2, 16, 2
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0) / (torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0)
    if len(x) % tp:  # the last frame repeats up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(tp - len(x) % tp, -1, -1, -1)])
    gt, gh, gw = len(x) // tp, x.shape[2] // p, x.shape[3] // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * tp * p * p), torch.tensor([[gt, gh, gw]])


def reference(omni, messages, options) -> dict:
    """What transformers' processor gives for `messages` (video: the documented formulas, see the docstring)."""
    _, hf, tok, proc = omni
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    videos = media_parts(messages, "video")
    if not videos:
        images, audios = media_parts(messages, "image"), media_parts(messages, "audio")
        out = proc(text=[text], images=images or None, audio=audios or None, return_tensors="pt")
        return {k: v for k, v in out.items() if k in HF_KEYS}
    assert len(videos) == 1 and not media_parts(messages, "image") + media_parts(messages, "audio")
    v = videos[0]
    pixels, grid = video_reference(v["frames"])
    spec = RopeSpec.from_thinker_config(hf.config.to_dict())
    ids = tok(text)["input_ids"]
    at = ids.index(spec.video_token_id)
    ref = {"pixel_values_videos": pixels, "video_grid_thw": grid,
           "video_second_per_grid": torch.tensor([2 / v["fps"]])}
    if options.get("use_audio_in_video"):
        audio = proc.feature_extractor(v["audio"], sampling_rate=16000, padding=True, truncation=False,
                                       return_attention_mask=True, return_tensors="pt")
        n_audio = int(hf_audio_tokens(audio["attention_mask"].sum(-1))[0])
        # the block replaces <|vision_start|><|video_pad|><|vision_end|> and brings its own pair
        ids = ids[:at - 1] + audio_in_video_tokens(spec, grid[0].tolist(), 2 / v["fps"], n_audio) + ids[at + 2:]
        ref.update(input_features=audio["input_features"], feature_attention_mask=audio["attention_mask"])
    else:
        ids = ids[:at - 1] + vision_tokens(spec, grid[0].tolist(), video=True) + ids[at + 2:]
    ref["input_ids"] = torch.tensor([ids])
    return ref


def to_hf(inputs: dict, options: dict) -> dict:
    out = {k: inputs[k] for k in HF_KEYS if k in inputs}
    out["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "pixel_values_videos" in inputs:
        out["use_audio_in_video"] = bool(options.get("use_audio_in_video"))
    return out


def chat_ids(assistant, messages, n, **options) -> tuple[list[int], dict]:
    """`assistant.chat` with stop tokens off; the ids are recorded where chat hands them to its detokenizer.

    stats["step_logits"] holds the logits each new token was picked from (prefill, then every decode step).
    """
    seen: list[int] = []
    logits: list[torch.Tensor] = []
    model = assistant.model
    prefill, decode_step = model.prefill, model.decode_step

    class Recording(StreamDecoder):
        def push(self, token):
            seen.append(token)
            return super().push(token)

    def recording_prefill(*a, **k):
        logits.append(prefill(*a, **k))
        return logits[-1]

    def recording_decode_step(*a, **k):
        logits.append(decode_step(*a, **k))
        return logits[-1]

    stats: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assistant_module, "StreamDecoder", Recording)
        mp.setattr(assistant, "stop_ids", [])
        mp.setattr(model, "prefill", recording_prefill)
        mp.setattr(model, "decode_step", recording_decode_step)
        assistant.chat(messages, max_new_tokens=n, stats=stats, **options)
    stats["step_logits"] = torch.cat(logits)
    return seen, stats


# ------------------------------------------------------------------------------------------- parity --
@pytest.mark.parametrize("case", CASES)
def test_prepare_matches_reference_processor(omni, case):
    assistant, hf = omni[0], omni[1]
    messages, options = CASES[case]
    ours, ref = assistant.prepare(messages, **options), reference(omni, messages, options)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (k in ours) == (k in ref), k
        if k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    if "video_second_per_grid" in ref:
        assert torch.equal(ours["video_second_per_grid"].float(), ref["video_second_per_grid"].float())
    assert ("input_features" in ours) == ("input_features" in ref)
    if "input_features" in ref:
        mask, ref_mask = ours["feature_attention_mask"], ref["feature_attention_mask"]
        assert torch.equal(mask.long(), ref_mask.long())
        # Both pad to the longest clip of the prompt. Its padding frames are the log-mel of silence there and zeros
        # here; the mask hides them from the encoder, so only valid frames must agree (all frames for one clip).
        assert ours["input_features"].shape == ref["input_features"].shape
        valid = mask.bool()
        assert torch.equal(ours["input_features"].transpose(1, 2)[valid], ref["input_features"].transpose(1, 2)[valid])
    pos, delta = hf_rope(hf, ref, bool(options.get("use_audio_in_video")))
    assert torch.equal(ours["position_ids"], pos.float()) and torch.equal(ours["rope_deltas"], delta)


def max_logit_delta(omni, case) -> float:
    assistant, hf = omni[0], omni[1]
    messages, options = CASES[case]
    inputs = assistant.prepare(messages, **options)
    with torch.no_grad():
        ours = assistant.model(inputs)
        ref = hf(**to_hf(inputs, options)).logits
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(omni, case):
    assert max_logit_delta(omni, case) <= ATOL


@pytest.mark.parametrize("case", ["image", "two_turn"])
def test_logits_match_transformers_with_onednn_everywhere(omni, case, monkeypatch):
    """The tiny checkpoint's matrices are below `layers.ONEDNN_MIN_WEIGHTS`; with the threshold at 0 every float32
    decoder product (and the lm_head) takes the oneDNN kernel that big checkpoints use on x86 (a no-op elsewhere)."""
    from qwen_omni.models import layers

    monkeypatch.setattr(layers, "ONEDNN_MIN_WEIGHTS", 0)
    assert max_logit_delta(omni, case) <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_match_transformers(fresh, case):
    """Identical tokens, and the logits of every step agree too: on random weights greedy output can repeat one
    token, which alone would say little about the decode positions (rope delta) of later steps."""
    assistant, hf = fresh[0], fresh[1]
    messages, options = CASES[case]
    ids, stats = chat_ids(assistant, messages, NEW_TOKENS, **options)
    inputs = assistant.prepare(messages, **options)
    with torch.no_grad():
        out = hf.generate(**to_hf(inputs, options), do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    assert stats["prompt_tokens"] == inputs["input_ids"].shape[1] and stats["reused_tokens"] == 0
    assert ids == out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    ref_logits = torch.cat(out.logits)
    assert stats["step_logits"].shape == ref_logits.shape == (NEW_TOKENS, hf.config.text_config.vocab_size)
    assert (stats["step_logits"] - ref_logits).abs().max().item() <= ATOL


def test_second_turn_reuses_first_turn(fresh, monkeypatch):
    """Turn 2 continues from turn 1's cache: same logits and tokens as a fresh prefill, image not re-encoded."""
    assistant = fresh[0]
    model = assistant.model
    calls = {"vision": 0, "audio": 0}
    encode_vision, encode_audio = model.encode_vision, model.encode_audio

    def counting_vision(*a, **k):
        calls["vision"] += 1
        return encode_vision(*a, **k)

    def counting_audio(*a, **k):
        calls["audio"] += 1
        return encode_audio(*a, **k)

    monkeypatch.setattr(model, "encode_vision", counting_vision)
    monkeypatch.setattr(model, "encode_audio", counting_audio)

    reply_ids, _ = chat_ids(assistant, TURN_1, 8)
    assert calls == {"vision": 1, "audio": 0} and len(reply_ids) == 8
    reply = assistant.tokenizer.decode(reply_ids, skip_special_tokens=True)
    second = TURN_1 + [{"role": "assistant", "content": reply}] + TURN_2[1:]
    n_turn_1 = assistant.prepare(TURN_1)["input_ids"].shape[1]

    calls.update(vision=0, audio=0)
    reused_ids, reused = chat_ids(assistant, second, NEW_TOKENS)
    assert calls == {"vision": 0, "audio": 1}  # the turn-1 image comes from the cache, the new audio is encoded
    assert reused["reused_tokens"] >= n_turn_1  # at least turn 1's prompt, its image included

    assistant.prefix_cache = PrefixCache(capacity=4)
    calls.update(vision=0, audio=0)
    fresh_ids, fresh = chat_ids(assistant, second, NEW_TOKENS)
    assert calls == {"vision": 1, "audio": 1} and fresh["reused_tokens"] == 0
    assert reused_ids == fresh_ids
    assert (reused["step_logits"] - fresh["step_logits"]).abs().max().item() <= ATOL


# ------------------------------------------------------------------------ the released 30B-A3B config --
# The thinker part of Qwen3-Omni-30B-A3B-Instruct's config.json, from /work/shared/reference/hf-omni-internals.md
# §2.2 (third-party dump of the released config; this machine has no Hub access).
Q3_OMNI_30B_A3B = {
    "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
    "model_type": "qwen3_omni_moe",
    "thinker_config": {
        "model_type": "qwen3_omni_moe_thinker",
        "audio_token_id": 151675, "audio_start_token_id": 151669, "audio_end_token_id": 151670,
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "position_id_per_seconds": 13, "seconds_per_chunk": 2, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_omni_moe_text", "vocab_size": 152064, "hidden_size": 2048,
            "intermediate_size": 768,  # unused: every layer is sparse (decoder_sparse_step 1, no mlp_only_layers)
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "shared_expert_intermediate_size": 0,
            "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [24, 20, 20],
                                "interleaved": True, "mrope_interleaved": True},
        },
        "audio_config": {
            "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120, "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800,
            "conv_chunksize": 500, "downsample_hidden_size": 480, "output_dim": 2048,
            "activation_function": "gelu", "scale_embedding": False,
        },
        "vision_config": {
            "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "in_channels": 3,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
            "hidden_act": "gelu_pytorch_tanh",
        },
    },
}


def hand_count(raw: dict) -> tuple[int, int]:
    """(total, active per generated token) from the config alone.

    Active: the decoder with top-k of its experts, the embedding and the lm_head (as "A3B" counts them); the
    encoders run once per media item at prefill, never per generated token.
    """
    th = raw["thinker_config"]
    t, a, v = th["text_config"], th["audio_config"], th["vision_config"]
    H, V, L, hd = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"], t["head_dim"]
    q, kv, E, k, I = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd, t["num_experts"], \
        t["num_experts_per_tok"], t["moe_intermediate_size"]
    embed = lm_head = V * H
    attention = H * q + 2 * H * kv + q * H + 2 * hd  # q, k, v, o (no biases) + q_norm, k_norm over head_dim
    norms = 2 * H  # input / post-attention RMSNorm
    router = H * E
    expert = 3 * H * I  # gate, up, down
    dense = attention + norms + router
    text_total = embed + lm_head + H + L * (dense + E * expert)  # + H: final norm
    text_active = embed + lm_head + H + L * (dense + k * expert)

    d, f, c, mel = a["d_model"], a["encoder_ffn_dim"], a["downsample_hidden_size"], a["num_mel_bins"]
    freq = ((((mel + 1) // 2) + 1) // 2 + 1) // 2  # mel bins left after three stride-2 convolutions
    convs = (1 * c * 9 + c) + 2 * (c * c * 9 + c)  # conv2d1..3, 3x3 kernels with bias
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)  # q,k,v,out with bias; 2 LayerNorms; fc1, fc2
    audio = convs + c * freq * d + a["encoder_layers"] * layer + 2 * d + (d * d + d) + (d * a["output_dim"]
                                                                                        + a["output_dim"])

    C, F, P, T, m, out = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"], \
        v["spatial_merge_size"], v["out_hidden_size"]
    M = C * m * m  # merged width
    patch = 3 * T * P * P * C + C
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    merger = (M * M + M) + (M * out + out)
    vision = (patch + v["num_position_embeddings"] * C + v["depth"] * block
              + 2 * C + merger  # final merger: LayerNorm(C) before the shuffle
              + len(v["deepstack_visual_indexes"]) * (2 * M + merger))  # DeepStack: LayerNorm(4C) after it
    return text_total + audio + vision, text_active


def test_released_30b_a3b_config_builds_on_meta_and_counts_parameters():
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    from qwen_omni.models.loader import empty_weights
    from qwen_omni.models.omni_config import ThinkerConfig
    from qwen_omni.models.thinker import Thinker

    raw = json.loads(json.dumps(Q3_OMNI_30B_A3B))  # as read from config.json
    cfg = ThinkerConfig.parse(raw)
    with empty_weights():
        model = Thinker(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert cfg.is_qwen3 and cfg.audio_token_id == 151675 and cfg.position_id_per_seconds == 13
    assert cfg.text.rope.mrope_section == [24, 20, 20] and cfg.text.rope.mrope_interleaved
    assert len(model.model.layers) == 48 and model.lm_head.weight.shape == (152064, 2048)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    total, active = count_parameters(model)
    print(f"\nQwen3-Omni-30B-A3B thinker: {total:,} parameters ({total / 1e9:.2f} B), "
          f"{active:,} active per generated token ({active / 1e9:.2f} B)")
    assert (total, active) == hand_count(raw)
    assert 31e9 <= total <= 35e9 and 2.8e9 <= active <= 3.6e9
    # transformers' own module tree of the same config, also on the meta device
    with torch.device("meta"):
        hf = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**raw["thinker_config"]))
    assert sum(p.numel() for p in hf.parameters()) == total
