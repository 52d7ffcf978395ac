"""Spoken replies on the wire: float32 mono 24 kHz audio -> the bytes of an OpenAI audio format.

Design
- Formats: `wav` (16-bit PCM), `pcm16` (raw little-endian 16-bit, 24 kHz mono; also spelled `pcm` by
  `/v1/audio/speech`), `mp3` (libmp3lame), `flac`, `opus` (libopus in an Ogg container). All but wav/pcm16 are
  encoded with PyAV, which the media decoders already use, so no new dependency.
- `encode(audio, fmt)` makes one whole file. `StreamEncoder(fmt)` encodes chunk by chunk for a streamed reply:
  PyAV writes into an in-memory buffer and each `push` hands out what the muxer has written so far. FLAC writes
  its final header by seeking back to the start, so a streamed FLAC is produced in one piece at `close()`; wav is
  streamed with the "unknown length" header (0xFFFFFFFF sizes) that players accept.
- Streamed chat completions always carry pcm16 (OpenAI's streaming audio format); the request's format applies to
  the non-streaming `message.audio.data`.
"""
from __future__ import annotations

import io
import struct

import av
import numpy as np

RATE = 24000
FORMATS = ("wav", "pcm16", "mp3", "flac", "opus")
ALIASES = {"pcm": "pcm16"}
MIME = {"wav": "audio/wav", "pcm16": "audio/pcm", "mp3": "audio/mpeg", "flac": "audio/flac", "opus": "audio/ogg"}
_AV = {"mp3": ("mp3", "libmp3lame"), "flac": ("flac", "flac"), "opus": ("ogg", "libopus")}


def canonical(fmt: str) -> str | None:
    """The format's name here, or None when it is not one of ours."""
    f = ALIASES.get(str(fmt).lower(), str(fmt).lower())
    return f if f in FORMATS else None


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(np.asarray(audio, np.float32).reshape(-1), -1, 1) * 32767).astype("<i2").tobytes()


def wav_header(n_bytes: int | None, rate: int = RATE) -> bytes:
    """A 44-byte PCM16 mono WAV header; n_bytes None: unknown length (for a stream)."""
    data = 0xFFFFFFFF if n_bytes is None else n_bytes
    riff = 0xFFFFFFFF if n_bytes is None else 36 + n_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data))


def encode(audio: np.ndarray, fmt: str, rate: int = RATE) -> bytes:
    """One whole file of `audio` (float32 mono) in `fmt`."""
    enc = StreamEncoder(fmt, rate, whole=True)
    return enc.push(audio) + enc.close()


class StreamEncoder:
    """Chunks of float32 audio in, bytes of one growing file out (see the module docstring)."""

    def __init__(self, fmt: str, rate: int = RATE, whole: bool = False):
        f = canonical(fmt)
        if f is None:
            raise ValueError(f"unknown audio format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.fmt, self.rate, self.whole = f, rate, whole
        self._pcm: list[bytes] = []  # wav (whole) and flac collect here
        self._started = False
        self._container = self._stream = None
        self._buf = io.BytesIO()
        self._pts = 0

    def _open(self) -> None:
        fmt, codec = _AV[self.fmt]
        opts = {"write_xing": "0", "id3v2_version": "0"} if self.fmt == "mp3" and not self.whole else {}
        self._container = av.open(self._buf, "w", format=fmt, options=opts)  # (no header rewritten by seeking)
        self._stream = self._container.add_stream(codec, rate=self.rate if self.fmt != "opus" else 48000)
        self._stream.layout = "mono"
        if self.fmt == "mp3":
            self._stream.bit_rate = 64000

    def _drain(self) -> bytes:
        out = self._buf.getvalue()
        self._buf.seek(0)
        self._buf.truncate()
        return out

    def _frame(self, audio: np.ndarray | None):
        if audio is None:
            return None
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
        fr = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        fr.sample_rate, fr.pts = self.rate, self._pts
        self._pts += pcm.shape[1]
        return fr

    def push(self, audio: np.ndarray) -> bytes:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if self.fmt == "pcm16":
            return pcm16(audio)
        if self.fmt == "wav":
            if self.whole:
                self._pcm.append(pcm16(audio))
                return b""
            head = b"" if self._started else wav_header(None, self.rate)
            self._started = True
            return head + pcm16(audio)
        if self.fmt == "flac" and not self.whole:
            self._pcm.append(pcm16(audio))
            return b""
        if not audio.size:
            return b""
        if self._container is None:
            self._open()
        for packet in self._stream.encode(self._frame(audio)):
            self._container.mux(packet)
        return b"" if self.whole else self._drain()

    def close(self) -> bytes:
        """The rest of the file (all of it for whole wav and streamed flac)."""
        if self.fmt == "pcm16":
            return b""
        if self.fmt == "wav":
            if self.whole:
                data = b"".join(self._pcm)
                return wav_header(len(data), self.rate) + data
            return b"" if self._started else wav_header(None, self.rate)
        if self.fmt == "flac" and not self.whole:
            data = b"".join(self._pcm)
            return encode(np.frombuffer(data, "<i2").astype(np.float32) / 32767, "flac", self.rate)
        if self._container is None:  # no audio at all: still a valid (empty) file
            self._open()
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._buf.getvalue() if self.whole else self._drain()
