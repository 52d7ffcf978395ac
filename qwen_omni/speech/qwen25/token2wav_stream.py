"""Streaming token2wav for Qwen2.5-Omni: codes arrive one by one, 24 kHz audio leaves in chunks.

The reference (transformers 5.24) has no streaming or chunked token2wav; this is ours. Two modes:

exact (default): a wavefront over the sampler's evaluations. Each of the 4 * (num_steps - 1) DiT evaluations
is block-local: its output block b depends only on its input blocks b - nb .. b + na (nb / na = number of
look-back / look-ahead layers; 2 / 1 released), and the RK4 combinations are per frame. So evaluation s can
finalise block b as soon as evaluation s-1 has finalised blocks up to b + na; it runs the DiT on the window
[first new block - nb, last new block + na] only, with absolute frame positions. Blocks come out equal to the
whole decode up to float rounding (tests: <= 1e-4 on the waveform, in practice ~1e-6). The price is latency:
the final mel of block b needs codes up to (4 * (num_steps - 1)) * na blocks ahead of it, 36 blocks = 864
frames = 432 codes = 8.6 s with the released config at 10 steps. This cannot be shortened without changing
the result: with every evaluation attending one block ahead, the 36th evaluation's block b has read block
b + 36 of the codes (through the chain of look-ahead layers), so no earlier exact answer exists.

windowed (`exact=False`): low latency, approximate. Each chunk of `chunk_codes` codes is decoded by the whole
ODE on the window [chunk - left_codes, chunk + right_codes] (block-aligned, the same noise frames and absolute
positions as the whole decode) and the chunk's frames are kept. Frames near a window edge see a truncated
context, so the mel differs from the whole decode; tests/test_speech25.py measures the seam error.

In both modes the BigVGAN vocoder then runs on the final mel in chunks with `context_frames()` of mel context
on each side (exact, since BigVGAN is a stateless finite-receptive-field convolution stack).

The initial noise is per frame (`FrameNoise`): an explicit tensor, or pages drawn from a seeded generator, so
the stream and a whole decode given `FrameNoise.get(0, T)` start from the same noise.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .token2wav import Token2Wav25, stage_input, stage_time, step_end, time_grid


class FrameNoise:
    """Initial flow noise (1, T, mel) served by frame range, whatever the request pattern."""

    def __init__(self, source: torch.Tensor | torch.Generator | None, mel_dim: int, page: int = 1024):
        if source is None:
            source = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        self.gen = source if isinstance(source, torch.Generator) else None
        self.buf = source if self.gen is None else torch.zeros(1, 0, mel_dim)
        self.mel_dim, self.page = mel_dim, page

    def get(self, a: int, b: int) -> torch.Tensor:
        while self.gen is not None and self.buf.shape[1] < b:
            more = torch.randn(1, self.page, self.mel_dim, generator=self.gen, device=self.gen.device)
            self.buf = torch.cat([self.buf, more.to(self.buf.device)], dim=1)
        if self.buf.shape[1] < b:
            raise ValueError(f"the noise tensor covers {self.buf.shape[1]} frames; frame {b - 1} was needed")
        return self.buf[:, a:b]


class _Buf:
    """A (rows, T, C) tensor growing along T with amortised O(1) appends (no quadratic re-concatenation)."""

    def __init__(self, rows: int, ch: int, device, dtype=torch.float32):
        self.data = torch.zeros(rows, 256, ch, device=device, dtype=dtype)
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        m = x.shape[1]
        if self.n + m > self.data.shape[1]:
            grown = self.data.new_zeros(self.data.shape[0], max(2 * self.data.shape[1], self.n + m), self.data.shape[2])
            grown[:, :self.n] = self.data[:, :self.n]
            self.data = grown
        self.data[:, self.n:self.n + m] = x
        self.n += m

    def __getitem__(self, frames: slice) -> torch.Tensor:
        return self.data[:, :self.n][:, frames]


class _Vocoder:
    """Turns a growing final mel into waveform chunks with exact context."""

    def __init__(self, t2w: Token2Wav25, min_frames: int):
        self.voc = t2w.code2wav_bigvgan_model
        self.ctx, self.spf, self.min_frames = self.voc.context_frames(), self.voc.samples_per_frame, min_frames
        self.mel = _Buf(1, t2w.cfg.bigvgan.mel_dim, self.voc.conv_pre.weight.device)  # (1, T, mel)
        self.emitted = 0

    def push(self, mel: torch.Tensor) -> None:
        """mel: (1, n, mel) newly final frames."""
        self.mel.append(mel)

    def pull(self, final: bool) -> torch.Tensor | None:
        T = self.mel.n
        end = T if final else T - self.ctx
        if end <= self.emitted or (not final and end - self.emitted < self.min_frames):
            return None
        lo, hi = max(0, self.emitted - self.ctx), min(T, end + self.ctx)
        wav = self.voc(self.mel[lo:hi].permute(0, 2, 1))[0, (self.emitted - lo) * self.spf:(end - lo) * self.spf]
        self.emitted = end
        return wav.float().cpu()


class _Frames:
    """Codes received so far, as per-frame DiT inputs: static conditioning (nB, T, .) and noise (1, T, mel)."""

    def __init__(self, t2w: Token2Wav25, cond, ref_mel, guidance_scale: float, noise: FrameNoise):
        dit = t2w.code2wav_dit_model
        self.dit, self.rep, self.noise = dit, t2w.cfg.dit.repeats, noise
        self.dev = dit.proj_out.weight.device
        self.spk = dit.speaker_features(cond.to(self.dev).float(), ref_mel.to(self.dev).float(), guidance_scale >= 1e-5)
        self.static: _Buf | None = None  # (nB, T, enc_dim + emb_dim + enc_emb_dim)
        self.total = 0

    def add(self, codes: list[int]) -> None:
        s = self.dit.static_inputs(torch.tensor([codes], device=self.dev), self.spk)
        if self.static is None:
            self.static = _Buf(s.shape[0], s.shape[2], self.dev)
        self.static.append(s)
        self.total += len(codes) * self.rep


class _Wavefront:
    """Exact streaming sampler; x[i] / k[i][j] hold the frames finalised so far of each step state / slope."""

    def __init__(self, t2w: Token2Wav25, frames: _Frames, grid: torch.Tensor, guidance_scale: float, chunk_blocks: int):
        self.t2w, self.f, self.grid, self.gs = t2w, frames, grid, guidance_scale
        self.bs = t2w.cfg.dit.block_size
        self.nb, self.na = t2w.code2wav_dit_model.reach
        self.min_new = chunk_blocks * self.bs
        mel, dev = t2w.cfg.dit.mel_dim, frames.dev
        self.x = [_Buf(1, mel, dev) for _ in range(len(grid))]  # x[0] is the noise
        self.k = [[_Buf(1, mel, dev) for _ in range(4)] for _ in range(len(grid) - 1)]

    def advance(self, final: bool) -> torch.Tensor | None:
        """Run every evaluation as far as its input allows; return newly finalised mel (1, n, mel) or None."""
        bs, total, f = self.bs, self.f.total, self.f
        self.x[0].append(f.noise.get(self.x[0].n, total).to(f.dev))
        before = self.x[-1].n
        for i in range(len(self.grid) - 1):
            dt = self.grid[i + 1] - self.grid[i]
            x, ks = self.x[i], self.k[i]
            for j in range(4):
                avail, done = (x if j == 0 else ks[j - 1]).n, ks[j].n
                last = final and avail == total
                target = avail if last else (avail // bs - self.na) * bs
                if target <= done or (not last and target - done < self.min_new):
                    continue
                lo = max(0, done - self.nb * bs)  # done is block-aligned here
                hi = avail if last else min(avail, target + self.na * bs)
                z = stage_input(j, x[lo:hi], [k[lo:hi] for k in ks[:j]], dt)
                v = self.t2w.velocity(z, stage_time(j, self.grid[i], self.grid[i + 1]), f.static[lo:hi], self.gs,
                                      offset=lo)
                ks[j].append(v[:, done - lo:target - lo])
                if j == 3:  # close the RK4 step for the newly finished frames
                    a = self.x[i + 1].n
                    self.x[i + 1].append(step_end(x[a:target], [k[a:target] for k in ks], dt))
        after = self.x[-1].n
        return self.x[-1][before:after] if after > before else None


class _Windowed:
    """Approximate low-latency sampler: whole ODE per chunk window with left/right code context."""

    def __init__(self, t2w: Token2Wav25, frames: _Frames, grid, guidance_scale: float, chunk_codes: int,
                 left_codes: int, right_codes: int):
        self.t2w, self.f, self.grid, self.gs = t2w, frames, grid, guidance_scale
        bs, rep = t2w.cfg.dit.block_size, t2w.cfg.dit.repeats

        def blocks(codes: int) -> int:  # frames, rounded up to whole blocks
            return -(-codes * rep // bs) * bs

        self.chunk, self.left, self.right = max(bs, blocks(chunk_codes)), blocks(left_codes), blocks(right_codes)
        self.next = 0

    def advance(self, final: bool) -> torch.Tensor | None:
        out = []
        total = self.f.total
        while self.next < total:
            cs, ce = self.next, self.next + self.chunk
            if not final and ce + self.right > total:
                break
            ce = min(ce, total)
            lo, hi = max(0, cs - self.left), min(total, ce + self.right)
            x = self.t2w.integrate(self.f.noise.get(lo, hi).to(self.f.dev), self.f.static[lo:hi], self.grid,
                                   self.gs, offset=lo)
            out.append(x[:, cs - lo:ce - lo])
            self.next = ce
        return torch.cat(out, dim=1) if out else None


@torch.no_grad()
def stream(t2w: Token2Wav25, codes: Iterable[int], cond: torch.Tensor, ref_mel: torch.Tensor, **kw
           ) -> Iterator[torch.Tensor]:
    """Yield 1-D float32 CPU waveform chunks at 24 kHz while pulling codes from `codes` (ints, EOS excluded).

    cond (1, enc_emb_dim), ref_mel (1, T_ref, mel): the speaker. Keyword arguments: `WaveStream25`. The
    concatenated chunks have len(codes) * samples_per_code samples.
    """
    s = WaveStream25(t2w, cond, ref_mel, **kw)
    for code in codes:
        yield from s.push([int(code)])
    yield from s.finish()


class WaveStream25:
    """Push-style token2wav stream: `push(codes)` as the talker makes them, `finish()` after the last.

    exact=True: equal to `t2w(codes, noise=...)` (see module docstring for the latency); exact=False: windowed,
    `chunk_codes` per window with `left_codes` / `right_codes` of context. dit_chunk_blocks: exact mode runs an
    evaluation once it can finalise this many blocks (1 = lowest latency; larger = fewer, wider windows).
    vocoder_chunk_frames: the fewest new mel frames worth a BigVGAN call (its context comes on top).
    """

    @torch.no_grad()
    def __init__(self, t2w: Token2Wav25, cond: torch.Tensor, ref_mel: torch.Tensor, *,
                 noise: FrameNoise | torch.Tensor | torch.Generator | None = None, num_steps: int = 10,
                 guidance_scale: float = 0.5, sway_coefficient: float | None = -1.0, exact: bool = True,
                 dit_chunk_blocks: int = 1, chunk_codes: int = 48, left_codes: int = 24, right_codes: int = 24,
                 vocoder_chunk_frames: int = 48):
        if not isinstance(noise, FrameNoise):
            noise = FrameNoise(noise, t2w.cfg.dit.mel_dim)
        self.frames = _Frames(t2w, cond, ref_mel, guidance_scale, noise)
        grid = time_grid(num_steps, sway_coefficient, self.frames.dev)
        self.sampler = (_Wavefront(t2w, self.frames, grid, guidance_scale, dit_chunk_blocks) if exact else
                        _Windowed(t2w, self.frames, grid, guidance_scale, chunk_codes, left_codes, right_codes))
        self.vocoder = _Vocoder(t2w, vocoder_chunk_frames)

    @torch.no_grad()
    def push(self, codes: Iterable[int]) -> list[torch.Tensor]:
        """Add codes (one at a time internally, so chunking never depends on how callers batch them)."""
        out = []
        for code in codes:
            self.frames.add([int(code)])
            out.extend(self._pump(False))
        return out

    @torch.no_grad()
    def finish(self) -> list[torch.Tensor]:
        return self._pump(True) if self.frames.total else []

    def _pump(self, final: bool) -> list[torch.Tensor]:
        mel = self.sampler.advance(final)
        if mel is not None:
            self.vocoder.push(mel)
        wav = self.vocoder.pull(final)
        return [wav] if wav is not None and wav.numel() else []
