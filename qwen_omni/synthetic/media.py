"""Image and video renderers for the synthetic world: shapes, rendered text, short clips of a moving shape.

Design: every function takes a `numpy.random.Generator` and draws all its randomness from it, so a
sample is a pure function of its seed (same seed -> byte-identical pixels and samples). Scenes sit on a
3x3 grid: each shape owns one cell, so shapes never overlap and the position answer ("top left", "center",
...) is unambiguous. Costly, seed-independent assets (noise tiles, fonts) are built
once per process and cached. Robustness transforms for the eval (JPEG, MP4) live at the end and only
use Pillow and PyAV. Audio lives in `synthetic_audio`.
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SR = 16000  # every audio array is 16 kHz mono float32

# Hues kept far apart so a colour answer is never a judgement call; names are canonical (American).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 50, 190), "pink": (245, 130, 190),
    "brown": (125, 75, 30), "black": (15, 15, 15), "white": (245, 245, 245), "gray": (128, 128, 128),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
# Row-major 3x3 grid names; the index is row * 3 + col.
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "box", "map", "cup", "hat", "pen", "bus", "fox",
                          "tree", "fish", "bird", "moon", "book", "door", "ship", "cake", "star", "milk")
COLOR_JITTER = 12  # per-channel jitter on palette colours; small next to the inter-colour distances
# Colours allowed on each background tone (light 195-235, dark 15-60 grey, +-8 tint): every pair is at
# least ~70 apart in RGB; white on light and black/brown on dark would be near-invisible.
ON_TONE: dict[str, tuple[str, ...]] = {"light": tuple(c for c in COLORS if c != "white"),
                                       "dark": tuple(c for c in COLORS if c not in ("black", "brown"))}

# fonts-dejavu-core files, in a fixed order so the fonts list (and hence samples) is deterministic.
_DEJAVU_DIR = "/usr/share/fonts/truetype/dejavu"
_DEJAVU = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
           "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")
FONTS: tuple[str, ...] = ("default",) + tuple(
    os.path.join(_DEJAVU_DIR, f) for f in _DEJAVU if os.path.exists(os.path.join(_DEJAVU_DIR, f)))


@functools.lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.ImageFont:
    try:
        if name == "default":
            return ImageFont.load_default(size=size)
        return ImageFont.truetype(name, size)
    except (OSError, TypeError, ImportError):  # no FreeType: Pillow's fixed-size bitmap font still renders
        return ImageFont.load_default()


@functools.lru_cache(maxsize=1)
def _noise_tiles() -> np.ndarray:
    # A fixed bank of noise tiles (fixed seed) is much cheaper than fresh per-pixel noise per sample.
    return np.random.default_rng(1234).integers(-1, 2, size=(4, 256, 256, 3), dtype=np.int8)


# ---------------------------------------------------------------- images

@dataclass
class Obj:
    shape: str
    color: str
    cell: int  # index into POSITIONS
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon for `shape` inscribed in a circle of radius r (circle itself is drawn as an ellipse)."""
    if shape == "square":
        s = r * 0.8
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":  # narrower than a rotated square so it never reads as one
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    if shape == "cross":
        a, t = r * 0.9, r * 0.32
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t),
                (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t),
                (cx - a, cy - t), (cx - t, cy - t)]
    if shape == "triangle":
        k, start, radii = 3, -np.pi / 2, [r]
        cy += r * 0.2  # centre the triangle's bounding box on cy
    elif shape == "hexagon":
        k, start, radii = 6, 0.0, [r * 0.95]
    elif shape == "star":
        k, start, radii = 10, -np.pi / 2, [r, r * 0.45]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    ang = start + 2 * np.pi * np.arange(k) / k
    rad = np.resize(radii, k)
    return [(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for a, q in zip(ang, rad)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_points(shape, cx, cy, r), fill=fill)


def _jitter(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    base = np.array(PALETTE[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))


def background(rng: np.random.Generator, w: int, h: int, tone: str) -> np.ndarray:
    """Plain, gradient or lightly noisy uint8 HxWx3 background of the given tone ("light" | "dark")."""
    kind = ("plain", "gradient", "noise")[rng.choice(3, p=[0.4, 0.35, 0.25])]
    lo, hi = (195, 235) if tone == "light" else (15, 60)
    ends = [np.clip(rng.integers(lo, hi + 1) + rng.integers(-8, 9, 3), 0, 255) for _ in range(2)]
    c0 = ends[0].astype(np.float32)
    if kind == "gradient":
        if rng.random() < 0.5:  # horizontal
            t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        else:
            t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        img = c0 + t * (ends[1].astype(np.float32) - c0)
        img = np.broadcast_to(img, (h, w, 3))
    else:
        img = np.broadcast_to(c0, (h, w, 3))
    if kind == "noise":
        tile = _noise_tiles()[rng.integers(4)]
        oy, ox = rng.integers(0, 257 - h), rng.integers(0, 257 - w)
        img = img + tile[oy:oy + h, ox:ox + w] * np.float32(rng.integers(4, 11))
    return np.clip(img, 0, 255).astype(np.uint8)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    w, h = (int(v) for v in rng.integers(0, 7, 2) * 16 + 128)  # 128..224 in steps of 16
    return w, h


def _tone(rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    tone = "light" if rng.random() < 0.5 else "dark"
    return tone, ON_TONE[tone]


def pick_objects(rng: np.random.Generator, n: int, unique: bool = True, w: int = 128, h: int = 128,
                 colors: tuple[str, ...] = COLORS, big: bool = False) -> list[Obj]:
    """n shapes in distinct grid cells, coloured from `colors`; `unique` makes every shape and every
    colour distinct so that a question can name an object by its shape or colour. `big` (n == 1 only): one
    large centred shape, the easy end of the training curriculum."""
    cells = np.array([4]) if big and n == 1 else np.sort(rng.choice(9, size=n, replace=False))
    shapes = rng.choice(len(SHAPES), size=n, replace=not unique)
    color_idx = rng.choice(len(colors), size=n, replace=not unique)
    cw, ch = w / 3, h / 3
    objs = []
    for cell, s, c in zip(cells, shapes, color_idx):
        large = n == 1 and cell == 4 and (big or rng.random() < 0.5)  # a lone centred shape may be large
        r = min(cw, ch) * (rng.uniform(0.9, 1.3) if large else rng.uniform(0.28, 0.46))
        # Jitter the centre inside its cell but keep the shape within the cell (or image, if big).
        slack = max(0.0, min(cw, ch) / 2 - r) if not large else 0.0
        cx = (cell % 3 + 0.5) * cw + rng.uniform(-slack, slack)
        cy = (cell // 3 + 0.5) * ch + rng.uniform(-slack, slack)
        objs.append(Obj(SHAPES[s], colors[c], int(cell), float(cx), float(cy), float(r), (0, 0, 0)))
    for o in objs:
        o.rgb = _jitter(rng, o.color)
    return objs


def render_shapes(rng: np.random.Generator, n: int, unique: bool = True, big: bool = False
                  ) -> tuple[Image.Image, list[Obj]]:
    """Image with n (1-4) non-overlapping shapes; objects are returned in reading order."""
    w, h = _image_size(rng)
    tone, colors = _tone(rng)
    objs = pick_objects(rng, n, unique, w, h, colors, big)
    bg = background(rng, w, h, tone)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(draw, o.shape, o.cx, o.cy, o.r, o.rgb)
    return img, objs


def render_text(rng: np.random.Generator, text: str, boxes: bool = False):
    """`text` in a random font, size, colour and place; the text always fits inside the image. With `boxes`,
    returns (image, [(char, (x0, y0, x1, y1)) per character]) (draws no extra randomness, so the image is the
    same either way)."""
    w, h = _image_size(rng)
    tone, colors = _tone(rng)
    colors = tuple(c for c in colors if c != "gray")  # thin strokes need more contrast than shapes
    rgb = _jitter(rng, colors[rng.integers(len(colors))])
    bg = background(rng, w, h, tone)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    font_name = FONTS[rng.integers(len(FONTS))]
    size = int(rng.integers(18, 61))
    while True:  # shrink until it fits with a margin
        font = _font(font_name, size)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if (x1 - x0 <= w - 12 and y1 - y0 <= h - 12) or size <= 10:
            break
        size -= 4
    x = rng.integers(6, max(7, w - 6 - (x1 - x0))) - x0
    y = rng.integers(6, max(7, h - 6 - (y1 - y0))) - y0
    draw.text((int(x), int(y)), text, fill=rgb, font=font)
    if not boxes:
        return img
    return img, [(ch, draw.textbbox((int(x) + draw.textlength(text[:i], font=font), int(y)), ch, font=font))
                 for i, ch in enumerate(text)]


# ---------------------------------------------------------------- video

MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "growing", "shrinking")


def render_video(rng: np.random.Generator, motion: str, big: bool = False) -> tuple[np.ndarray, float, Obj]:
    """One shape that moves (left/right/up/down) or changes size over a 2-4 s clip at 2 fps (`big`: a moving
    shape about 1.7x larger, the easy end of the training curriculum).

    Returns (uint8 frames (T,H,W,3), fps, object at its first frame)."""
    fps = 2.0
    t = int(rng.integers(2, 5)) * 2  # 2, 3 or 4 s; even T suits temporal patches of 2 frames
    w, h = (int(v) for v in rng.integers(0, 3, 2) * 16 + 96)  # 96..128, even for yuv420p
    tone, colors = _tone(rng)
    color = colors[rng.integers(len(colors))]
    obj = Obj(SHAPES[rng.integers(len(SHAPES))], color, 4, 0.0, 0.0, 0.0, _jitter(rng, color))
    m = min(w, h)
    if motion in ("growing", "shrinking"):
        r0, r1 = m * rng.uniform(0.08, 0.14), m * rng.uniform(0.3, 0.42)
        if motion == "shrinking":
            r0, r1 = r1, r0
        cx0 = cx1 = w / 2 + rng.uniform(-0.05, 0.05) * w
        cy0 = cy1 = h / 2 + rng.uniform(-0.05, 0.05) * h
    else:
        r0 = r1 = m * rng.uniform(0.1, 0.18) * (1.7 if big else 1.0)
        lo_x, hi_x, lo_y, hi_y = r0 + 2, w - r0 - 2, r0 + 2, h - r0 - 2
        # Travel at least half the free span so the direction is obvious even after subsampling.
        a, b = rng.uniform(0.0, 0.2), rng.uniform(0.8, 1.0)
        if motion in ("left", "right"):
            cy0 = cy1 = rng.uniform(lo_y, hi_y)
            cx0, cx1 = lo_x + a * (hi_x - lo_x), lo_x + b * (hi_x - lo_x)
            if motion == "left":
                cx0, cx1 = cx1, cx0
        else:
            cx0 = cx1 = rng.uniform(lo_x, hi_x)
            cy0, cy1 = lo_y + a * (hi_y - lo_y), lo_y + b * (hi_y - lo_y)
            if motion == "up":
                cy0, cy1 = cy1, cy0
    obj.cx, obj.cy, obj.r = cx0, cy0, r0
    bg = background(rng, w, h, tone)
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        f = i / (t - 1)
        img = Image.fromarray(bg)
        draw_shape(ImageDraw.Draw(img), obj.shape, cx0 + f * (cx1 - cx0), cy0 + f * (cy1 - cy0),
                   r0 + f * (r1 - r0), obj.rgb)
        frames[i] = np.asarray(img)
    return frames, fps, obj


# ---------------------------------------------------------------- robustness transforms (eval)

def jpeg_resize(img: Image.Image, quality: int = 50, scale: float = 1.0) -> Image.Image:
    """Rescale by `scale` (bilinear; the result keeps the new size) then JPEG round-trip at `quality`."""
    if scale != 1.0:
        img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                         Image.BILINEAR)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _video_codec() -> str:
    import av
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(video: dict, crf: int = 28) -> bytes:
    """A video dict as MP4 bytes (H.264 or MPEG-4 Part 2, yuv420p; AAC audio if present). Odd frame sizes are
    cropped to even ones (yuv420p)."""
    import av
    from fractions import Fraction

    frames = np.asarray(video["frames"])
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    fps = Fraction(video["fps"]).limit_denominator(1000)
    audio = video.get("audio")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        codec = _video_codec()
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            vs.bit_rate = 400_000
        as_ = out.add_stream("aac", rate=SR, layout="mono") if audio is not None else None
        for f in frames[:, :h, :w]:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(vs.encode())
        if as_ is not None:
            _mux_audio(out, as_, audio)
    return buf.getvalue()


def mp4_roundtrip(video: dict, crf: int = 28) -> dict:
    """`encode_mp4` then decode back into the same dict format (what a user's MP4 upload goes through)."""
    import av

    audio = video.get("audio")
    dec_frames, dec_audio = [], None
    with av.open(io.BytesIO(encode_mp4(video, crf))) as inp:
        for fr in inp.decode(video=0):
            dec_frames.append(fr.to_ndarray(format="rgb24"))
        if audio is not None:
            dec_audio = _decode_audio(inp, len(audio))
    return {"frames": np.stack(dec_frames)[:len(video["frames"])], "fps": float(video["fps"]), "audio": dec_audio}


def _mux_audio(container, stream, audio: np.ndarray) -> None:
    """Encode 16 kHz mono float32 `audio` into `stream` of `container`, flushing the encoder at the end.
    Encoders with a fixed frame size (AAC, Opus, Vorbis) need that many samples per frame: a resampler cuts them."""
    import av
    frame = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = SR
    resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=stream.rate,
                                  frame_size=stream.frame_size or None)
    pts = 0
    for chunk in resampler.resample(frame) + resampler.resample(None):
        chunk.pts, pts = pts, pts + chunk.samples  # explicit pts so encoders report their priming delay
        container.mux(stream.encode(chunk))
    container.mux(stream.encode())


def _decode_audio(container, n: int) -> np.ndarray:
    """Decode the first audio stream to 16 kHz mono float32, trimmed or zero-padded to n samples."""
    import av
    container.seek(0)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
    parts = []
    for fr in container.decode(audio=0):
        parts.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(fr))
    parts.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    out = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    out = out[:n]
    return np.pad(out, (0, n - len(out)))
