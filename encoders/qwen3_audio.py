"""Qwen3-Omni audio encoder ("AuT").

Design: log-mel frames of every audio are cut into chunks of 2*n_window frames (1 s; the last chunk of an
audio is shorter), and all chunks of all audios go through the front end as one zero-padded batch: three
stride-2 3x3 Conv2d + GELU over (mel, time), a bias-free `conv_out` to d_model, and a sinusoidal position
table that restarts in every chunk. Valid tokens are then packed to (sum_T, d_model) and run through
pre-LN Whisper-style layers whose attention is block-diagonal over windows of
`tokens_per_chunk * (n_window_infer // (2*n_window))` tokens per audio (104 ~ 8 s for the release), plus a
shorter remainder window. `ln_post -> proj1 -> act -> proj2` gives `output_dim` features.

Numerics that matter for parity: chunks are padded to the longest chunk *of the batch*, and the padded
region is not zero after the first conv (GELU(bias)), so the last valid token of a short tail chunk can see
it through the next conv. The reference behaves exactly this way, so we keep it.

Parameter names equal the checkpoint's `thinker.audio_tower.*` names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import ACTIVATIONS, AudioEncoderLayer, sinusoids


@dataclass
class Qwen3AudioConfig:
    """`audio_config` of a Qwen3-Omni-MoE thinker (HF `Qwen3OmniMoeAudioEncoderConfig` field names)."""

    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    n_window: int
    n_window_infer: int
    downsample_hidden_size: int
    output_dim: int
    max_source_positions: int = 1500
    conv_chunksize: int = 500
    activation_function: str = "gelu"
    scale_embedding: bool = False  # declared by HF but unused by its forward; kept for round trips
    extra: dict[str, Any] = field(default_factory=dict)


def _conv_len(n: torch.Tensor) -> torch.Tensor:
    """Output length of one k=3, s=2, p=1 convolution."""
    return (n - 1) // 2 + 1


def _conv3_len(n: torch.Tensor) -> torch.Tensor:
    return _conv_len(_conv_len(_conv_len(n)))


def audio_output_lengths(feature_lens: torch.Tensor, n_window: int = 50) -> torch.Tensor:
    """Encoder tokens per audio for `feature_lens` mel frames (HF `_get_feat_extract_output_lengths`).

    Each full chunk of 2*n_window frames gives conv3(2*n_window) tokens (13 for the release), the remainder
    chunk gives conv3(remainder) (0 for an empty remainder).
    """
    feature_lens = torch.as_tensor(feature_lens)
    chunk = 2 * n_window
    per_chunk = int(_conv3_len(torch.tensor(chunk)))
    return _conv3_len(feature_lens % chunk) + (feature_lens // chunk) * per_chunk


class Qwen3AudioEncoder(nn.Module):
    def __init__(self, cfg: Qwen3AudioConfig):
        super().__init__()
        if cfg.d_model % cfg.encoder_attention_heads:
            raise ValueError(f"d_model {cfg.d_model} not divisible by {cfg.encoder_attention_heads} heads")
        self.cfg = cfg
        c = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        freq_after_conv = int(_conv3_len(torch.tensor(cfg.num_mel_bins)))
        self.conv_out = nn.Linear(c * freq_after_conv, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(
            AudioEncoderLayer(cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim,
                              cfg.activation_function, k_bias=True)  # AuT: k_proj has a bias
            for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)
        self.act = ACTIVATIONS[cfg.activation_function]
        # Not a checkpoint tensor: persistent=False keeps strict loading of on-disk weights working.
        self.register_buffer("positional_embedding", sinusoids(cfg.max_source_positions, cfg.d_model),
                             persistent=False)

    def _chunk_lengths(self, feature_lens: torch.Tensor) -> torch.Tensor:
        """(num_chunks,) frame count of every chunk, audio after audio; only the last chunk of an audio is short."""
        chunk = 2 * self.cfg.n_window
        n_chunks = (feature_lens + chunk - 1) // chunk  # (n_audios,)
        audio_of_chunk = torch.repeat_interleave(torch.arange(len(feature_lens), device=feature_lens.device),
                                                 n_chunks)
        first = torch.repeat_interleave(n_chunks.cumsum(0) - n_chunks, n_chunks)
        k = torch.arange(int(n_chunks.sum()), device=feature_lens.device) - first  # chunk index inside its audio
        return (feature_lens[audio_of_chunk] - k * chunk).clamp(max=chunk)

    def _window_cu_seqlens(self, feature_lens: torch.Tensor, tokens_per_chunk: int) -> torch.Tensor:
        """Attention windows: per audio, full windows of `window` tokens then a remainder window."""
        window = tokens_per_chunk * (self.cfg.n_window_infer // (2 * self.cfg.n_window))
        tokens = audio_output_lengths(feature_lens, self.cfg.n_window)  # (n_audios,)
        full, rem = tokens // window, tokens % window
        n_win = full + (rem > 0).long()
        audio_of_win = torch.repeat_interleave(torch.arange(len(tokens), device=tokens.device), n_win)
        k = torch.arange(int(n_win.sum()), device=tokens.device) - torch.repeat_interleave(n_win.cumsum(0) - n_win,
                                                                                          n_win)
        lens = torch.where(k < full[audio_of_win], window, rem[audio_of_win])
        return F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """input_features: (num_mel_bins, sum_L) valid frames of all audios, concatenated; feature_lens: (n,).

        Returns (sum_T, output_dim) with T = audio_output_lengths(feature_lens) per audio, in input order.
        """
        cfg = self.cfg
        if input_features.dim() != 2 or input_features.shape[0] != cfg.num_mel_bins:
            raise ValueError(f"input_features must be ({cfg.num_mel_bins}, sum_L), got {tuple(input_features.shape)}")
        feature_lens = feature_lens.to(device=input_features.device, dtype=torch.long)
        if int(feature_lens.sum()) != input_features.shape[1]:
            raise ValueError(f"feature_lens sum to {int(feature_lens.sum())} but input has "
                             f"{input_features.shape[1]} frames")

        chunk_lens = self._chunk_lengths(feature_lens)  # (C,)
        max_len = int(chunk_lens.max())
        # Gather all chunks into a zero-padded batch (C, 1, mel, max_len) in one indexing op.
        starts = chunk_lens.cumsum(0) - chunk_lens
        offs = torch.arange(max_len, device=chunk_lens.device)
        valid = offs[None, :] < chunk_lens[:, None]  # (C, max_len)
        cols = (starts[:, None] + offs[None, :]).clamp(max=input_features.shape[1] - 1)
        frames = input_features[:, cols] * valid  # (mel, C, max_len)
        x = frames.permute(1, 0, 2).unsqueeze(1).to(self.conv2d1.weight.dtype)

        # Convolutions in groups of conv_chunksize chunks bound peak activation memory.
        outs = []
        for part in x.split(cfg.conv_chunksize, dim=0):
            h = F.gelu(self.conv2d1(part))
            h = F.gelu(self.conv2d2(h))
            outs.append(F.gelu(self.conv2d3(h)))
        h = torch.cat(outs, dim=0)  # (C, c, mel/8, t)
        n_chunks, ch, freq, t = h.shape
        h = self.conv_out(h.permute(0, 3, 1, 2).reshape(n_chunks, t, ch * freq))  # (C, t, d_model)
        h = h + self.positional_embedding[:t].to(h.dtype)  # positions restart in every chunk

        tok_lens = _conv3_len(chunk_lens)  # (C,) valid tokens per chunk
        keep = torch.arange(t, device=h.device)[None, :] < tok_lens[:, None]
        h = h[keep]  # (sum_T, d_model), chunk-major then time: audio order is preserved

        cu_seqlens = self._window_cu_seqlens(feature_lens, int(tok_lens.max()))
        for layer in self.layers:
            h = layer(h, cu_seqlens)
        return self.proj2(self.act(self.proj1(self.ln_post(h))))
