"""TMRoPE positions (qwen_omni.models.positions) compared with transformers 5.24 `get_rope_index`, for both families.

The HF reference models are tiny thinkers built from configs, as in /work/shared/reference/tiny_hf_probe.py.
`get_rope_index` reads only the config. Prompts are built with our placeholder helpers. The audio-in-video
layouts are checked against the processors' own `replace_video_with_audio_token`. HF gets audio as mel-frame
lengths, we get the token counts that HF's `_get_feat_extract_output_lengths` gives for them. Positions and
rope_deltas must match exactly, Qwen3's float positions included, and so must the deltas' dtype.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,  # noqa: E402
                          Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration)
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor  # noqa: E402
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (  # noqa: E402
    _get_feat_extract_output_lengths as q25_audio_tokens)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: E402
    _get_feat_extract_output_lengths as q3_audio_tokens)
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor  # noqa: E402

from qwen_omni.errors import InputError  # noqa: E402
from tests.tiny_omni import Q3_AUDIO, Q3_TEXT, Q3_VISION, part  # noqa: E402
from qwen_omni.models.positions import (RopeSpec, audio_in_video_tokens, audio_tokens, decode_positions,  # noqa: E402
                                 rope_index, vision_tokens)

VISION_BOS, VISION_EOS = 151652, 151653
Q3_AUDIO_PAD, Q3_AUDIO_BOS, Q3_AUDIO_EOS = 151675, 151669, 151670
PAD_ID = 0


def tiny_q25_thinker_config():
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=64),
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3]),
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_start_token_id=VISION_BOS, vision_end_token_id=VISION_EOS)


def tiny_q3_thinker_config():
    return Qwen3OmniMoeThinkerConfig(
        audio_config=part(Q3_AUDIO), vision_config=part(Q3_VISION), text_config=part(Q3_TEXT, vocab_size=1000),
        audio_token_id=Q3_AUDIO_PAD, audio_start_token_id=Q3_AUDIO_BOS, audio_end_token_id=Q3_AUDIO_EOS,
        vision_start_token_id=VISION_BOS, vision_end_token_id=VISION_EOS, position_id_per_seconds=13)


@pytest.fixture(scope="module", params=["q25", "q3"])
def fam(request):
    """One family: HF thinker (reference), our spec parsed from its config, mel frames -> audio tokens."""
    if request.param == "q25":
        cfg = tiny_q25_thinker_config()
        hf = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
        n_tokens = lambda frames: int(q25_audio_tokens(torch.tensor(frames)))  # noqa: E731
    else:
        cfg = tiny_q3_thinker_config()
        hf = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
        n_tokens = lambda frames: int(q3_audio_tokens(torch.tensor(frames), cfg.audio_config.n_window))  # noqa: E731
    return SimpleNamespace(name=request.param, hf=hf, spec=RopeSpec.from_thinker_config(cfg.to_dict()),
                           n_tokens=n_tokens)


class Prompt:
    """One prompt's ids plus its media, in the form a processor hands to the model."""

    def __init__(self, fam):
        self.fam, self.ids, self.images, self.videos, self.spg, self.frames = fam, [], [], [], [], []

    def text(self, n):
        self.ids += [11 + i % 50 for i in range(n)]
        return self

    def image(self, thw):
        self.ids += vision_tokens(self.fam.spec, thw)
        self.images.append(thw)
        return self

    def video(self, thw, spg):
        self.ids += vision_tokens(self.fam.spec, thw, video=True)
        self.videos.append(thw)
        self.spg.append(spg)
        return self

    def audio(self, frames):
        self.ids += audio_tokens(self.fam.spec, self.fam.n_tokens(frames))
        self.frames.append(frames)
        return self

    def audio_video(self, thw, spg, frames):
        self.ids += audio_in_video_tokens(self.fam.spec, thw, spg, self.fam.n_tokens(frames))
        self.videos.append(thw)
        self.spg.append(spg)
        self.frames.append(frames)
        return self


def compare(fam, prompts, use_audio_in_video=False, spg_dtype=torch.float32):
    """Left-pad the prompts into one batch, run HF and ours, and demand identical results."""
    S = max(len(p.ids) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (S - len(p.ids)) + p.ids for p in prompts])
    mask = torch.tensor([[0] * (S - len(p.ids)) + [1] * len(p.ids) for p in prompts])
    cat = lambda key: [x for p in prompts for x in getattr(p, key)]  # noqa: E731
    images = torch.tensor(cat("images")) if cat("images") else None
    videos = torch.tensor(cat("videos")) if cat("videos") else None
    spg = torch.tensor(cat("spg"), dtype=spg_dtype) if cat("spg") else None
    frames = torch.tensor(cat("frames")) if cat("frames") else None

    ref_pos, ref_delta = fam.hf.get_rope_index(ids, image_grid_thw=images, video_grid_thw=videos, attention_mask=mask,
                                               use_audio_in_video=use_audio_in_video, audio_seqlens=frames,
                                               second_per_grids=spg)
    pos, delta = rope_index(ids, fam.spec, image_grid_thw=images, video_grid_thw=videos, video_second_per_grid=spg,
                            audio_lengths=[fam.n_tokens(f) for f in cat("frames")],
                            use_audio_in_video=use_audio_in_video, attention_mask=mask)
    assert pos.dtype == torch.float32 and pos.shape == ref_pos.shape
    bad = (pos != ref_pos.float()).nonzero()
    assert len(bad) == 0, f"{len(bad)} positions differ, first at {bad[0].tolist()}"
    assert delta.dtype == ref_delta.dtype and torch.equal(delta, ref_delta), (delta, ref_delta)
    return pos, delta


# -- position parity ----------------------------------------------------------------------------------------

def test_text_only(fam):
    compare(fam, [Prompt(fam).text(7)])


def test_one_image(fam):
    compare(fam, [Prompt(fam).text(3).image((1, 4, 6)).text(4)])


def test_two_images_of_different_grids(fam):
    compare(fam, [Prompt(fam).text(2).image((1, 4, 4)).text(2).image((1, 6, 10)).text(3)])


def test_image_first_and_last(fam):
    compare(fam, [Prompt(fam).image((1, 2, 4)).text(1).image((1, 4, 2))])


def test_audio_only(fam):
    compare(fam, [Prompt(fam).text(3).audio(300).text(2)])  # HF's text-only path: no grids given


def test_image_audio_text(fam):
    compare(fam, [Prompt(fam).text(3).image((1, 8, 12)).audio(300).text(8)])


@pytest.mark.parametrize("spg", [0.5, 1.0, 0.667, 2 / 3, 2.0])
def test_video_without_audio(fam, spg):
    compare(fam, [Prompt(fam).text(2).video((1, 4, 4), spg).text(1).video((3, 4, 6), spg)
                  .text(2).video((5, 8, 4), spg).text(3)])


def test_video_seconds_per_grid_given_as_float64(fam):
    compare(fam, [Prompt(fam).text(2).video((7, 4, 4), 2 / 3).text(3)], spg_dtype=torch.float64)


@pytest.mark.parametrize("thw, spg, frames", [
    ((4, 4, 4), 1.0, 400),   # audio as long as the video
    ((4, 4, 4), 1.0, 900),   # audio longer than the video
    ((4, 4, 4), 1.0, 150),   # audio shorter: the video's tail is the last piece
    ((6, 4, 6), 0.667, 520),  # fractional time per grid
    ((3, 4, 4), 4.0, 1000),  # 4 s per grid: the Qwen2.5 chunk cut advances one chunk per token
    ((1, 40, 40), 2.0, 30),  # one big frame, little audio: the EOS comes from the audio piece alone
])
def test_audio_in_video(fam, thw, spg, frames):
    pos, _ = compare(fam, [Prompt(fam).text(3).audio_video(thw, spg, frames).text(4)], use_audio_in_video=True)
    if thw == (1, 40, 40):  # HF quirk reproduced: positions after the block overlap the frame's W range
        assert pos[0, 0, -4] < pos[2, 0].max()


def test_audio_in_video_with_other_media(fam):
    compare(fam, [Prompt(fam).text(2).image((1, 4, 4)).audio(200).text(1).audio_video((2, 4, 4), 1.0, 300)
                  .text(2).audio(100).text(1)], use_audio_in_video=True)


def test_two_turns_with_media(fam):
    p = Prompt(fam).text(5).image((1, 6, 4)).text(6).text(9)  # user turn, assistant reply
    p.text(4).video((3, 4, 4), 2 / 3).audio(250).text(5)  # second user turn, generation prompt
    compare(fam, [p])


def test_batch_with_left_padding(fam):
    short = Prompt(fam).text(2).image((1, 4, 4)).text(2)
    long = Prompt(fam).text(3).video((3, 4, 8), 0.667).text(2).audio(300).text(2).image((1, 6, 6)).text(1)
    compare(fam, [short, long])
    compare(fam, [long, Prompt(fam).text(9)])  # a text-only row in a media batch


def test_batch_with_left_padding_av(fam):
    compare(fam, [Prompt(fam).text(2).audio_video((2, 4, 4), 1.0, 200).text(1),
                  Prompt(fam).text(1).image((1, 4, 4)).audio_video((4, 4, 4), 0.5, 700).text(3)],
            use_audio_in_video=True)


def test_text_batch_with_left_padding(fam):
    compare(fam, [Prompt(fam).text(6), Prompt(fam).text(3), Prompt(fam).text(1)])  # a 1-token row: delta 1 in HF


# -- decoding ----------------------------------------------------------------------------------------------

class _Cache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


def test_decode_positions(fam):
    """HF decodes at cache position + rope_delta: no padding (no mask), and left padding (full mask)."""
    prompts = [Prompt(fam).text(2).video((3, 4, 4), 0.667).text(2), Prompt(fam).text(3).image((1, 4, 8)).text(1)]
    pos, delta = compare(fam, prompts)
    S, lengths = pos.shape[-1], torch.tensor([len(p.ids) for p in prompts])
    model = fam.hf.model
    model.rope_deltas = delta
    embeds = torch.zeros(2, 1, 4)
    for step in range(3):
        # Unpadded view: every row caches S + step tokens.
        ref = model.compute_3d_position_ids(input_ids=None, image_grid_thw=None, video_grid_thw=None,
                                            inputs_embeds=embeds, attention_mask=None, cache=_Cache(S + step))
        assert torch.equal(decode_positions(torch.full((2,), S + step), delta), ref.float())
        # Left-padded batch: HF counts the mask's ones; our rows cache only their real tokens.
        mask = torch.cat([torch.arange(S) >= S - lengths.view(-1, 1), torch.ones(2, step + 1, dtype=torch.bool)],
                         dim=1).long()
        ref = model.compute_3d_position_ids(input_ids=None, image_grid_thw=None, video_grid_thw=None,
                                            inputs_embeds=embeds, attention_mask=mask, cache=_Cache(S + step))
        assert torch.equal(decode_positions(lengths + step, delta), ref[..., -1:].float())
    # generate() continues from the last prompt position + 1; the same when the prompt ends in text
    assert torch.equal(decode_positions(lengths, delta), pos[..., -1:] + 1)


# -- processor layouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("thw, spg, n_audio", [((4, 4, 4), 1.0, 100), ((4, 4, 4), 1.0, 30), ((3, 4, 4), 4.0, 250),
                                               ((6, 4, 6), 0.667, 130), ((5, 4, 4), 2 / 3, 77), ((1, 8, 8), 2.0, 0)])
def test_audio_in_video_layout_matches_processor(fam, thw, spg, n_audio):
    """Our block equals `<|vision_bos|>` + processor replacement of `<|VIDEO|>` + `<|vision_eos|>`."""
    spec = fam.spec
    proc_cls = Qwen2_5OmniProcessor if fam.name == "q25" else Qwen3OmniMoeProcessor
    # Only the attributes replace_video_with_audio_token reads; the method is the processor's own code.
    stub = SimpleNamespace(video_processor=SimpleNamespace(merge_size=spec.spatial_merge_size),
                           audio_bos_token="<ab>", audio_eos_token="<ae>", video_token="<V>", audio_token="<A>")
    stub.get_chunked_index = lambda idx, per: proc_cls.get_chunked_index(stub, idx, per)
    text = proc_cls.replace_video_with_audio_token(
        stub, {"video_grid_thw": np.array([thw]), "video_second_per_grid": [spg]}, 0,
        {"num_audio_tokens": np.array([n_audio])}, 0,
        position_id_per_seconds=spec.position_id_per_seconds, seconds_per_chunk=2.0)
    names = {"<ab>": spec.audio_start_token_id, "<ae>": spec.audio_end_token_id,
             "<V>": spec.video_token_id, "<A>": spec.audio_token_id}
    expected = [VISION_BOS] + [names[t] for t in re.findall(r"<\w+>", text)] + [VISION_EOS]
    assert audio_in_video_tokens(spec, thw, spg, n_audio) == expected


# -- errors ------------------------------------------------------------------------------------------------

def test_placeholder_count_mismatch_is_an_input_error(fam):
    p = Prompt(fam).text(2).image((1, 4, 4)).text(1)
    with pytest.raises(InputError):
        rope_index(torch.tensor([p.ids]), fam.spec, image_grid_thw=torch.tensor([[1, 4, 8]]))
    p = Prompt(fam).text(2).audio_video((2, 4, 4), 1.0, 200).text(1)
    with pytest.raises(InputError):
        rope_index(torch.tensor([p.ids]), fam.spec, video_grid_thw=torch.tensor([[2, 4, 4]]),
                   video_second_per_grid=[1.0], audio_lengths=[fam.n_tokens(200)], use_audio_in_video=False)
