"""Layers both families' vocoders share (BigVGAN in Qwen2.5's token2wav, Code2Wav in Qwen3), so that neither
family's file imports the other's.
"""
from __future__ import annotations

import torch
from torch import nn


class SnakeBeta(nn.Module):
    """x + sin^2(x * e^alpha) / e^beta, per channel; x: (B, C, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.alpha[None, :, None])
        beta = torch.exp(self.beta[None, :, None])
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)
