"""Parity of our Qwen2.5-Omni audio and vision encoders with transformers 5.24 on tiny random weights.

Each HF module is built from a tiny config, every parameter (norm weights included) is re-drawn from a
seeded normal so that a wrong wire cannot hide behind near-identity init, and the state dict is loaded
strictly into ours. Comparisons are in float32. Inputs cover: audio with a short tail chunk, a 40 s audio
(20 chunks, beyond Whisper's 30 s) and a ragged two-audio batch; images whose merged grid is and is not
a multiple of the attention window, two images at once, and a 3-frame video.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
    Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniVisionEncoderConfig)
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder, Qwen2_5OmniVisionEncoder

from encoders.common import from_hf_dict
from encoders.qwen25_audio import Qwen25AudioConfig, Qwen25AudioEncoder, audio_output_lengths
from encoders.qwen25_vision import Qwen25VisionConfig, Qwen25VisionEncoder
from tests.encoder_parity import encoder_pair, max_diff

TOL = 1e-5


@pytest.fixture(scope="module")
def audio_pair():
    hf_cfg = Qwen2_5OmniAudioEncoderConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                           encoder_ffn_dim=128, num_mel_bins=128, max_source_positions=1500,
                                           n_window=100, output_dim=64)
    return encoder_pair(Qwen2_5OmniAudioEncoder, hf_cfg, Qwen25AudioEncoder, Qwen25AudioConfig, seed=0)


@pytest.fixture(scope="module")
def vision_pair():
    hf_cfg = Qwen2_5OmniVisionEncoderConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                            window_size=112, out_hidden_size=64, fullatt_block_indexes=[1, 3])
    return encoder_pair(Qwen2_5OmniVisionEncoder, hf_cfg, Qwen25VisionEncoder, Qwen25VisionConfig, seed=1)


def test_configs_parse_hf_dicts(audio_pair, vision_pair):
    _, audio = audio_pair
    _, vision = vision_pair
    assert audio.cfg.n_window == 100 and audio.cfg.extra["model_type"] == "qwen2_5_omni_audio_encoder"
    assert vision.cfg.fullatt_block_indexes == [1, 3] and vision.cfg.rope_theta == 10000.0
    with pytest.raises(ValueError, match="lacks required"):
        from_hf_dict(Qwen25VisionConfig, {"depth": 2})


# ------------------------------------------------------------------------------------------------ audio
@pytest.mark.parametrize("lens", [[300], [4000], [437, 1210]], ids=["3s", "40s", "two-audios"])
def test_audio_parity(audio_pair, lens):
    hf, ours = audio_pair
    feature_lens = torch.tensor(lens)
    feats = torch.randn(128, sum(lens), generator=torch.Generator().manual_seed(sum(lens)))
    with torch.no_grad():
        ref = hf(input_features=feats, feature_lens=feature_lens).last_hidden_state
        got = ours(feats, feature_lens)
    assert got.shape[0] == int(audio_output_lengths(feature_lens).sum())
    assert max_diff(got, ref) <= TOL


def test_audio_output_lengths():
    assert audio_output_lengths(torch.tensor([300, 3000, 4000, 1, 2, 3])).tolist() == [75, 750, 1000, 0, 0, 1]


def test_audio_rejects_bad_lengths(audio_pair):
    _, ours = audio_pair
    with pytest.raises(ValueError):
        ours(torch.randn(128, 100), torch.tensor([99]))
    with pytest.raises(ValueError):
        ours(torch.randn(80, 100), torch.tensor([100]))


# ------------------------------------------------------------------------------------------------ vision
def _processed_images(*sizes_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random RGB images through the stock Qwen2-VL image processor: (pixel_values, image_grid_thw)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes_hw]
    out = Qwen2VLImageProcessorPil()(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _vision_check(pair, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
    hf, ours = pair
    with torch.no_grad():
        ref = hf(pixel_values, grid_thw=grid_thw).pooler_output
        got = ours(pixel_values, grid_thw)
    assert got.shape == (pixel_values.shape[0] // 4, 64)
    assert max_diff(got, ref) <= TOL


@pytest.mark.parametrize("sizes", [[(112, 168)], [(480, 640)], [(112, 168), (480, 640)]],
                         ids=["112x168", "480x640", "two-images"])
def test_vision_images_parity(vision_pair, sizes):
    pixel_values, grid_thw = _processed_images(*sizes)
    _vision_check(vision_pair, pixel_values, grid_thw)


def test_vision_video_and_image_parity(vision_pair):
    # A 3-frame video (merged grid 6 x 10: partial windows both ways) packed after a small image.
    grid_thw = torch.tensor([[1, 8, 12], [3, 12, 20]])
    n_patches = int(grid_thw.prod(-1).sum())
    pixel_values = torch.randn(n_patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    _vision_check(vision_pair, pixel_values, grid_thw)


def test_vision_rejects_mismatched_rows(vision_pair):
    _, ours = vision_pair
    with pytest.raises(ValueError, match="do not match"):
        ours(torch.randn(60, 1176), torch.tensor([[1, 8, 8]]))


# ------------------------------------------------------------------------------------------------ bf16
def test_bf16_matches_hf_loaded_in_bf16(audio_pair, vision_pair, tmp_path):
    # from_pretrained(dtype=bf16) keeps HF's fixed tables (vision inv_freq, audio sinusoids) in float32,
    # which is what we do. (A bare `.to(bfloat16)` of the HF module would round its inv_freq to bf16.)
    feature_lens = torch.tensor([437, 1210])
    feats = torch.randn(128, int(feature_lens.sum()), generator=torch.Generator().manual_seed(7))
    pixel_values, grid_thw = _processed_images((112, 168), (480, 640))
    for (hf, ours), cls, inputs in (
        (audio_pair, Qwen2_5OmniAudioEncoder, (feats, feature_lens)),
        (vision_pair, Qwen2_5OmniVisionEncoder, (pixel_values, grid_thw)),
    ):
        hf.save_pretrained(tmp_path / cls.__name__)
        hf16 = cls.from_pretrained(tmp_path / cls.__name__, dtype=torch.bfloat16).eval()
        ours16 = type(ours)(ours.cfg).eval()
        ours16.load_state_dict(ours.state_dict())
        ours16.to(torch.bfloat16)
        with torch.no_grad():
            out = hf16(*inputs)
            ref = out.pooler_output if cls is Qwen2_5OmniVisionEncoder else out.last_hidden_state
            got = ours16(*inputs)
        assert got.dtype == torch.bfloat16
        assert max_diff(got.float(), ref.float()) <= TOL  # bit-exact on CPU today
