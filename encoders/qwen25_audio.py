"""Qwen2.5-Omni audio encoder (Whisper-style), loadable from `thinker.audio_tower.*` checkpoint weights.

Design: the caller passes every audio's valid log-mel frames concatenated along time, plus their lengths.
All audios are cut into chunks of `2 * n_window` frames (2 s; the last chunk of an audio may be shorter)
and every chunk of every audio runs through the conv front end as one zero-padded batch. After the convs
the padding is dropped and the valid frames are packed into one sequence; each transformer layer then
attends block-diagonally inside its chunk (`varlen_attention`), and the sinusoidal position restarts at 0
in every chunk. At the end each audio's frames are averaged in pairs (25 tokens/s) and projected to the
decoder width. Index bookkeeping is vectorised: no Python loop runs over frames or chunks.

Reference numerics (transformers `Qwen2_5OmniAudioEncoder`): the conv GELUs are exact-erf GELU whatever
`activation_function` says (only the FFN uses it); `scale_embedding` is declared but never applied;
`audio_bos_eos_token` is loaded but unused in forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import AudioEncoderLayer, sinusoids

@dataclass
class Qwen25AudioConfig:
    """`thinker_config.audio_config` of a Qwen2.5-Omni checkpoint (HF field names).

    Sizes are required; the structural constants default to the values every released checkpoint uses.
    """
    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    output_dim: int
    max_source_positions: int = 1500
    n_window: int = 100
    activation_function: str = "gelu"
    scale_embedding: bool = False  # declared by the reference config, unused by its forward
    extra: dict[str, Any] = field(default_factory=dict)


def audio_output_lengths(feature_lens: torch.Tensor) -> torch.Tensor:
    """Encoder tokens per audio for `feature_lens` valid mel frames: stride-2 conv, then pair pooling."""
    after_conv = (feature_lens - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _segment_offsets(lens: torch.Tensor) -> torch.Tensor:
    """Start offset of each segment in a packed layout: (n,) -> (n,)."""
    return torch.cumsum(lens, 0) - lens


def _local_index(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a packing of segments with lengths `lens`: (segment id, index inside segment) of every element."""
    seg = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    local = torch.arange(int(lens.sum()), device=lens.device) - _segment_offsets(lens)[seg]
    return seg, local


class Qwen25AudioEncoder(nn.Module):
    """Log-mel frames -> audio embeddings in the decoder's width (see module docstring)."""

    def __init__(self, cfg: Qwen25AudioConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Loaded from checkpoints (strict load) but never used by the forward pass.
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList(
            AudioEncoderLayer(cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim,
                              cfg.activation_function, k_bias=False)  # Whisper: k_proj without bias
            for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)
        # Fixed table, not in checkpoints: non-persistent so a strict load of HF weights matches.
        self.register_buffer("positional_embedding", sinusoids(cfg.max_source_positions, d), persistent=False)

    def _chunk(self, features: torch.Tensor, feature_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mel, sum_L) packed frames -> zero-padded chunks (n_chunks, mel, max_chunk_len) and their lengths."""
        win = 2 * self.cfg.n_window
        n_chunks = (feature_lens + win - 1) // win  # (n_audios,)
        chunk_audio, chunk_rank = _local_index(n_chunks)
        chunk_lens = (feature_lens[chunk_audio] - chunk_rank * win).clamp(max=win)  # (n_chunks,)
        # Every frame's (chunk, position in chunk), then one scatter builds the padded batch.
        frame_audio, frame_local = _local_index(feature_lens)
        frame_chunk = _segment_offsets(n_chunks)[frame_audio] + frame_local // win
        padded = features.new_zeros(len(chunk_lens), int(chunk_lens.max()), features.shape[0])
        padded[frame_chunk, frame_local % win] = features.T
        return padded.transpose(1, 2), chunk_lens

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """input_features: (num_mel_bins, sum_L); feature_lens: (n_audios,) long -> (sum_T, output_dim)."""
        if input_features.dim() != 2 or input_features.shape[0] != self.cfg.num_mel_bins:
            raise ValueError(f"input_features must be (num_mel_bins={self.cfg.num_mel_bins}, frames), "
                             f"got {tuple(input_features.shape)}")
        feature_lens = feature_lens.to(device=input_features.device, dtype=torch.long)
        lens_ok = feature_lens.dim() == 1 and bool((feature_lens > 0).all())
        if not lens_ok or int(feature_lens.sum()) != input_features.shape[1]:
            raise ValueError(f"feature_lens {feature_lens.tolist()} must be positive and sum to the "
                             f"{input_features.shape[1]} frames of input_features")
        x, chunk_lens = self._chunk(input_features.to(self.conv1.weight.dtype), feature_lens)

        # Front end on all chunks at once; conv1 output is re-zeroed past each chunk's end so conv2 sees
        # the same zero padding a standalone chunk would.
        frame_ok = torch.arange(x.shape[2], device=x.device) < chunk_lens[:, None]  # (C, max_len)
        x = F.gelu(self.conv1(x)) * frame_ok[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (C, max_len', d)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)  # positions restart per chunk

        # Drop padding and pack: (sum over chunks of valid frames, d), chunk after chunk.
        conv_lens = (chunk_lens - 1) // 2 + 1
        x = x[torch.arange(x.shape[1], device=x.device) < conv_lens[:, None]]
        cu_seqlens = F.pad(torch.cumsum(conv_lens, 0), (1, 0))
        for layer in self.layers:
            x = layer(x, cu_seqlens)

        # Average consecutive pairs inside each audio (a trailing odd frame is dropped). Chunks hold an even
        # number of frames, so an audio's post-conv length is (L-1)//2+1 and its frames stay contiguous.
        conv_audio_lens = (feature_lens - 1) // 2 + 1
        out_lens = audio_output_lengths(feature_lens)
        out_audio, out_rank = _local_index(out_lens)
        first = _segment_offsets(conv_audio_lens)[out_audio] + 2 * out_rank
        x = (x[first] + x[first + 1]) / 2
        return self.proj(self.ln_post(x))
