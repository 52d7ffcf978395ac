"""Qwen3-Omni Code2Wav: codec frames (num_quantizers codes at 12.5 Hz) -> 24 kHz waveform, whole or streamed.

Architecture (transformers 5.24 `Qwen3OmniMoeCode2Wav`; names are the checkpoint's minus `code2wav.`):
  embed(code + q * codebook_size) averaged over the quantizers -> pre_transformer (Qwen3-style layers without
  q/k norm, sliding-window causal attention, LayerScale on both residual branches) -> 2x [transposed conv
  (k = stride = 2) + ConvNeXt] -> causal conv -> 4 decoder blocks [SnakeBeta, transposed conv (k = 2r,
  stride r, r trimmed each side), 3 residual units (dilation 1/3/9)] -> SnakeBeta -> causal conv -> clamp.
  1920 samples per frame (8*5*4*3*2*2); the sample rate (24 kHz) is inferred, transformers never states it.

Causality. Everything is causal except each decoder block's transposed conv: with its trim, output sample t
reads inputs floor(t/r) and floor(t/r) + 1, so n frames give `output_length(n)` = n * 1920 - 555 samples
(real config), not n * 1920. Decoding any prefix of the codes therefore yields exactly a prefix of the
whole-clip waveform. transformers' `chunked_decode` drops those 555 trailing samples of every chunk; `stream`
instead holds them back until the next frames arrive, so its concatenated output equals `forward` exactly.

Streaming cost. Left context has two parts:
* the pre-transformer sees num_layers * (sliding_window - 1) frames back (8 * 71 = 568 frames = 45 s for the
  released model): instead of re-decoding them, `stream` keeps each layer's last window-1 keys/values, so it
  runs the transformer once per frame, exactly;
* the conv stack needs `conv_receptive_field` frames of transformer output before the first new sample
  (10 frames for the released model; 9 at the sample where `stream` resumes): those are re-run each chunk.
  `left_context=None` uses the exact minimum.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import RMSNorm

from ...models.layers import MLP
from ...models.rope import Rotary, apply_rotary
from ..vocoder_layers import SnakeBeta as PointwiseSnakeBeta
from .config import Code2WavConfig

SAMPLE_RATE = 24000


class CausalConv(nn.Module):
    """Stride-1 conv, left-padded with (kernel-1)*dilation zeros: output t reads inputs t-pad .. t."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, groups=groups)
        self.pad = (kernel - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))

    def first_input(self, t: int) -> int:
        return t - self.pad

    def out_len(self, n: int) -> int:
        return n


class CausalTransConv(nn.Module):
    """Transposed conv with kernel - stride samples trimmed from each end (none when kernel == stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, kernel, stride)
        self.kernel, self.stride, self.trim = kernel, stride, kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.trim:y.shape[-1] - self.trim]

    def first_input(self, t: int) -> int:
        # untrimmed u = t + trim is fed by inputs i with u - kernel < i * stride <= u
        return (t + self.trim - self.kernel) // self.stride + 1

    def out_len(self, n: int) -> int:
        return max(0, (n - 1) * self.stride + self.kernel - 2 * self.trim)


class SnakeBeta(PointwiseSnakeBeta):
    """The BigVGAN activation (pointwise), plus the receptive-field arithmetic the streaming decoder asks of
    every layer."""

    def first_input(self, t: int) -> int:
        return t

    def out_len(self, n: int) -> int:
        return n


class ConvNeXt(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))  # (B, T, C)
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)

    def first_input(self, t: int) -> int:
        return self.dwconv.first_input(t)

    def out_len(self, n: int) -> int:
        return n


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1, self.conv1 = SnakeBeta(dim), CausalConv(dim, dim, 7, dilation=dilation)
        self.act2, self.conv2 = SnakeBeta(dim), CausalConv(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))

    def first_input(self, t: int) -> int:
        return self.conv1.first_input(self.conv2.first_input(t))

    def out_len(self, n: int) -> int:
        return n


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(cin), CausalTransConv(cin, cout, 2 * rate, rate),
                                    *(ResidualUnit(cout, d) for d in (1, 3, 9))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.block:
            x = m(x)
        return x

    def first_input(self, t: int) -> int:
        for m in reversed(self.block):
            t = m.first_input(t)
        return t

    def out_len(self, n: int) -> int:
        for m in self.block:
            n = m.out_len(n)
        return n


class WindowAttention(nn.Module):
    """Causal attention over the last `sliding_window` positions (itself included); no q/k norm, no biases."""

    def __init__(self, cfg: Code2WavConfig, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, past, mask):
        """x (1, S, H); past: (k, v) (1, kv_heads, P, D) of the P positions before, or None; mask (S, P + S)."""
        B, S, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, S, self.heads, -1).transpose(1, 2), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, S, self.kv_heads, -1).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, S, self.kv_heads, -1).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1)), (k, v)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = WindowAttention(cfg, head_dim)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x, cos, sin, past, mask):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        x = x + self.self_attn_layer_scale.scale * a
        return x + self.mlp_layer_scale.scale * self.mlp(self.post_attention_layernorm(x)), kv


class PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        att = cfg.attention_config()
        self.window = cfg.sliding_window
        self.layers = nn.ModuleList(TransformerLayer(cfg, att.head_dim) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(att.head_dim, att.rope)

    def forward(self, x: torch.Tensor, start: int = 0, state: list | None = None) -> torch.Tensor:
        """x (1, S, H) frames start..start+S-1 -> normed (1, S, H).

        state: per-layer (k, v) of the frames before `start` (None entries at the beginning); updated in place
        to the last window-1 frames. Without state the S frames are the whole clip.
        """
        S = x.shape[1]
        past_len = state[0][0].shape[2] if state is not None and state[0] is not None else 0
        q_pos = torch.arange(start, start + S, device=x.device)
        k_pos = torch.arange(start - past_len, start + S, device=x.device)
        mask = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - self.window)  # (S, past + S)
        cos, sin = self.rotary(q_pos[None])
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, state[i] if state is not None else None, mask)
            if state is not None:
                state[i] = (k[:, :, -(self.window - 1):], v[:, :, -(self.window - 1):])
        return self.norm(x)


class Code2Wav3(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.samples_per_frame = cfg.samples_per_frame
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, cfg.hidden_size)
        offsets = torch.arange(cfg.num_quantizers).view(1, -1, 1) * cfg.codebook_size
        self.register_buffer("code_offset", offsets, persistent=False)
        self.pre_transformer = PreTransformer(cfg)
        H, D = cfg.hidden_size, cfg.decoder_dim
        self.upsample = nn.ModuleList(nn.ModuleList([CausalTransConv(H, H, r, r), ConvNeXt(H)])
                                      for r in cfg.upsampling_ratios)
        blocks = [DecoderBlock(D // 2 ** i, D // 2 ** (i + 1), r) for i, r in enumerate(cfg.upsample_rates)]
        out = D // 2 ** len(cfg.upsample_rates)
        self.decoder = nn.ModuleList([CausalConv(H, D, 7), *blocks, SnakeBeta(out), CausalConv(out, 1, 7)])

    def _conv_modules(self) -> list[nn.Module]:
        return [m for pair in self.upsample for m in pair] + list(self.decoder)

    # ---- geometry -----------------------------------------------------------------------------------------
    def output_length(self, frames: int) -> int:
        """Samples produced by `forward` for `frames` codec frames."""
        n = frames
        for m in self._conv_modules():
            n = m.out_len(n)
        return n

    def first_frame(self, sample: int) -> int:
        """Earliest frame of transformer output that output `sample` reads (negative: left zero padding)."""
        t = sample
        for m in reversed(self._conv_modules()):
            t = m.first_input(t)
        return t

    def context_frames(self, sample: int) -> int:
        """Frames of transformer output the conv stack needs before the frame holding `sample`."""
        return sample // self.samples_per_frame - self.first_frame(sample)

    @property
    def conv_receptive_field(self) -> int:
        """`context_frames`, worst case over the samples of a frame (10 for the released model; `stream`, which
        starts each chunk at `output_length(n)`, 555 samples before a frame ends, needs 9)."""
        spf, base = self.samples_per_frame, 1000
        return max(self.context_frames(o) for o in range(base * spf, (base + 1) * spf))

    @property
    def transformer_receptive_field(self) -> int:
        return self.cfg.num_hidden_layers * (self.cfg.sliding_window - 1)

    # ---- decoding -----------------------------------------------------------------------------------------
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, T) -> (B, T, H): mean over quantizers of their own embedding rows."""
        if codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"expected {self.cfg.num_quantizers} code groups, got {codes.shape[1]}")
        return self.code_embedding(codes.to(self.code_offset.device) + self.code_offset).mean(1)

    def convs(self, h: torch.Tensor) -> torch.Tensor:
        """Transformer output (B, T, H) -> waveform (B, 1, output_length(T)), clamped to [-1, 1]."""
        x = h.transpose(1, 2)
        for m in self._conv_modules():
            x = m(x)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Whole clip: codes (B, Q, T) -> (B, 1, output_length(T)) in the model dtype."""
        return self.convs(self.pre_transformer(self.embed(codes)))

    @torch.no_grad()
    def stream(self, frames: Iterable[torch.Tensor], chunk: int = 25, left_context: int | None = None,
               ) -> Iterator[torch.Tensor]:
        """Decode codes as they arrive; yield float32 24-kHz CPU audio (n,) concatenating to `forward`'s output.

        frames: (Q,) one frame, or (Q, n) several. Every `chunk` frames (and at the end) the new frames go through
        the transformer once (its sliding-window keys/values are kept), then the conv stack runs on them plus
        `left_context` earlier frames (None: the exact minimum, at most `conv_receptive_field`; fewer than that
        trades exactness for speed, like transformers' fixed 25). Samples that still need a future frame (the
        transposed convs look one input ahead) are held back until it arrives. Push-style: `Code2WavStream`.
        """
        s = Code2WavStream(self, left_context)
        for f in frames:
            s.push(f)
            if s.pending >= chunk and (out := s.decode()) is not None:
                yield out
        if (out := s.decode()) is not None:
            yield out


class Code2WavStream:
    """One utterance decoded incrementally: `push` frames as the talker makes them, `decode` when a chunk is
    wanted (the caller picks the chunk sizes, e.g. small first for latency, then larger for throughput)."""

    def __init__(self, net: Code2Wav3, left_context: int | None = None):
        self.net, self.left_context = net, left_context
        self.state: list = [None] * len(net.pre_transformer.layers)  # per-layer window keys/values
        self.hbuf: torch.Tensor | None = None  # (1, frames, H) transformer output from frame `hstart` on
        self.hstart = self.n = self.emitted = 0  # frames seen; samples emitted
        self.frames: list[torch.Tensor] = []  # pushed, not yet decoded: (Q, m) each
        self.pending = 0  # their frame count

    def push(self, frames: torch.Tensor) -> None:
        """frames: (Q,) or (Q, m) codes."""
        self.frames.append(frames.reshape(self.net.cfg.num_quantizers, -1).long())
        self.pending += self.frames[-1].shape[1]

    @torch.no_grad()
    def decode(self) -> torch.Tensor | None:
        """Audio (float32 CPU, 1-D) for everything pushed that no future frame can change; None if nothing new."""
        if not self.frames:
            return None
        net, spf = self.net, self.net.samples_per_frame
        codes = torch.cat(self.frames, dim=1)[None]  # (1, Q, m)
        self.frames, self.pending = [], 0
        h = net.pre_transformer(net.embed(codes), start=self.n, state=self.state)
        self.hbuf = h if self.hbuf is None else torch.cat([self.hbuf, h], dim=1)
        self.n += codes.shape[-1]
        end = net.output_length(self.n)
        if end <= self.emitted:
            return None
        first = (net.first_frame(self.emitted) if self.left_context is None
                 else self.emitted // spf - self.left_context)
        s = max(0, first)
        wav = net.convs(self.hbuf[:, s - self.hstart:])[0, 0]
        out = wav[self.emitted - s * spf:end - s * spf]
        self.hbuf, self.hstart, self.emitted = self.hbuf[:, s - self.hstart:], s, end
        return out.float().cpu()
