"""encoders.preprocess against the HF reference processors (transformers 5.24, imported only here):
WhisperFeatureExtractor(feature_size=128) for log-mel, Qwen2VLImageProcessorPil for images; the
video processor needs torchvision, so video is checked against its formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.media import MediaError, load_image
from encoders.preprocess import (N_SAMPLES_30S, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_patches, log_mel,
                                 mel_filter_bank, num_mel_frames, smart_resize, video_frame_size, video_patches)

transformers = pytest.importorskip("transformers")
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil, smart_resize as hf_smart_resize)

Q25_IMG = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
Q3_IMG = dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64, max_pixels=32 * 32 * 1280)


@pytest.fixture(scope="module")
def fe():
    return WhisperFeatureExtractor(feature_size=128)


def speechy(secs: float, seed: int = 0) -> np.ndarray:
    """A tone sweep plus noise with a loud and a quiet half (so the max-8 clamp matters)."""
    rng = np.random.default_rng(seed)
    n = int(round(secs * 16000))
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * rng.standard_normal(n)
    x[n // 2:] *= 0.001
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------ audio

def test_mel_filters_match(fe):
    ours = mel_filter_bank(128)
    ref = hf_mel_filter_bank(201, 128, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    assert ours.shape == (201, 128) and np.abs(ours - ref).max() < 1e-12


@pytest.mark.parametrize("secs", [3.0, 7.3001, 30.0, 40.0])
def test_log_mel_qwen25_padded_to_30s(fe, secs):
    x = speechy(secs)
    ref = fe(x, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    feats, n = log_mel(x, 128, N_SAMPLES_30S)
    assert n == int(ref["attention_mask"].sum()) == min(-(-x.size // 160), 3000)
    assert feats.shape == (128, n) and feats.dtype == torch.float32
    assert (feats - ref["input_features"][0, :, :n]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("secs", [3.0, 7.3001, 30.0, 40.0])
def test_log_mel_qwen3_unpadded(fe, secs):
    x = speechy(secs, seed=1)
    ref = fe(x, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
             return_tensors="pt")
    feats, n = log_mel(x, 128, None)
    assert n == int(ref["attention_mask"].sum()) == x.size // 160 == ref["input_features"].shape[-1]
    assert (feats - ref["input_features"][0]).abs().max().item() <= 1e-5


def test_log_mel_pad_to_multiple_of(fe):
    x = speechy(2.5)
    ref = fe(x, sampling_rate=16000, padding=True, truncation=False, pad_to_multiple_of=16000,
             return_attention_mask=True, return_tensors="pt")
    feats, n = log_mel(x, 128, None, pad_to_multiple_of=16000)
    assert ref["input_features"].shape[-1] == 300 and n == int(ref["attention_mask"].sum()) == 250
    assert (feats - ref["input_features"][0, :, :n]).abs().max().item() <= 1e-5


def test_log_mel_long_clip_whole_for_qwen25():
    x = speechy(40.0)
    whole, n = log_mel(x, 128, N_SAMPLES_30S, truncate=False)  # deliberate deviation: no 30-s cut
    assert n == 4000 and torch.equal(whole, log_mel(x, 128, None)[0])


def test_log_mel_max_clamp_over_padded_clip():
    x = speechy(3.0)
    padded, _ = log_mel(x, 128, N_SAMPLES_30S)
    alone, _ = log_mel(x, 128, None)
    assert padded.shape == alone.shape and not torch.equal(padded, alone)  # the padding changes the frames
    assert num_mel_frames(48000, 48000) == 300 and num_mel_frames(48001, 48001) == 300
    assert num_mel_frames(48001, N_SAMPLES_30S) == 301


def test_log_mel_too_short():
    with pytest.raises(MediaError, match="too short"):
        log_mel(np.zeros(100, np.float32), 128, None)
    with pytest.raises(MediaError, match="empty"):
        log_mel(np.zeros(0, np.float32), 128, N_SAMPLES_30S)
    assert log_mel(np.zeros(100, np.float32), 128, N_SAMPLES_30S)[1] == 1  # padded: fine


# ------------------------------------------------------------------------------------------ images

def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: exercises the bicubic filter like a real picture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def hf_image(img, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    proc = Qwen2VLImageProcessorPil(patch_size=cfg["patch_size"], merge_size=cfg["merge_size"],
                                    temporal_patch_size=cfg["temporal_patch_size"],
                                    size={"shortest_edge": cfg["min_pixels"], "longest_edge": cfg["max_pixels"]})
    out = proc(img, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("cfg", [Q25_IMG, Q3_IMG], ids=["patch14", "patch16"])
@pytest.mark.parametrize("wh", [(640, 480), (112, 168), (1000, 37), (33, 29), (1500, 1000)])
def test_image_patches_match_reference(cfg, wh):
    img = photo(*wh)
    ref_pv, ref_grid = hf_image(img, cfg)
    pv, grid = image_patches(img, **cfg)
    assert torch.equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape and pv.dtype == torch.float32
    assert (pv - ref_pv).abs().max().item() <= 1e-5


def test_image_probe_shapes():
    # the numbers the reference probe recorded for a 640x480 image
    assert image_patches(photo(640, 480), **Q25_IMG)[0].shape == (1564, 1176)
    assert image_patches(photo(640, 480), **Q3_IMG)[1].tolist() == [[1, 30, 40]]


def test_image_rgba_through_loader_matches_reference():
    a = np.array(photo(96, 64).convert("RGBA"))
    a[..., 3] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]
    rgba = Image.fromarray(a, "RGBA")
    ref_pv, _ = hf_image(rgba, Q25_IMG)  # the reference composites transparency on white too
    assert torch.equal(image_patches(load_image(rgba), **Q25_IMG)[0], ref_pv)


def test_image_small_budget_downscales():
    cfg = dict(Q25_IMG, max_pixels=256 * 28 * 28)
    ref_pv, ref_grid = hf_image(photo(1280, 720), cfg)
    pv, grid = image_patches(photo(1280, 720), **cfg)
    assert torch.equal(grid, ref_grid) and torch.equal(pv, ref_pv)


def test_smart_resize_matches_reference():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(4, 5000, size=(300, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        for factor, lo, hi in [(28, 3136, 12845056), (32, 65536, 16777216), (28, 128 * 784, 768 * 784)]:
            assert smart_resize(int(h), int(w), factor, lo, hi) == hf_smart_resize(int(h), int(w), factor, lo, hi)
    assert smart_resize(1, 1, 28, 3136, 12845056, min_side=1) == hf_smart_resize(1, 1, 28, 3136, 12845056)


# ------------------------------------------------------------------------------------------ video

V25 = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)


def test_video_two_identical_frames_equal_image_patches():
    # 336x448 needs no resize under the video budget: the only difference from the image path is
    # the fused (x - 255·mean) / (255·std) normalisation, so values agree to float rounding.
    img = photo(448, 336)
    frames = np.stack([np.asarray(img)] * 2)
    pv, grid = video_patches(frames, **V25)
    ref_pv, ref_grid = image_patches(img, **dict(V25))
    assert grid.tolist() == ref_grid.tolist() == [[1, 24, 32]]
    assert (pv - ref_pv).abs().max().item() <= 1e-5


def test_video_odd_frames_pad_with_last_and_layout():
    frames = np.stack([np.asarray(photo(448, 336, seed=s)) for s in range(3)])
    pv, grid = video_patches(frames, **V25)
    assert grid.tolist() == [[2, 24, 32]] and pv.shape == (2 * 24 * 32, 3 * 2 * 14 * 14)
    # row = (t, bh, bw, mh, mw); col = (c, tp, py, px). Rebuild row 0 of the second temporal group:
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float()
         - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255)
    second = torch.stack([x[2], x[2]], 1)[:, :, :14, :14]  # frame 2 repeated: (c, tp, 14, 14)
    assert torch.allclose(pv[24 * 32], second.reshape(-1), atol=1e-6)
    mh1 = torch.stack([x[0], x[1]], 1)[:, :, 14:28, :14]    # in-block row 1, col 0 -> 3rd row of block 0
    assert torch.allclose(pv[2], mh1.reshape(-1), atol=1e-6)


def test_video_resize_is_bicubic_antialias():
    # torch's uint8 kernel (what torchvision uses on CPU) clamps between its two 1-D passes, so on
    # noisy pictures it can differ from the float kernel by many levels at a few pixels; on a smooth
    # picture both agree to 1 grey level.
    yy, xx = np.mgrid[0:360, 0:640]
    smooth = np.stack([xx * 255 / 639, yy * 255 / 359, 128 + 100 * np.sin(xx / 30) * np.cos(yy / 20)], -1)
    frames = np.stack([smooth.astype(np.uint8)] * 2)
    h, w = video_frame_size(2, 360, 640, 28, V25["min_pixels"], V25["max_pixels"])
    assert (h, w) == smart_resize(360, 640, 28, V25["min_pixels"], V25["max_pixels"]) == (364, 644)
    pv, grid = video_patches(frames, **V25)
    assert grid.tolist() == [[1, h // 14, w // 14]]
    f = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(h, w), mode="bicubic",
                      align_corners=False, antialias=True).clamp(0, 255).round()
    f = (f - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255)
    ref = f.reshape(1, 2, 3, h // 28, 2, 14, w // 28, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(pv.shape)
    assert (pv - ref).abs().max().item() <= 1.0 / (255 * min(OPENAI_CLIP_STD)) + 1e-5  # <= 1 grey level


def test_video_total_pixel_budget():
    lo, hi = V25["min_pixels"], V25["max_pixels"]
    assert video_frame_size(100, 1080, 1920, 28, lo, hi) == smart_resize(1080, 1920, 28, lo, hi)
    cap = max(min(hi, int(128000 * 28 * 28 * 0.9) * 2 // 600), int(lo * 1.05))
    assert video_frame_size(600, 1080, 1920, 28, lo, hi) == smart_resize(1080, 1920, 28, lo, cap)
    assert video_frame_size(600, 1080, 1920, 28, lo, hi, max_video_tokens=None) == smart_resize(1080, 1920, 28, lo, hi)
    assert video_frame_size(768, 1080, 1920, 28, lo, hi)[0] < smart_resize(1080, 1920, 28, lo, hi)[0]
