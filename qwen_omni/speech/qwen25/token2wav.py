"""Qwen2.5-Omni token2wav: talker codec codes -> mel (DiT flow matching) -> 24 kHz waveform (BigVGAN).

DiT, as transformers 5.24 `Qwen2_5OmniToken2WavDiTModel` computes it:
* every code becomes `repeats` (2) mel frames at 100 frames/s; frame input = proj(cat(x_t (mel), ECAPA(ref
  mel), codec embedding, speaker x-vector));
* 22 pre-norm blocks with adaptive LayerNorm-zero modulation by the ODE time embedding;
* attention quirk 1: only head 0 gets RoPE, in the checkpoint's interleaved layout (pairs (x0,x1), (x2,x3), ...),
  done as the reference does: de-interleave head 0 of q and k, then half-split rotation;
* attention quirk 2 (block mask): frames are grouped into blocks of `block_size` (24); frame i may attend frame
  j iff -back <= block(j) - block(i) <= ahead, where a layer has back = 1 if listed in `look_backward_layers`
  ((0, 20) released) and ahead = 1 if in `look_ahead_layers` ((10,)); otherwise only its own block;
* classifier-free guidance by batch doubling: the null branch zeroes the x-vector and the reference mel and
  replaces every code by code 0; v = v_c + (v_c - v_null) * guidance_scale;
* sampler: 3/8-rule Runge-Kutta on the time grid linspace(0, 1, num_steps) bent by
  t + sway * (cos(pi t / 2) - 1 + t); the initial noise is an explicit input (`noise`), drawn from the global
  RNG like the reference when not given, so both can share it.

Streaming (`token2wav_stream25.stream`): the reference has no streaming or chunked API in
5.24 (it decodes after the talker finishes). One DiT evaluation is block-local (output block b depends on input
blocks b-2 .. b+1 with the released layer lists), but the sampler chains 4 * (num_steps - 1) = 36 evaluations,
so the final mel of block b depends on codes up to 36 blocks (432 codes, 8.6 s) ahead. The exact stream is a
wavefront over the 36 evaluations that emits block b once that look-ahead has arrived (equal to the whole decode
up to float rounding); the low-latency stream runs the whole ODE on overlapping windows and differs at the seams.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ...models.config import RopeConfig
from ...models.rope import Rotary, apply_rotary
from .bigvgan import BigVGAN25
from .config import DiTConfig25, Token2WavConfig25
from .ecapa import ECAPA25

SAMPLE_RATE = 24000


class TimestepEmbedding(nn.Module):
    """ODE time t (B,) -> (B, dim): sinusoids of 1000 t (256 channels) -> Linear, SiLU, Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.ModuleList([nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        angles = 1000 * t.unsqueeze(1) * freqs.unsqueeze(0)
        h = torch.cat((angles.sin(), angles.cos()), dim=-1).type_as(t)
        for layer in self.time_mlp:
            h = layer(h)
        return h


class CodecEmbedding(nn.Module):
    def __init__(self, num_embeds: int, dim: int, repeats: int):
        super().__init__()
        self.repeats = repeats
        self.codec_embed = nn.Embedding(num_embeds + 1, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) -> (B, N * repeats, dim)."""
        return torch.repeat_interleave(self.codec_embed(codes), self.repeats, dim=1)


class InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig25):
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.enc_emb_dim + cfg.emb_dim, cfg.hidden_size)
        self.spk_encoder = ECAPA25(cfg)


class AdaNormZero(nn.Module):
    """LayerNorm (no affine) modulated by the time embedding; `n` = 6 (block) or 2 (final) modulation vectors."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * n)
        self.n = n

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor):
        mods = torch.chunk(self.linear(F.silu(t_emb)), self.n, dim=1)  # n x (B, dim)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        if self.n == 2:  # final: (scale, shift)
            scale, shift = mods
            return h * (1 + scale)[:, None, :] + shift[:, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        return h * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa, shift_mlp, scale_mlp, gate_mlp


class DiTAttention(nn.Module):
    def __init__(self, cfg: DiTConfig25):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        inner = cfg.num_attention_heads * cfg.head_dim
        self.to_q = nn.Linear(cfg.hidden_size, inner)
        self.to_k = nn.Linear(cfg.hidden_size, inner)
        self.to_v = nn.Linear(cfg.hidden_size, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, cfg.hidden_size), nn.Identity()])  # [1] was dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for p in (self.to_q, self.to_k, self.to_v))
        # head 0 only: interleaved RoPE = de-interleave (x0, x2, ..., x1, x3, ...) then the half-split rotation
        q0, k0 = (torch.cat((h[:, :1, :, 0::2], h[:, :1, :, 1::2]), dim=-1) for h in (q, k))
        q = torch.cat([apply_rotary(q0, cos, sin), q[:, 1:]], dim=1)
        k = torch.cat([apply_rotary(k0, cos, sin), k[:, 1:]], dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.to_out[0](o.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        # indices as in the checkpoint (`ff.ff.0`, `ff.ff.3`); [2] was dropout
        self.ff = nn.ModuleList([nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh"), nn.Identity(),
                                 nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.ff:
            x = layer(x)
        return x


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig25, ahead: int, back: int):
        super().__init__()
        self.ahead, self.back = ahead, back
        self.attn_norm = AdaNormZero(cfg.hidden_size, 6)
        self.attn = DiTAttention(cfg)
        self.ff = FeedForward(cfg.hidden_size, cfg.ff_mult)

    def forward(self, x, t_emb, cos, sin, block_diff):
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, t_emb)
        mask = (block_diff >= -float(self.back)) & (block_diff <= float(self.ahead))  # (T, T)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, cos, sin, mask)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(h)


class DiT25(nn.Module):
    def __init__(self, cfg: DiTConfig25):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.hidden_size)
        self.text_embed = CodecEmbedding(cfg.num_embeds, cfg.emb_dim, cfg.repeats)
        self.input_embed = InputEmbedding(cfg)
        self.rotary = Rotary(cfg.head_dim, RopeConfig(rope_theta=cfg.rope_theta))
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg, int(i in cfg.look_ahead_layers), int(i in cfg.look_backward_layers))
            for i in range(cfg.num_hidden_layers))
        self.norm_out = AdaNormZero(cfg.hidden_size, 2)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.mel_dim)

    @property
    def reach(self) -> tuple[int, int]:
        """(blocks behind, blocks ahead) that one evaluation's output block can depend on."""
        return len(set(self.cfg.look_backward_layers)), len(set(self.cfg.look_ahead_layers))

    def speaker_features(self, cond: torch.Tensor, ref_mel: torch.Tensor, guided: bool) -> torch.Tensor:
        """Per-utterance constants: (nB, enc_dim + enc_emb_dim) = [ECAPA(ref mel), x-vector]; nB = 2B if guided."""
        if guided:  # the null branch: zero x-vector and zero reference mel (ECAPA of zeros is not zero)
            ref_mel = torch.cat([ref_mel, torch.zeros_like(ref_mel)])
            cond = torch.cat([cond, torch.zeros_like(cond)])
        return torch.cat([self.input_embed.spk_encoder(ref_mel), cond], dim=-1)

    def static_inputs(self, codes: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        """codes (B, N) + speaker_features (nB, .) -> (nB, N * repeats, enc_dim + emb_dim + enc_emb_dim)."""
        if codes.numel() and int(codes.max()) > self.cfg.num_embeds:
            raise InputError(f"codec code {int(codes.max())} is outside the DiT's table of {self.cfg.num_embeds + 1}")
        emb = self.text_embed(codes)
        if spk.shape[0] != codes.shape[0]:  # guided: the null branch replaces every code by code 0
            emb = torch.cat([emb, self.text_embed(torch.zeros_like(codes))])
        T, e = emb.shape[1], self.cfg.enc_dim
        return torch.cat([spk[:, None, :e].expand(-1, T, -1), emb, spk[:, None, e:].expand(-1, T, -1)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, static: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """One velocity evaluation. x (B, T, mel); t 0-d; static (nB, T, .) for frames offset .. offset+T.

        Frame positions (RoPE, blocks) are absolute (`offset` + local index), so a window of a longer utterance
        that starts on a block boundary sees exactly what the whole pass sees there. Returns (nB, T, mel).
        """
        nB, T = static.shape[0], x.shape[1]
        if nB != x.shape[0]:
            x = torch.cat([x, x])
        t_emb = self.time_embed(t.reshape(1).repeat(nB))
        h = self.input_embed.proj(torch.cat([x, static], dim=-1))
        pos = torch.arange(offset, offset + T, device=x.device)
        cos, sin = self.rotary(pos[None])
        block = pos // self.cfg.block_size
        block_diff = block[None, :] - block[:, None]  # [i, j] = block(j) - block(i)
        for blk in self.transformer_blocks:
            h = blk(h, t_emb, cos, sin, block_diff)
        return self.proj_out(self.norm_out(h, t_emb))


# ------------------------------------------------------------------------------------------ flow sampler

def time_grid(num_steps: int, sway: float | None, device=None) -> torch.Tensor:
    t = torch.linspace(0, 1, num_steps, device=device, dtype=torch.float32)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def stage_time(j: int, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """Time of evaluation j (0..3) of a 3/8-rule RK4 step from t0 to t1 (the reference's arithmetic)."""
    return (t0, t0 + (t1 - t0) * (1 / 3), t0 + (t1 - t0) * (2 / 3), t1)[j]


def stage_input(j: int, x: torch.Tensor, ks: list[torch.Tensor], dt: torch.Tensor) -> torch.Tensor:
    """State fed to evaluation j given the step's start x and the earlier slopes ks (elementwise per frame)."""
    if j == 0:
        return x
    if j == 1:
        return x + dt * ks[0] * (1 / 3)
    if j == 2:
        return x + dt * (ks[1] - ks[0] * (1 / 3))
    return x + dt * (ks[0] - ks[1] + ks[2])


def step_end(x: torch.Tensor, ks: list[torch.Tensor], dt: torch.Tensor) -> torch.Tensor:
    return x + (ks[0] + 3 * (ks[1] + ks[2]) + ks[3]) * dt / 8


class Token2Wav25(nn.Module):
    sample_rate = SAMPLE_RATE

    def __init__(self, cfg: Token2WavConfig25):
        super().__init__()
        self.cfg = cfg
        self.code2wav_dit_model = DiT25(cfg.dit)
        self.code2wav_bigvgan_model = BigVGAN25(cfg.bigvgan)

    @property
    def samples_per_code(self) -> int:
        return self.cfg.dit.repeats * self.code2wav_bigvgan_model.samples_per_frame

    def velocity(self, z: torch.Tensor, t: torch.Tensor, static: torch.Tensor, guidance_scale: float,
                 offset: int = 0) -> torch.Tensor:
        """The ODE's right-hand side with classifier-free guidance: (B, T, mel)."""
        v = self.code2wav_dit_model(z, t, static, offset)
        if static.shape[0] == z.shape[0]:
            return v
        cond, null = torch.chunk(v, 2, dim=0)
        return cond + (cond - null) * guidance_scale

    def integrate(self, x: torch.Tensor, static: torch.Tensor, grid: torch.Tensor, guidance_scale: float,
                  offset: int = 0) -> torch.Tensor:
        """Run the flow from x (B, T, mel) at grid[0] to grid[-1]: 3/8-rule RK4, 4 evaluations per step."""
        for i in range(len(grid) - 1):
            ks: list[torch.Tensor] = []
            for j in range(4):
                ks.append(self.velocity(stage_input(j, x, ks, grid[i + 1] - grid[i]),
                                        stage_time(j, grid[i], grid[i + 1]), static, guidance_scale, offset))
            x = step_end(x, ks, grid[i + 1] - grid[i])
        return x

    @torch.no_grad()
    def mel(self, codes: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor, *, noise: torch.Tensor | None = None,
            num_steps: int = 10, guidance_scale: float = 0.5, sway_coefficient: float | None = -1.0,
            offset: int = 0) -> torch.Tensor:
        """codes (B, N) -> log-mel (B, mel, N * repeats) by integrating the flow from `noise` (B, T, mel).

        cond: (B, enc_emb_dim) speaker x-vector; ref_mel: (B, T_ref, mel). `offset` places the codes at that
        frame (block-aligned) of a longer utterance, for windowed decoding.
        """
        dit = self.code2wav_dit_model
        dev = dit.proj_out.weight.device
        codes, cond, ref_mel = codes.to(dev), cond.to(dev).float(), ref_mel.to(dev).float()
        T = codes.shape[1] * self.cfg.dit.repeats
        if noise is None:
            noise = torch.randn([ref_mel.shape[0], T, self.cfg.dit.mel_dim], dtype=torch.float32, device=dev)
        static = dit.static_inputs(codes, dit.speaker_features(cond, ref_mel, guidance_scale >= 1e-5))
        x = self.integrate(noise.to(dev), static, time_grid(num_steps, sway_coefficient, dev), guidance_scale, offset)
        return x.permute(0, 2, 1)

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """log-mel (B, mel, T) -> waveform (B, T * 240); in chunks of `chunk_frames` with exact context if given."""
        voc = self.code2wav_bigvgan_model
        if chunk_frames is None or chunk_frames >= mel.shape[-1]:
            return voc(mel)
        ctx, T, spf = voc.context_frames(), mel.shape[-1], voc.samples_per_frame
        parts = []
        for a in range(0, T, chunk_frames):
            b = min(T, a + chunk_frames)
            lo, hi = max(0, a - ctx), min(T, b + ctx)
            parts.append(voc(mel[..., lo:hi])[:, (a - lo) * spf:(b - lo) * spf])
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def forward(self, codes: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor, *,
                noise: torch.Tensor | None = None, num_steps: int = 10, guidance_scale: float = 0.5,
                sway_coefficient: float | None = -1.0) -> torch.Tensor:
        """codes (B, N) -> 24 kHz float32 waveform (B, N * samples_per_code), the reference's token2wav."""
        return self.vocode(self.mel(codes, cond, ref_mel, noise=noise, num_steps=num_steps,
                                    guidance_scale=guidance_scale, sway_coefficient=sway_coefficient))
