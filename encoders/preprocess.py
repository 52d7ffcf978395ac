"""Turn decoded media into encoder inputs with the same numbers as the HF reference processors.

Design: three pure functions, each mirroring one reference component op for op so that results
are bit-identical (or within float rounding) without importing transformers at run time:

* `log_mel`       ~ `WhisperFeatureExtractor(feature_size=128)` torch path (Hann 400 / hop 160 STFT,
                    Slaney mel 0-8 kHz, drop last frame, log10, max-8 clamp, (x+4)/4), with the padding
                    rules of the Qwen2.5-Omni processor (pad/truncate to 30 s) and the Qwen3-Omni one
                    (no padding, no truncation).
* `image_patches` ~ `Qwen2VLImageProcessorPil` (smart_resize, PIL bicubic, rescale in float64, CLIP
                    normalisation in float32, image duplicated over the temporal patch, merge-block rows).
* `video_patches` ~ `Qwen2VLVideoProcessor` (needs torchvision, absent here): same resize rule per frame,
                    torchvision's CPU resize kernel, fused rescale+normalise, T padded by repeating the
                    last frame.
Budgets that must come from a checkpoint (patch sizes, pixel limits) have no defaults.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .media import MediaError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_SAMPLES_30S = 30 * SAMPLE_RATE        # Whisper's chunk: the Qwen2.5-Omni processor pads/truncates to it
MAX_ASPECT_RATIO = 200                  # smart_resize's limit (long side / short side)
MIN_IMAGE_SIDE = 4                      # our limit: smaller images carry no usable content


# ------------------------------------------------------------------------------------------- audio

def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(f >= 1000.0, log_part, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log_part = 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0))
    return np.where(m >= 15.0, log_part, lin)


def mel_filter_bank(n_mels: int = 128, n_fft: int = N_FFT, sr: int = SAMPLE_RATE,
                    f_min: float = 0.0, f_max: float = 8000.0) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float64 (n_fft//2+1, n_mels), as Whisper uses."""
    n_freq = n_fft // 2 + 1
    fft_hz = np.linspace(0, sr // 2, n_freq)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))  # (n_mels+2,)
    width = np.diff(edges)                                                       # (n_mels+1,)
    dist = edges[None, :] - fft_hz[:, None]                                      # (n_freq, n_mels+2)
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    tri = np.maximum(0.0, np.minimum(rising, falling))
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None, :]  # equal area per filter


@functools.lru_cache(maxsize=4)
def _mel_filters_f32(n_mels: int) -> torch.Tensor:
    return torch.from_numpy(mel_filter_bank(n_mels)).to(torch.float32)  # (201, n_mels)


def num_mel_frames(num_samples: int, padded_samples: int) -> int:
    """Valid feature frames of a clip of `num_samples` inside `padded_samples`, as Whisper's
    `attention_mask[::hop]` (minus its last entry when the padded length is not a hop multiple)."""
    return min(-(-num_samples // HOP_LENGTH), padded_samples // HOP_LENGTH)


def log_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 128, pad_to_samples: int | None = None, *,
            truncate: bool = True, pad_to_multiple_of: int | None = None, return_padded: bool = False
            ) -> tuple[torch.Tensor, int]:
    """Whisper log-mel features of one mono 16-kHz clip: (features (n_mels, L_valid) float32, L_valid).

    * Qwen2.5-Omni: `pad_to_samples=N_SAMPLES_30S` (the processor forces padding="max_length", so a
      clip is zero-padded to 30 s, or truncated to 30 s). The max-8 clamp is taken over the padded
      clip, exactly as there; only the valid frames are returned (`num_mel_frames`).
      `truncate=False` encodes a longer clip whole with the same formula; this deliberately differs
      from the reference, which would cut it at 30 s.
    * Qwen3-Omni: `pad_to_samples=None` (padding=True with a single clip pads to itself, truncation
      off): L_valid = n // 160. When the reference batches several clips it pads all to the longest;
      pass that length as `pad_to_samples` to reproduce a batch member exactly.
    `pad_to_multiple_of` rounds the padded length up like the feature extractor's argument.
    `return_padded=True` returns every frame of the padded clip, (n_mels, padded // 160), as the reference's
    `input_features` holds them (frames past L_valid are the log-mel of the zero padding, not zeros).
    """
    x = torch.as_tensor(audio).detach().to("cpu", torch.float32).reshape(-1)
    n = int(x.numel())
    if n == 0:
        raise MediaError("The audio is empty (zero length).")
    target = n if pad_to_samples is None else int(pad_to_samples)
    if pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if n > target and truncate:
        x, n = x[:target], target
    if n < target:
        x = F.pad(x, (0, target - n))
    padded = int(x.numel())
    valid = num_mel_frames(n, padded)
    if padded <= N_FFT // 2 or valid < 1:
        raise MediaError(f"The audio is too short ({1000 * n / SAMPLE_RATE:.1f} ms) to encode; "
                         "please provide at least 0.1 s of sound.")
    # Same ops and dtypes as WhisperFeatureExtractor._torch_extract_fbank_features.
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = (spec[..., :-1].abs() ** 2).contiguous()          # (201, padded//160)
    mel = _mel_filters_f32(n_mels).T @ power                   # (n_mels, padded//160)
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    feats = (logm + 4.0) / 4.0
    return (feats if return_padded else feats[:, :valid].contiguous()), valid


# ------------------------------------------------------------------------------------------ images

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, *,
                 min_side: int = MIN_IMAGE_SIDE) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect kept.

    Same rule as the HF/Qwen `smart_resize`. Raises `MediaError` (a ValueError) for aspect ratios
    above 200:1 (as the reference does) and, unlike the reference, for images with a side shorter
    than `min_side` pixels (the reference would blow a 1x1 image up to 56x56); pass `min_side=1`
    to follow the reference exactly.
    """
    short, long = min(height, width), max(height, width)
    if short < max(min_side, 1):
        raise MediaError(f"The image is only {width}x{height} pixels, too small to show anything; "
                         f"please use an image at least {max(min_side, 1)} pixels on each side.")
    if long / short > MAX_ASPECT_RATIO:
        raise MediaError(f"The image is {width}x{height} pixels (aspect ratio {long / short:.0f}:1); at most "
                         f"{MAX_ASPECT_RATIO}:1 is supported. Please crop it into pieces or pad it "
                         "to a less elongated shape.")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _patch_rows(x: torch.Tensor, temporal_patch_size: int, patch_size: int, merge_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C, H, W) float32, T % temporal_patch_size == 0 -> ((N, C*tp*P*P), grid_thw (1, 3) int64).

    Rows are ordered (t, block_h, block_w, in-block h, in-block w): the merge_size² patches the merger
    fuses are consecutive. Columns are (channel, temporal, py, px), as the Conv3d patch embed reads them.
    """
    t, c, hgt, wid = x.shape
    gt, gh, gw, m, p = t // temporal_patch_size, hgt // patch_size, wid // patch_size, merge_size, patch_size
    x = x.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, bh, bw, mh, mw, c, tp, py, px
    rows = x.reshape(gt * gh * gw, c * temporal_patch_size * p * p)
    return rows, torch.tensor([[gt, gh, gw]], dtype=torch.int64)


def image_patches(img: Image.Image, patch_size: int, merge_size: int, temporal_patch_size: int,
                  min_pixels: int, max_pixels: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image -> (pixel_values (N, 3*tp*P*P) float32, image_grid_thw (1, 3) int64), as
    `Qwen2VLImageProcessorPil`: PIL BICUBIC resize to `smart_resize(…, factor=P*merge)`, uint8 ->
    float64 × 1/255 -> float32, (x - mean) / std in float32, the image repeated `tp` times in time."""
    if img.mode != "RGB":
        raise ValueError(f"image_patches expects an RGB image (use media.load_image), got mode {img.mode}")
    h, w = smart_resize(img.height, img.width, patch_size * merge_size, min_pixels, max_pixels)
    a = np.asarray(img.resize((w, h), resample=Image.BICUBIC))                 # (h, w, 3) uint8
    a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)       # float32 throughout
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]     # (1, 3, h, w)
    x = x.expand(temporal_patch_size, -1, -1, -1)                              # (tp, 3, h, w)
    return _patch_rows(x, temporal_patch_size, patch_size, merge_size)


def video_frame_size(num_frames: int, height: int, width: int, factor: int, min_pixels: int,
                     max_pixels: int, temporal_patch_size: int = 2, max_video_tokens: int | None = 128000
                     ) -> tuple[int, int]:
    """Per-frame target (h, w) of a video: `smart_resize` with the video pixel budget.

    With `max_video_tokens` set, each frame's cap is also limited to an even share of a whole-video
    budget of 0.9·max_video_tokens tokens, floored at 1.05·min_pixels: the qwen-omni-utils /
    qwen-vl-utils rule the official demos use, and HF's `cap_pixels_per_frame=True` formula. It only
    bites above ~300 frames. `max_video_tokens=None` is HF 5.24's default (no total cap).
    """
    if max_video_tokens:
        total = int(max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, total * temporal_patch_size // num_frames), int(min_pixels * 1.05))
    return smart_resize(height, width, factor, min_pixels, max_pixels)


def video_patches(frames: np.ndarray | torch.Tensor, patch_size: int, merge_size: int,
                  temporal_patch_size: int, min_pixels: int, max_pixels: int, mean=OPENAI_CLIP_MEAN,
                  std=OPENAI_CLIP_STD, *, max_video_tokens: int | None = 128000, chunk: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (T, H, W, 3) -> (pixel_values_videos (N, 3*tp*P*P) float32, video_grid_thw (1, 3)).

    Follows `Qwen2VLVideoProcessor`: every frame resized to `video_frame_size`, rescale+normalise fused
    as (x - 255·mean) / (255·std) in float32, T padded to a multiple of `temporal_patch_size` by
    repeating the last frame, same row layout as images.

    Interpolation: the reference calls torchvision `resize(BICUBIC, antialias=True)` on uint8 tensors,
    which on CPU dispatches to torch's native uint8 antialiased bicubic kernel; we call that kernel
    directly (`F.interpolate` on uint8), so CPU results should be identical. torchvision is not
    installed here, so the tests check the formulas (sizes, grid, padding, layout, normalisation) and
    compare the resize against a float bicubic-antialias resize, not against the reference itself.
    """
    v = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != torch.uint8 or v.shape[0] == 0:
        raise ValueError(f"video_patches expects uint8 frames (T, H, W, 3), got {tuple(v.shape)} {v.dtype}")
    t, hgt, wid = v.shape[0], v.shape[1], v.shape[2]
    h, w = video_frame_size(t, hgt, wid, patch_size * merge_size, min_pixels, max_pixels,
                            temporal_patch_size, max_video_tokens)
    v = v.permute(0, 3, 1, 2)                                                  # (T, 3, H, W) uint8
    scale_mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    scale_std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    out = []
    for i in range(0, t, chunk):  # bounded memory: resize works frame by frame anyway
        part = v[i:i + chunk].contiguous()
        if (h, w) != (hgt, wid):  # torchvision returns the input untouched when the size is unchanged
            part = F.interpolate(part, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        out.append((part.to(torch.float32) - scale_mean) / scale_std)
    x = torch.cat(out)                                                         # (T, 3, h, w) float32
    if pad := -t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    return _patch_rows(x, temporal_patch_size, patch_size, merge_size)
