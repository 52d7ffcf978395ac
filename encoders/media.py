"""Decode user media (images, audio, video) into plain arrays, with errors a user can act on.

Design: every loader accepts what a UI or a script hands us (a path, raw bytes, a file object, an
already-decoded PIL image or numpy array) and returns one canonical form: an RGB `PIL.Image` or a mono
float32 waveform at the requested rate (video: `video.py`, on the same helpers). Decoding uses Pillow and PyAV only
(no torchvision / torchaudio on this machine). String references (paths, file://, data: and http(s) URLs) are
resolved by `sources.py`, which also defines `MediaError` (re-exported here, where callers import it from).
Anything that goes wrong with the *content* raises `MediaError`, whose message names the file ("upload" for
bytes) and says what is wrong in plain words;
programming errors (a wrong argument type) stay ordinary exceptions. Budgets (max seconds, max
frames per request) are the processor's job: here we only report the decoded duration.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import av
import numpy as np
from PIL import Image, ImageOps

from . import sources
from .sources import MediaError

__all__ = ["MediaError", "load_audio", "load_image", "resample"]

Source = Any  # str (path or URL) | Path | bytes | file object | PIL.Image | np.ndarray | (rate, np.ndarray)


# ----------------------------------------------------------------------------------------- sources

def _label(src: Source) -> str:
    """How a message names the input: the file's name (a URL's, a data: URL's type), or 'upload' for in-memory
    data."""
    if isinstance(src, (str, Path)):
        return sources.describe(src)
    if isinstance(src, sources.Blob):
        return src.name  # already in message form: "'demo.jpeg' from host", "a data: URL (image/png)"
    name = getattr(src, "name", None)
    if isinstance(name, str) and name:
        return f"'{Path(name).name}'"
    return "upload"


def _open_source(src: Source, kind: str) -> str | BinaryIO:
    """A path (checked to exist) or a seekable binary stream for Pillow/PyAV."""
    src = sources.resolve(src, kind)  # a URL or data: URL -> its bytes; a path or file:// URL -> a checked path
    if isinstance(src, sources.Blob):
        stream = io.BytesIO(src)
        stream.name = src.name  # so PyAV/Pillow errors and our messages can name it
        return stream
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise MediaError(f"The {kind} upload is empty (0 bytes).")
        return io.BytesIO(bytes(src))
    if isinstance(src, str):  # resolve() checked that it exists, is a file and is not empty
        return src
    if hasattr(src, "read"):
        return src
    raise TypeError(f"cannot load {kind} from {type(src).__name__}")


# ------------------------------------------------------------------------------------------ images

def _float_to_u8(a: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (or already 0..255) to uint8."""
    a = np.nan_to_num(a.astype(np.float64))
    if a.size and a.max() <= 1.0:
        a = a * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _array_to_image(a: np.ndarray, label: str) -> Image.Image:
    """(H, W), (H, W, 1|3|4) or (1|3|4, H, W) array to a PIL image in L/RGB/RGBA."""
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first -> channels-last
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.size == 0:
        raise MediaError(f"Image {label} has an unusable array shape {tuple(a.shape)}; "
                         "expected (height, width) or (height, width, 3/4).")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.round(a / 257.0).astype(np.uint8)  # full 16-bit range onto 8 bits
    elif np.issubdtype(a.dtype, np.floating):
        a = _float_to_u8(a)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))  # uint8 (H, W) / (H, W, 3) / (H, W, 4): L / RGB / RGBA


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white (as the HF image processor does)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # Pillow's own I->RGB conversion clips at 255; scale the 16-bit range down instead.
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(_float_to_u8(np.asarray(img)), mode="L")
    if "A" in img.getbands() or "a" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"Image {label} uses colour mode {img.mode!r}, which cannot be converted "
                         "to RGB. Please save it as a normal PNG or JPEG.") from e


def _finish_image(img: Image.Image, label: str) -> Image.Image:
    img.load()  # decode now, so truncation shows up here and not later
    return _to_rgb(ImageOps.exif_transpose(img), label)  # exif_transpose returns a new image


def load_image(src: Source) -> Image.Image:
    """Decode `src` (path, bytes, file object, PIL image or numpy array) to an RGB PIL image.

    EXIF orientation is applied; animated images give their first frame; the file type is decided
    by content, not by extension. Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is
    enforced already at its warning level. Tiny or extremely elongated images load fine here and are
    rejected by `preprocess.smart_resize`.
    """
    label = _label(src)
    if isinstance(src, np.ndarray):
        return _to_rgb(_array_to_image(src, label), label)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):  # already decoded: its memory is spent, no bomb check
                return _finish_image(src, label)
            with Image.open(_open_source(src, "image")) as img:
                # Explicit check too: warning filters are process-global, another thread may reset them.
                if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height}")
                return _finish_image(img, label)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"Image {label} is too large to process safely (more than "
                         f"{Image.MAX_IMAGE_PIXELS or 0:,} pixels). Please downscale it and try again.") from e
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"{label} is not an image format we can read (PNG, JPEG, GIF, WEBP, BMP, "
                         "TIFF…). It may be another kind of file or damaged.") from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError… on damaged data
        raise MediaError(f"Image {label} could not be decoded: the file looks truncated or corrupt "
                         f"({e}). Please re-save or re-upload it.") from e


# ------------------------------------------------------------------------------------------- audio

def _pcm_to_float(a: np.ndarray) -> np.ndarray:
    """Integer or float PCM samples to float32 in [-1, 1]; keeps the shape."""
    if a.dtype == np.uint8:
        return ((a.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float64) / float(2 ** (8 * a.dtype.itemsize - 1))).astype(np.float32)
    return a.astype(np.float32)


def _downmix(a: np.ndarray, label: str) -> np.ndarray:
    """(n,), (n, ch) or (ch, n) to mono (n,) by averaging channels (as librosa's to_mono does)."""
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise MediaError(f"Audio {label} has array shape {tuple(a.shape)}; expected (samples,) or "
                         "(samples, channels).")
    if a.shape[0] < a.shape[1] and a.shape[0] <= 8:
        a = a.T  # (ch, n) -> (n, ch)
    return a.mean(axis=1, dtype=np.float64).astype(np.float32)


class _Resampler:
    """Streaming mono float32 rate conversion with libswresample (via PyAV); identity if rates match."""

    def __init__(self, rate: int, sr: int):
        self.rate, self.pos = rate, 0
        self.rs = None if rate == sr else av.AudioResampler(format="flt", layout="mono", rate=sr)

    def _out(self, frames) -> list[np.ndarray]:
        return [o.to_ndarray().reshape(-1) for o in frames]

    def push(self, x: np.ndarray) -> list[np.ndarray]:
        if self.rs is None or x.size == 0:
            return [x]
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None], dtype=np.float32), format="flt",
                                        layout="mono")
        fr.sample_rate, fr.pts = self.rate, self.pos
        self.pos += x.size
        return self._out(self.rs.resample(fr))

    def flush(self) -> list[np.ndarray]:
        return [] if self.rs is None else self._out(self.rs.resample(None))  # the filter's tail


def resample(x: np.ndarray, rate: int, sr: int) -> np.ndarray:
    """Mono float32 (n,) at `rate` -> (≈n*sr/rate,) at `sr` with libswresample (via PyAV).

    Accurate in the speech band with no delay; its filter rolls off towards the Nyquist frequency
    earlier than librosa's soxr (used by qwen-omni-utils), so only the top mel bands can differ
    slightly from the reference pipeline (measurements in docs/cpu-kernels.md).
    """
    r = _Resampler(rate, sr)
    out = r.push(x) + r.flush()
    return np.concatenate(out).astype(np.float32, copy=False)


def _frame_to_mono(fr: av.AudioFrame) -> np.ndarray:
    """One decoded audio frame (any sample format, planar or packed) to mono float32 (n,)."""
    a = fr.to_ndarray()  # dtype follows the sample format: uint8, int16/32/64, float32/64
    ch = fr.layout.nb_channels
    a = a.reshape(ch, -1) if fr.format.is_planar else a.reshape(-1, ch).T  # -> (ch, n)
    return _pcm_to_float(a).mean(axis=0, dtype=np.float64).astype(np.float32)


def _decode_audio(src: Source, sr: int, label: str) -> np.ndarray:
    """Decode the first audio stream of any container PyAV reads, to mono float32 at `sr`.
    Resamples while decoding, so memory holds only the 16-kHz result."""
    f = _open_source(src, "audio")
    out: list[np.ndarray] = []
    r: _Resampler | None = None
    try:
        with av.open(f, metadata_errors="ignore") as c:
            if not c.streams.audio:
                # FFmpeg opens a still picture as a one-frame video ('png_pipe', 'jpeg_pipe', 'gif', ...)
                still = c.format.name.endswith("_pipe") or c.format.name in ("image2", "gif", "apng")
                what = ("it is a picture, not an audio file" if still else
                        "a video without sound" if c.streams.video else "not an audio file")
                raise MediaError(f"{label} contains no audio track ({what}).")
            for fr in c.decode(c.streams.audio[0]):
                if r is None or fr.sample_rate != r.rate:  # the rate may change mid-stream
                    out += r.flush() if r else []
                    r = _Resampler(fr.sample_rate, sr)
                out += r.push(_frame_to_mono(fr))
    except MediaError:
        raise
    except (av.error.FFmpegError, EOFError, ValueError) as e:
        raise MediaError(f"Audio {label} could not be decoded: it is not a supported audio format "
                         f"or the file is corrupt ({e}).") from e
    out += r.flush() if r else []
    x = np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)
    if x.size == 0:
        raise MediaError(f"Audio {label} is empty (zero length): nothing could be decoded from it.")
    if not np.isfinite(x).all():  # float WAV/FLAC can carry them; the encoder would turn them into an empty answer
        raise MediaError(f"Audio {label} contains invalid samples (NaN or infinity).")
    return x


def load_audio(src: Source, sr: int = 16000) -> np.ndarray:
    """Decode `src` to a mono float32 waveform (n,) at `sr` Hz.

    `src`: a path, bytes or file object (any container/codec PyAV reads: wav, mp3, ogg/opus, flac,
    m4a/aac, webm, the audio of a video…), a `(sample_rate, array)` tuple as Gradio hands it
    (int16/int32/uint8/float, (n,) or (n, channels)), or a bare float array assumed to be 16 kHz mono.
    Channels are averaged; the rate is converted with `resample`.
    """
    label = _label(src)
    if isinstance(src, tuple) and len(src) == 2 and np.isscalar(src[0]):
        rate, a = int(src[0]), np.asarray(src[1])
    elif isinstance(src, np.ndarray):
        rate, a = 16000, src
    else:
        return _decode_audio(src, sr, label)
    if rate <= 0:
        raise MediaError(f"Audio {label} has an invalid sample rate ({rate}).")
    x = _downmix(_pcm_to_float(a), label)
    if x.size == 0:
        raise MediaError(f"Audio {label} is empty (zero length).")
    if not np.isfinite(x).all():
        raise MediaError(f"Audio {label} contains invalid samples (NaN or infinity).")
    return resample(np.ascontiguousarray(x), rate, sr)
