"""Audio for the synthetic world: beep sequences and espeak-ng spoken words, 16 kHz mono float32.

Design: tones are synthesised in numpy from the sample's `numpy.random.Generator`. Speech comes from the
espeak-ng CLI; one call starts a process, so each (word, voice, speed, pitch) waveform is cached in-process
(int16, ~16 KB each) and per-sample variety comes from cheap numpy augmentation on top (speed perturbation,
gain, padding, noise). The voice and speed grids are split into TRAIN and HELD-OUT pools that share no
accent, no voice variant and no speed. Lossy codec round-trips (MP3, Ogg) for the eval use PyAV.
"""
from __future__ import annotations

import functools
import io
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qwen_omni.synthetic.media import COLORS, SHAPES, SR, _decode_audio, _mux_audio

ESPEAK = shutil.which("espeak-ng")
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS: tuple[str, ...] = ("stop", "go", "yes", "no", "left", "right", "up", "down")
SPOKEN_WORDS: tuple[str, ...] = DIGIT_WORDS + COLORS + SHAPES + COMMANDS
# Held-out voices use accents and variants (f5, m4, f1) that no training voice uses.
TRAIN_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en+f2", "en-us+m7",
                                 "en-029+f4", "en-gb-scotland+m2")
HELDOUT_VOICES: tuple[str, ...] = ("en-us-nyc+f5", "en-gb-x-gbclan+m4", "en-gb-x-rp+f1")
TRAIN_SPEEDS: tuple[int, ...] = (120, 150, 180)  # espeak words per minute
HELDOUT_SPEEDS: tuple[int, ...] = (135, 195)
PITCHES: tuple[int, ...] = (35, 65)  # espeak pitch 0-99, shared by both splits
HIGH_HZ, LOW_HZ = (1000.0, 2000.0), (200.0, 450.0)
SHORT_S, LONG_S = (0.07, 0.15), (0.35, 0.5)


def voice_pool(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return (TRAIN_VOICES, TRAIN_SPEEDS) if split == "train" else (HELDOUT_VOICES, HELDOUT_SPEEDS)


# ---------------------------------------------------------------- resampling

@functools.lru_cache(maxsize=4)
def _polyphase_bank(up: int, down: int, half: int = 16) -> np.ndarray:
    """Windowed-sinc filter per output phase for the exact rational ratio up/down (e.g. 320/441)."""
    cutoff = 0.9 * min(1.0, up / down) / 2  # cycles per input sample, just below the output Nyquist
    frac = np.arange(up)[:, None] / up  # row p: output sample sits p/up of an input sample past its base
    u = np.arange(-half + 1, half + 1)[None, :] - frac
    win = np.cos(np.pi * u / (2 * half)) ** 2  # Hann window over [-half, half]
    bank = 2 * cutoff * np.sinc(2 * cutoff * u) * win
    return (bank / bank.sum(axis=1, keepdims=True)).astype(np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SR, half: int = 16) -> np.ndarray:
    """Band-limited resampling by the exact ratio sr_out/sr_in (polyphase windowed sinc, numpy only)."""
    g = np.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    bank = _polyphase_bank(up, down, half)
    n_out = len(x) * up // down
    pos = np.arange(n_out) * down  # input position of each output sample, in units of 1/up
    base, phase = pos // up, pos % up
    xp = np.pad(np.asarray(x, np.float32), (half, half))
    idx = base[:, None] + np.arange(-half + 1, half + 1)[None, :] + half
    return np.einsum("nk,nk->n", xp[idx], bank[phase]).astype(np.float32)


# ---------------------------------------------------------------- speech

@functools.lru_cache(maxsize=8192)
def espeak_word(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng waveform of `word` at 16 kHz as read-only int16, leading/trailing silence trimmed."""
    if ESPEAK is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); spoken-word samples need it")
    out = subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(out)) as w:  # header length is bogus when streaming; read to EOF
        sr = w.getframerate()
        pcm = np.frombuffer(w.readframes(1 << 30), np.int16)
    x = resample(pcm.astype(np.float32) / 32768.0, sr, SR)
    loud = np.flatnonzero(np.abs(x) > 0.02)
    if len(loud):
        x = x[max(0, loud[0] - 160): loud[-1] + 160]
    y = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    y.setflags(write=False)
    return y


def warm_espeak_cache(split: str = "train", workers: int = 4) -> int:
    """Synthesise every (word, voice, speed, pitch) of a split up front, in parallel (subprocesses).
    Optional: the cache also fills lazily. Returns the number of waveforms."""
    voices, speeds = voice_pool(split)
    keys = [(w, v, s, p) for w in SPOKEN_WORDS for v in voices for s in speeds for p in PITCHES]
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda k: espeak_word(*k), keys))
    return len(keys)


def _add_noise(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    x = x + rng.standard_normal(len(x), dtype=np.float32) * np.float32(rng.uniform(0.002, 0.03))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def spoken_word(rng: np.random.Generator, word: str, split: str = "train") -> np.ndarray:
    """`word` in a random voice/speed/pitch of the split's pool, speed-perturbed, padded and noisy."""
    voices, speeds = voice_pool(split)
    pcm = espeak_word(word, voices[rng.integers(len(voices))], int(speeds[rng.integers(len(speeds))]),
                      int(PITCHES[rng.integers(len(PITCHES))]))
    x = pcm.astype(np.float32) / 32768.0
    factor = rng.uniform(0.9, 1.1)  # Kaldi-style speed perturbation: shifts tempo and pitch together
    x = np.interp(np.arange(0, len(x) - 1, factor), np.arange(len(x)), x).astype(np.float32)
    x *= np.float32(rng.uniform(0.4, 1.0) / max(1e-3, float(np.abs(x).max())))
    pre, post = (int(v) for v in rng.integers(int(0.05 * SR), int(0.4 * SR), 2))
    return _add_noise(rng, np.pad(x, (pre, post)))


# ---------------------------------------------------------------- tones

def beep_params(rng: np.random.Generator, high: bool, long: bool) -> tuple[float, float]:
    """(frequency Hz, beep length s) for one sequence; ranges leave a wide gap between classes."""
    freq = rng.uniform(*(HIGH_HZ if high else LOW_HZ))
    return float(freq), float(rng.uniform(*(LONG_S if long else SHORT_S)))


def beeps(rng: np.random.Generator, count: int, high: bool, long: bool,
          total_s: float | None = None) -> np.ndarray:
    """`count` identical beeps separated by clear gaps, with background noise.

    With `total_s` the clip has exactly that length (a video's soundtrack) and beeps are spread over it."""
    freq, dur = beep_params(rng, high, long)
    gaps = rng.uniform(0.12, 0.35, max(0, count - 1))
    if total_s is not None:
        dur = min(dur, 0.6 * total_s / count)
        gaps = np.minimum(gaps, 0.35 * total_s / count)
    n = int(dur * SR)
    t = np.arange(n, dtype=np.float32) / SR
    timbre = rng.integers(3)  # pure sine, sine + harmonics, or soft square
    ph = 2 * np.pi * freq * t
    tone = np.sin(ph) if timbre == 0 else (np.sin(ph) + 0.3 * np.sin(2 * ph) + 0.15 * np.sin(3 * ph)
                                           if timbre == 1 else np.tanh(3 * np.sin(ph)))
    ramp = min(n // 4, int(0.01 * SR))  # 10 ms fades avoid clicks that could sound like extra beeps
    env = np.ones(n, np.float32)
    env[:ramp], env[n - ramp:] = np.linspace(0, 1, ramp), np.linspace(1, 0, ramp)
    tone = (tone * env * rng.uniform(0.2, 0.6)).astype(np.float32)
    body = count * n + int(gaps.sum() * SR)
    if total_s is None:
        pre, post = (int(v) for v in rng.integers(int(0.05 * SR), int(0.5 * SR), 2))
        total = pre + body + post
    else:
        total = int(round(total_s * SR))
        pre = int(rng.integers(0, max(1, total - body)))
    x = np.zeros(total, np.float32)
    pos = pre
    for i in range(count):
        x[pos:pos + n] = tone[: max(0, min(n, total - pos))]
        pos += n + (int(gaps[i] * SR) if i < count - 1 else 0)
    return _add_noise(rng, x)


def noise_only(rng: np.random.Generator, total_s: float) -> np.ndarray:
    return _add_noise(rng, np.zeros(int(round(total_s * SR)), np.float32))


# ---------------------------------------------------------------- robustness transforms (eval)

_CODECS = {"mp3": ("mp3", ("libmp3lame", "mp3")), "ogg": ("ogg", ("libopus", "libvorbis", "vorbis"))}


def encode_audio(audio: np.ndarray, codec: str = "mp3", bitrate: int = 32000) -> bytes:
    """16 kHz float32 audio as an MP3 or Ogg (Opus, else Vorbis) file in memory."""
    import av
    fmt, candidates = _CODECS[codec]
    name = next((c for c in candidates if c in av.codecs_available), None)
    if name is None:
        raise RuntimeError(f"no {codec} encoder in this PyAV build (tried {candidates})")
    rate = 48000 if name == "opus" else SR  # the native Opus encoder only takes 48 kHz
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        st = out.add_stream(name, rate=rate, layout="mono")
        st.bit_rate = bitrate
        if name in ("vorbis", "opus"):
            st.codec_context.options = {"strict": "experimental"}
        _mux_audio(out, st, audio)
    return buf.getvalue()


def codec_roundtrip(audio: np.ndarray, codec: str = "mp3", bitrate: int = 32000) -> np.ndarray:
    """Encode 16 kHz float32 audio to MP3 or Ogg (`encode_audio`) and decode it back to 16 kHz float32 of the
    same length (codec delay/padding trimmed or padded at the end)."""
    import av
    with av.open(io.BytesIO(encode_audio(audio, codec, bitrate))) as inp:
        return _decode_audio(inp, len(audio))
