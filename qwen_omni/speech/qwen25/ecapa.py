"""ECAPA-TDNN speaker encoder of Qwen2.5-Omni's DiT: reference mel (B, T, mel) -> speaker vector (B, enc_dim).

Numerics follow transformers 5.24 `ECAPA_TimeDelayNet` (Desplanques et al. 2020, "ECAPA-TDNN"):
TDNN (conv + ReLU) -> SE-Res2Net blocks -> multi-layer feature aggregation (concat of the SE-Res2Net outputs,
then a TDNN) -> attentive statistics pooling (channel-wise attention over time, weighted mean and std) -> 1x1
conv. Every conv is `padding="same"` with reflect padding, as in the reference. Module names are the
checkpoint's (`blocks.N.tdnn1.conv`, `asp.tdnn.conv`, `fc`, ...).

The DiT feeds it the speaker's reference mel (and zeros for the classifier-free-guidance branch). Its output
does not depend on the codes or the ODE time, so token2wav computes it once per utterance.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DiTConfig25


def same_conv(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, kernel, dilation=dilation, padding="same", padding_mode="reflect")


class TDNN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = same_conv(cin, cout, kernel, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Res2Net(nn.Module):
    """Channels split in `scale` groups; group i (i >= 1) goes through a TDNN after adding group i-1's output."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(TDNN(channels // scale, channels // scale, kernel, dilation)
                                    for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, part in enumerate(torch.chunk(x, self.scale, dim=1)):
            if i == 0:
                y = part
            elif i == 1:
                y = self.blocks[0](part)
            else:
                y = self.blocks[i - 1](part + y)
            outs.append(y)
        return torch.cat(outs, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = same_conv(channels, se_channels, 1)
        self.conv2 = same_conv(se_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.conv1(x.mean(dim=2, keepdim=True)))  # (B, se, 1)
        return x * torch.sigmoid(self.conv2(s))


class SERes2NetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNN(cin, cout, 1, 1)
        self.res2net_block = Res2Net(cout, scale, kernel, dilation)
        self.tdnn2 = TDNN(cout, cout, 1, 1)
        self.se_block = SqueezeExcite(cout, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


class AttentiveStatsPool(nn.Module):
    """(B, C, T) -> (B, 2C, 1): attention-weighted mean and std; the attention sees the global mean/std too."""

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNN(channels * 3, attention_channels, 1, 1)
        self.conv = same_conv(attention_channels, channels, 1)

    @staticmethod
    def stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (w * x).sum(2)
        std = torch.sqrt((w * (x - mean.unsqueeze(2)).pow(2)).sum(2).clamp(1e-12))
        return mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-1]
        uniform = torch.ones(x.shape[0], 1, T, dtype=x.dtype, device=x.device) / T  # every frame is valid
        mean, std = self.stats(x, uniform)
        a = torch.cat([x, mean.unsqueeze(2).repeat(1, 1, T), std.unsqueeze(2).repeat(1, 1, T)], dim=1)
        a = torch.softmax(self.conv(torch.tanh(self.tdnn(a))), dim=2)
        mean, std = self.stats(x, a)
        return torch.cat((mean, std), dim=1).unsqueeze(2)


class ECAPA25(nn.Module):
    def __init__(self, cfg: DiTConfig25):
        super().__init__()
        ch, ks, ds = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        self.blocks = nn.ModuleList([TDNN(cfg.mel_dim, ch[0], ks[0], ds[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels,
                                              ks[i], ds[i]))
        self.mfa = TDNN(ch[-1], ch[-1], ks[-1], ds[-1])
        self.asp = AttentiveStatsPool(ch[-1], cfg.enc_attention_channels)
        self.fc = same_conv(ch[-1] * 2, cfg.enc_dim, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, T, mel_dim) -> (B, enc_dim)."""
        x = mel.transpose(1, 2)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1))  # aggregate the SE-Res2Net outputs (not the first TDNN)
        return self.fc(self.asp(x)).squeeze(-1)
