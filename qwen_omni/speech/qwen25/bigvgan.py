"""BigVGAN vocoder of Qwen2.5-Omni's token2wav: 80-bin log-mel at 100 frames/s -> 24 kHz waveform in [-1, 1].

Numerics follow transformers 5.24 `Qwen2_5OmniToken2WavBigVGANModel`:
* input processing: exp(log-mel) -> 20*log10(clamp(amp, 10^(-115/20))) - 20 dB -> linear map of
  [-115, 0] dB onto [-1, 1], clamped;
* conv_pre (k7) -> per upsample stage: ConvTranspose1d (output exactly `rate` x longer), then the mean of the
  stage's AMP blocks (one per resblock kernel size) -> anti-aliased SnakeBeta -> conv_post (k7) -> clamp.
* AMP block: for each dilation, x + conv2(act(conv1(act(x)))) where act is SnakeBeta applied at 2x sample
  rate between Kaiser-sinc up/down-sampling filters (replicate padding at the edges).
No weight norm: the released checkpoint stores plain conv weights.

The network is convolutional with a finite receptive field and no state, so it can vocode a long mel in
chunks: give each chunk `context_frames()` extra mel frames on both sides (fewer at the sequence ends, where
the edge padding is then the same as in one whole pass) and keep the samples of the chunk proper. The result
equals the whole decode up to float rounding (tests/test_speech25.py). `context_frames` is the exact
receptive field, derived from the layer structure (not measured).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..vocoder_layers import SnakeBeta
from .config import BigVGANConfig25

ACT_KERNEL = 12  # taps of the anti-aliasing up/down filters (reference default)


def kaiser_sinc(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """(1, 1, kernel_size) float32 Kaiser-windowed sinc low-pass filter, normalised to unit DC gain."""
    half = kernel_size // 2
    atten = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95  # Kaiser's attenuation estimate (dB)
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    t = (torch.arange(-half, half) + 0.5) if kernel_size % 2 == 0 else (torch.arange(kernel_size) - half)
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class AntiAliasedSnake(nn.Module):
    """Upsample x2 (Kaiser sinc) -> SnakeBeta -> downsample x2; length preserved. Key: `<name>.act.*`."""

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        k = ACT_KERNEL
        self.register_buffer("up_filter", kaiser_sinc(0.25, 0.3, k), persistent=False)
        self.register_buffer("down_filter", kaiser_sinc(0.25, 0.3, k), persistent=False)
        self.up_pad = k // 2 - 1  # replicate padding of the input, in input samples
        self.up_crop_left = self.up_pad * 2 + (k - 2) // 2
        self.up_crop_right = self.up_pad * 2 + (k - 2 + 1) // 2
        self.down_pad = (k // 2 - 1, k // 2)  # even kernel: one less on the left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        y = F.pad(x, (self.up_pad, self.up_pad), mode="replicate")
        y = 2 * F.conv_transpose1d(y, self.up_filter.expand(c, -1, -1), stride=2, groups=c)
        y = self.act(y[..., self.up_crop_left:-self.up_crop_right])  # (B, C, 2T)
        y = F.pad(y, self.down_pad, mode="replicate")
        return F.conv1d(y, self.down_filter.expand(c, -1, -1), stride=2, groups=c)  # (B, C, T)


class AMPBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)
        # checkpoint order interleaves them: activations[2i] before convs1[i], [2i+1] before convs2[i]
        self.activations = nn.ModuleList(AntiAliasedSnake(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + c2(self.activations[2 * i + 1](c1(self.activations[2 * i](x))))
        return x


class BigVGAN25(nn.Module):
    def __init__(self, cfg: BigVGANConfig25):
        super().__init__()
        self.cfg = cfg
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.mel_dim, ch, 7, 1, padding=3)
        # each upsampler sits alone in a ModuleList: the checkpoint names it `ups.N.0`
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(ch // 2 ** i, ch // 2 ** (i + 1), k, s, padding=(k - s) // 2)])
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            AMPBlock(ch // 2 ** (i + 1), k, d) for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        out_ch = ch // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnake(out_ch)
        self.conv_post = nn.Conv1d(out_ch, 1, 7, 1, padding=3, bias=False)

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.cfg.upsample_rates)

    @staticmethod
    def normalise_mel(log_mel: torch.Tensor) -> torch.Tensor:
        """Reference input processing, elementwise: log-mel -> dB (floor -115, minus 20) -> [-1, 1]."""
        floor = torch.exp(torch.tensor(-115 / 20.0 * math.log(10), device=log_mel.device, dtype=log_mel.dtype))
        db = 20 * torch.log10(torch.clamp(torch.exp(log_mel), min=floor)) - 20
        return torch.clamp(2 * ((db + 115) / 115) - 1, -1, 1)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """log_mel (B, mel_dim, T) float32 -> waveform (B, T * samples_per_frame) in [-1, 1]."""
        x = self.conv_pre(self.normalise_mel(log_mel))
        n = len(self.cfg.resblock_kernel_sizes)
        for i, (up,) in enumerate(self.ups):
            x = up(x)
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n
        x = self.conv_post(self.activation_post(x))
        return torch.clamp(x, -1.0, 1.0)[:, 0]

    def context_frames(self) -> int:
        """Mel frames of context each side that make a chunk's samples equal to the whole decode's.

        The exact receptive field, found by pushing the index interval that one input frame influences through
        every layer (for a conv with kernel k, dilation d, padding p: [a + p - (k-1)d, b + p]; a transposed conv
        with stride s: [s*a - p, s*b - p + k - 1]; the anti-aliased activation: [a - 5, b + 5] after its
        up/down pair; parallel AMP blocks and residuals: the union). 34 frames for the released vocoder; the
        influence beyond about 27 frames is below float32 resolution (measured with a perturbed frame).
        """
        c = self.cfg

        def conv(iv, k, d=1, p=None):
            p = (k * d - d) // 2 if p is None else p
            return iv[0] + p - (k - 1) * d, iv[1] + p

        def act(iv):  # x2 Kaiser upsample (12 taps, crop 15) then x2 downsample (12 taps, left pad 5)
            up = 2 * iv[0] - (ACT_KERNEL // 2 - 1), 2 * iv[1] + ACT_KERNEL // 2
            return -((ACT_KERNEL // 2 - up[0]) // 2), (up[1] + ACT_KERNEL // 2 - 1) // 2

        def amp(iv, k, dils):
            for d in dils:
                out = conv(act(conv(act(iv), k, d)), k, 1)
                iv = min(iv[0], out[0]), max(iv[1], out[1])
            return iv

        iv = conv((0, 0), 7, p=3)
        for s, k in zip(c.upsample_rates, c.upsample_kernel_sizes):
            iv = s * iv[0] - (k - s) // 2, s * iv[1] - (k - s) // 2 + k - 1
            ivs = [amp(iv, k2, d) for k2, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)]
            iv = min(v[0] for v in ivs), max(v[1] for v in ivs)
        iv = conv(act(iv), 7, p=3)
        spf = self.samples_per_frame
        return math.ceil(max(-iv[0], iv[1] - (spf - 1)) / spf)
