"""Decode user video (frames, and optionally its sound track) the way the reference pipeline samples it.

Design: `load_video` accepts what `media.py` accepts (path, bytes, file object) and returns a `Video` of uint8
frames sampled like qwen-omni-utils before the HF processor: `sample_frame_indices` picks evenly spaced frames at
the requested fps within [min_frames, max_frames], rounded to the temporal patch. `probe` reads only the header,
so the processor can refuse an over-long video before decoding any frame. Errors are `media.MediaError`s that
name the file; a broken sound track does not lose the pictures.
"""
from __future__ import annotations

import dataclasses
import math
from typing import BinaryIO

import av
import numpy as np

from .media import MediaError, Source, _decode_audio, _label, _open_source, load_image


@dataclasses.dataclass
class Video:
    """Sampled frames of a video plus what the processor needs to place them in time."""
    frames: np.ndarray          # (T, H, W, 3) uint8 RGB
    timestamps: np.ndarray      # (T,) float64: presentation time of each sampled frame, seconds
    fps: float                  # effective sampling rate = T / total_frames * native_fps
    native_fps: float           # the file's frame rate
    total_frames: int           # frames in the file (the basis of the sampling)
    duration: float             # seconds = total_frames / native_fps
    audio: np.ndarray | None = None   # (n,) float32 mono at `sample_rate`, when requested and present
    has_audio_track: bool = False
    sample_rate: int = 16000
    audio_error: str | None = None    # why a present audio track could not be decoded, if so

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def seconds_per_frame(self) -> float:
        """Time between two sampled frames: the processor's `video_second_per_grid` is this × temporal patch."""
        return 1.0 / self.fps


def sample_frame_indices(total_frames: int, native_fps: float, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 768, frame_factor: int = 2) -> np.ndarray:
    """Indices of the frames to keep, as qwen-omni-utils' `smart_nframes` + linspace sampling does.

    n = duration·fps clamped to [ceil(min_frames), floor(min(max_frames, total))] (both to multiples
    of `frame_factor`) and to `total`, then floored to a multiple of `frame_factor`; indices are
    `round(linspace(0, total-1, n))` (half to even, as torch.round). Differences from the reference,
    on purpose: a video with fewer than `frame_factor` frames keeps all of them (the reference
    raises; the patcher pads T by repeating the last frame). HF's own `sample_frames` gives the same
    count but `floor(i·total/n)` indices; the official demos sample with qwen-omni-utils.
    """
    if total_frames <= 0:
        raise ValueError("total_frames must be positive")
    if total_frames < frame_factor:
        return np.arange(total_frames)
    lo = math.ceil(min_frames / frame_factor) * frame_factor
    hi = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
    n = total_frames / native_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = max(frame_factor, math.floor(n / frame_factor) * frame_factor)
    return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def _rewound(f: str | BinaryIO) -> str | BinaryIO:
    if hasattr(f, "seek"):
        f.seek(0)  # the same stream is opened several times
    return f


def _probe(f: str | BinaryIO, label: str) -> tuple[int, float, bool]:
    """(total_frames, native_fps, has_audio_track); counts packets when the header has no frame count."""
    with av.open(_rewound(f), metadata_errors="ignore") as c:
        if not c.streams.video:
            what = "it looks like an audio file" if c.streams.audio else "not a video file"
            raise MediaError(f"{label} contains no video track ({what}).")
        st = c.streams.video[0]
        has_audio = bool(c.streams.audio)
        total = st.frames
        dur = float(st.duration * st.time_base) if st.duration and st.time_base else (
            c.duration / 1e6 if c.duration else 0.0)
        rate = st.average_rate or st.guessed_rate
        if not total:
            total = sum(1 for p in c.demux(st) if p.size)
    fps = float(rate) if rate else (total / dur if dur > 0 else 0.0)
    return int(total), (fps if fps > 0 else 25.0), has_audio


def _pick_frames(f: str | BinaryIO, idx: np.ndarray, native_fps: float
                 ) -> tuple[dict[int, tuple[np.ndarray, float]], int]:
    """Decode up to the last wanted index: ({index: (rgb (H, W, 3), seconds)}, frames decoded).
    A decode error ends the stream quietly (truncated file); the caller sees the short count."""
    want, last = set(idx.tolist()), int(idx[-1])
    picked: dict[int, tuple[np.ndarray, float]] = {}
    size = t0 = None
    n_dec = 0
    with av.open(_rewound(f), metadata_errors="ignore") as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        try:
            for i, fr in enumerate(c.decode(st)):
                n_dec = i + 1
                t = float(fr.time) if fr.time is not None else i / native_fps
                t0 = t if t0 is None else t0  # times relative to the first frame, not the container clock
                if i in want:
                    size = size or (fr.width, fr.height)  # keep one size if the stream changes it
                    picked[i] = (fr.to_ndarray(format="rgb24", width=size[0], height=size[1]), t - t0)
                if i >= last:
                    break
        except (av.error.FFmpegError, EOFError):
            pass
    return picked, n_dec


@dataclasses.dataclass
class MediaInfo:
    """What a container says about itself, without decoding (for budgets before `load_video`)."""
    duration: float        # seconds (0.0 when unknown)
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    native_fps: float = 0.0


def probe(src: Source) -> MediaInfo:
    """Cheap look at an audio/video file's header: duration, tracks, frame size."""
    label = _label(src)
    try:
        with av.open(_open_source(src, "media"), metadata_errors="ignore") as c:
            v = c.streams.video[0] if c.streams.video else None
            info = MediaInfo(c.duration / 1e6 if c.duration else 0.0, v is not None, bool(c.streams.audio))
            if v is not None:
                info.width, info.height = v.width, v.height
                info.native_fps = float(v.average_rate or v.guessed_rate or 0)
            return info
    except MediaError:  # a reference that cannot be read says so itself (MediaError is a ValueError)
        raise
    except (av.error.FFmpegError, EOFError, ValueError) as e:
        raise MediaError(f"{label} is not a media file we can read, or it is corrupt ({e}).") from e


def load_video(src: Source, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
               with_audio: bool = False, sr: int = 16000, frame_factor: int = 2) -> Video:
    """Decode a video file (path, bytes or file object) and sample its frames (see `sample_frame_indices`).

    Frames stay at their native resolution (the patcher resizes them). With `with_audio`, the first
    audio track is decoded like `load_audio`; without one, `audio` is None and `has_audio_track`
    False: the caller decides what to tell the user. The header's frame count is trusted only as far
    as the decoder gets: a truncated file is sampled again over the frames it really has.
    """
    label = _label(src)
    f = _open_source(src, "video")
    try:
        total, native_fps, has_audio = _probe(f, label)
        picked: dict[int, tuple[np.ndarray, float]] = {}
        while total > 0:
            idx = sample_frame_indices(total, native_fps, fps, min_frames, max_frames, frame_factor)
            picked, n_dec = _pick_frames(f, idx, native_fps)
            if len(picked) == len(idx) or n_dec == 0:
                break
            total = n_dec  # fewer frames than the header claims
    except MediaError:
        raise
    except (av.error.FFmpegError, EOFError, ValueError) as e:
        raise MediaError(f"Video {label} could not be opened: it is not a supported video format "
                         f"or the file is corrupt ({e}).") from e
    if not picked:
        raise MediaError(f"Video {label} has no frames that could be decoded (it is empty or corrupt).")
    keys = sorted(picked)
    vid = Video(frames=np.stack([picked[k][0] for k in keys]),
                timestamps=np.asarray([picked[k][1] for k in keys], dtype=np.float64),
                fps=len(keys) / total * native_fps, native_fps=native_fps, total_frames=total,
                duration=total / native_fps, has_audio_track=has_audio, sample_rate=sr)
    if with_audio and has_audio:
        try:
            vid.audio = _decode_audio(_rewound(f), sr, label)
        except MediaError as e:  # a broken sound track should not lose the pictures
            vid.audio_error = str(e)
    return vid


def stack_frames(items, label: str = "video") -> np.ndarray:
    """A video given as its frames (qwen-omni-utils' list form: paths, URLs, PIL images or arrays, or one
    (T, H, W, 3) array) -> (T, H, W, 3) uint8. Frames of another size are resized to the first one's, as a
    video's frames share one size."""
    if isinstance(items, np.ndarray) and items.ndim == 4:
        items = list(items)
    if len(items) == 0:
        raise MediaError(f"The {label} is an empty list of frames.")
    frames = []
    for i, item in enumerate(items):
        try:
            img = load_image(item)
        except MediaError as e:
            raise MediaError(f"frame {i + 1} of the {label}: {e}") from e
        if frames and img.size != (frames[0].shape[1], frames[0].shape[0]):
            img = img.resize((frames[0].shape[1], frames[0].shape[0]))
        frames.append(np.asarray(img, dtype=np.uint8))
    return np.stack(frames)
