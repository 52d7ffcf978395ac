"""Parity of the Qwen3-Omni audio (AuT) and vision (Qwen3-VL) encoders with transformers 5.24, float32, CPU.

Tiny random-weight HF encoders (sizes of the reference probe's `tiny_q3_thinker_config`) are built, their
state dicts loaded strictly into ours, and outputs compared. Weights are re-drawn at unit-ish scale so that
activations are O(1) and an absolute tolerance is meaningful.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as hf_cfg
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_mod

from encoders.common import from_hf_dict
from encoders.qwen3_audio import Qwen3AudioConfig, Qwen3AudioEncoder, audio_output_lengths
from encoders.qwen3_vision import Qwen3VisionConfig, Qwen3VisionEncoder
from tests.encoder_parity import encoder_pair, max_diff
from tests.tiny_omni import Q3_AUDIO, Q3_VISION, part

TOL = 1e-5

AUDIO, VISION = part(Q3_AUDIO), part(Q3_VISION)  # the tiny Qwen3-Omni encoders every test builds


@pytest.fixture(scope="module")
def audio_pair():
    cfg = hf_cfg.Qwen3OmniMoeAudioEncoderConfig(**AUDIO)
    return encoder_pair(hf_mod.Qwen3OmniMoeAudioEncoder, cfg, Qwen3AudioEncoder, Qwen3AudioConfig, seed=0)


@pytest.fixture(scope="module")
def vision_pair():
    cfg = hf_cfg.Qwen3OmniMoeVisionEncoderConfig(**VISION)
    return encoder_pair(hf_mod.Qwen3OmniMoeVisionEncoder, cfg, Qwen3VisionEncoder, Qwen3VisionConfig, seed=1)


def test_config_requires_released_fields():
    with pytest.raises(ValueError, match="d_model"):
        from_hf_dict(Qwen3AudioConfig, {k: v for k, v in AUDIO.items() if k != "d_model"})
    cfg = from_hf_dict(Qwen3VisionConfig, {**VISION, "apply_vit_abs_pos_embed": True})
    assert cfg.extra == {"apply_vit_abs_pos_embed": True} and cfg.rope_theta == 10000.0


def test_audio_output_lengths_formula():
    lens = torch.tensor([1, 37, 99, 100, 101, 200, 300, 1000, 3000, 3999, 4000, 30017])
    assert torch.equal(audio_output_lengths(lens), hf_mod._get_feat_extract_output_lengths(lens))
    assert audio_output_lengths(torch.tensor([300, 3000])).tolist() == [39, 390]


@pytest.mark.parametrize("lens", [[300], [4000], [1730, 250], [37, 80], [100, 1000, 5]],
                         ids=["3s", "40s", "two-lengths", "two-short", "three"])
def test_audio_encoder_matches_hf(audio_pair, lens):
    hf, ours = audio_pair
    g = torch.Generator().manual_seed(sum(lens))
    feats = torch.randn(AUDIO["num_mel_bins"], sum(lens), generator=g)
    feature_lens = torch.tensor(lens)
    with torch.no_grad():
        ref = hf(input_features=feats, feature_lens=feature_lens).last_hidden_state
        out = ours(feats, feature_lens)
    assert out.shape == (int(audio_output_lengths(feature_lens).sum()), AUDIO["output_dim"])
    assert max_diff(out, ref) <= TOL


def test_audio_rejects_mismatched_lengths(audio_pair):
    _, ours = audio_pair
    with pytest.raises(ValueError):
        ours(torch.randn(AUDIO["num_mel_bins"], 300), torch.tensor([299]))


def _processor_images(sizes):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in sizes]
    out = Qwen2VLImageProcessorPil(patch_size=16)(images=images, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]


def _compare_vision(vision_pair, pixel_values, grid_thw):
    hf, ours = vision_pair
    with torch.no_grad():
        ref = hf(hidden_states=pixel_values, grid_thw=grid_thw)
        merged, deepstack = ours(pixel_values, grid_thw)
    n_tokens = int(grid_thw.prod(-1).sum()) // VISION["spatial_merge_size"] ** 2
    assert merged.shape == (n_tokens, VISION["out_hidden_size"])
    assert len(deepstack) == len(ref.deepstack_features) == len(VISION["deepstack_visual_indexes"])
    assert max_diff(merged, ref.pooler_output) <= TOL
    for ours_k, ref_k in zip(deepstack, ref.deepstack_features):
        assert max_diff(ours_k, ref_k) <= TOL


def test_vision_one_image_matches_hf(vision_pair):
    pixel_values, grid_thw = _processor_images([(128, 192)])
    assert grid_thw.tolist() == [[1, 8, 12]]
    _compare_vision(vision_pair, pixel_values, grid_thw)


def test_vision_two_images_matches_hf(vision_pair):
    pixel_values, grid_thw = _processor_images([(128, 192), (96, 64)])
    assert grid_thw.tolist() == [[1, 8, 12], [1, 6, 4]]
    _compare_vision(vision_pair, pixel_values, grid_thw)


def test_vision_video_and_image_match_hf(vision_pair):
    # Video grid t=3 (each temporal patch attends only within itself) packed after a minimal 2x2 image.
    grid_thw = torch.tensor([[1, 2, 2], [3, 4, 6]])
    g = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 16 * 16, generator=g)
    _compare_vision(vision_pair, pixel_values, grid_thw)


def test_vision_rejects_bad_shapes(vision_pair):
    _, ours = vision_pair
    with pytest.raises(ValueError):
        ours(torch.randn(47, 1536), torch.tensor([[1, 6, 8]]))
    with pytest.raises(ValueError):
        ours(torch.randn(9, 1536), torch.tensor([[1, 3, 3]]))


def test_varlen_attention_is_block_diagonal_attention():
    """Runs of equal-length blocks, an empty block and a lone block == one SDPA with a block-diagonal mask."""
    from encoders.common import varlen_attention

    g = torch.Generator().manual_seed(0)
    lens = [3, 3, 5, 0, 2, 2, 2, 4]
    cu = torch.tensor([0] + np.cumsum(lens).tolist())
    n = int(cu[-1])
    q, k, v = (torch.randn(n, 2, 8, generator=g) for _ in range(3))
    block = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = block[:, None] == block[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(varlen_attention(q, k, v, cu), ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="do not cover"):
        varlen_attention(q, k, v, cu[:-1])


def test_patch_embed_matmul_equals_its_convolution():
    """In float32 the patch embedding runs as a matmul; it must equal the Conv3d the checkpoints describe."""
    from encoders.common import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(3, 2, 4, 16, bias=True)
    x = torch.randn(10, 3 * 2 * 4 * 4)
    conv = pe.proj(x.view(-1, 3, 2, 4, 4)).view(10, -1)
    torch.testing.assert_close(pe(x), conv, atol=1e-5, rtol=1e-5)
