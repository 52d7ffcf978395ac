"""encoders.media: decoding of files the tests write themselves (Pillow, PyAV, `wave`), and the
user-facing MediaError messages for broken input."""
from __future__ import annotations

import wave

import av
import numpy as np
import pytest
from PIL import Image

from encoders.media import MediaError, load_audio, load_image
from encoders.video import Video, load_video, sample_frame_indices
from encoders.preprocess import image_patches, smart_resize

SINE_HZ, AMP = 440.0, 0.5
SINE_RMS = AMP / np.sqrt(2)


def sine(rate: int, secs: float) -> np.ndarray:
    return (AMP * np.sin(2 * np.pi * SINE_HZ * np.arange(int(rate * secs)) / rate)).astype(np.float32)


def check_sine(x: np.ndarray, secs: float, tol_s: float = 0.03, sr: int = 16000) -> None:
    """Mono float32 at 16 kHz, right length, carries the 440 Hz tone at the right level."""
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - secs * sr) <= tol_s * sr, (x.size, secs * sr)
    mid = x[x.size // 4: 3 * x.size // 4]
    assert abs(np.sqrt(np.mean(mid ** 2)) - SINE_RMS) < 0.02
    spec = np.abs(np.fft.rfft(mid))
    assert abs(np.argmax(spec) * sr / mid.size - SINE_HZ) < 5


# ------------------------------------------------------------------------------------ file makers

def write_wav(path, rate: int, secs: float, width: int, channels: int = 1) -> None:
    x = np.repeat(sine(rate, secs)[:, None], channels, axis=1)  # (n, ch) interleaved
    if width == 1:
        data = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 2:
        data = np.round(x * 32767).astype("<i2").tobytes()
    else:  # 24-bit little endian: low 3 bytes of int32
        v = np.round(x * (2 ** 23 - 1)).astype("<i4").reshape(-1, 1).view(np.uint8)[:, :3]
        data = v.tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(width), w.setframerate(rate)
        w.writeframes(data)


def encode_audio(path, fmt: str, codec: str, rate: int, secs: float, channels: int = 2, **opts) -> None:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, options=opts or None)
        s.layout = "stereo" if channels == 2 else "mono"
        _mux_audio(c, s, np.repeat(sine(rate, secs)[None], channels, axis=0), rate)


def _mux_audio(c, s, x: np.ndarray, rate: int) -> None:
    """x (ch, n) float32 into audio stream s, in codec-sized frames."""
    step = s.codec_context.frame_size or 1024
    for i in range(0, x.shape[1], step):
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + step]), format="fltp", layout=s.layout.name)
        f.sample_rate, f.pts = rate, i
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode(None):
        c.mux(p)


def gray(i: int, step: int = 3) -> int:
    return 20 + step * i  # frame i is a flat image of this level: identifies frames after lossy coding


def encode_video(path, fmt: str, codec: str, n_frames: int, fps: int = 25, audio: str | None = None,
                 size=(64, 48), step: int = 3, noise: bool = False, **opts) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt, options=opts or None) as c:
        v = c.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        a = c.add_stream(audio, rate=48000) if audio else None
        if a is not None:
            a.layout = "mono"
        for i in range(n_frames):
            img = np.full((size[1], size[0], 3), gray(i, step), np.uint8)
            if noise:  # incompressible frames, so that cutting the file cuts frames
                img = rng.integers(0, 256, img.shape, dtype=np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        if a is not None:
            _mux_audio(c, a, sine(48000, n_frames / fps)[None], 48000)


def write_frameless_video(path) -> None:
    """A Matroska file whose video track holds no frame, beside 0.5 s of sound."""
    with av.open(str(path), "w", format="matroska") as c:
        v = c.add_stream("mpeg4", rate=25)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("flac", rate=48000)
        a.layout = "mono"
        _mux_audio(c, a, sine(48000, 0.5)[None], 48000)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_wav(d / "u8.wav", 8000, 1.0, 1)
    write_wav(d / "s16.wav", 44100, 1.0, 2)
    write_wav(d / "s24.wav", 48000, 1.0, 3)
    write_wav(d / "six.wav", 22050, 1.0, 2, channels=6)
    write_wav(d / "empty.wav", 16000, 0.0, 2)
    encode_audio(d / "a.mp3", "mp3", "libmp3lame", 44100, 1.0)
    encode_audio(d / "a.opus", "ogg", "libopus", 48000, 1.0)
    encode_audio(d / "a.ogg", "ogg", "vorbis", 44100, 1.0, strict="experimental")
    encode_audio(d / "a.flac", "flac", "flac", 44100, 1.0)
    encode_audio(d / "a.m4a", "ipod", "aac", 44100, 1.0)
    encode_audio(d / "a.webm", "webm", "libopus", 48000, 1.0)
    encode_video(d / "v.mp4", "mp4", "libx264", 75)                     # 3 s, no sound
    encode_video(d / "v.webm", "webm", "libvpx", 20, fps=10, audio="libopus", step=10)  # 2 s, vp8 + opus
    encode_video(d / "v9.webm", "webm", "libvpx-vp9", 10)
    encode_video(d / "v.avi", "avi", "mpeg4", 3)                        # 3 frames only
    encode_video(d / "one.mkv", "matroska", "mpeg4", 1)
    encode_video(d / "noise.webm", "webm", "libvpx", 20, fps=10, noise=True)
    encode_video(d / "front.mp4", "mp4", "libx264", 50, noise=True, movflags="faststart")  # index first
    write_frameless_video(d / "zero.mkv")                               # video track, 0 frames
    return d


# ------------------------------------------------------------------------------------------ audio

@pytest.mark.parametrize("name", ["u8.wav", "s16.wav", "s24.wav", "six.wav", "a.mp3", "a.opus", "a.ogg",
                                  "a.flac", "a.m4a", "a.webm"])
def test_audio_formats_decode_to_16k_mono(media, name):
    check_sine(load_audio(media / name), 1.0)


def test_audio_from_bytes_and_lying_extension(media, tmp_path):
    check_sine(load_audio((media / "a.flac").read_bytes()), 1.0)
    liar = tmp_path / "really_flac.mp3"
    liar.write_bytes((media / "a.flac").read_bytes())
    check_sine(load_audio(liar), 1.0)


def test_audio_other_rate(media):
    x = load_audio(media / "s16.wav", sr=24000)
    check_sine(x, 1.0, sr=24000)


@pytest.mark.parametrize("dtype,scale,offset", [(np.int16, 32767, 0), (np.int32, 2 ** 31 - 1, 0),
                                                (np.uint8, 127, 128), (np.float32, 1, 0)])
def test_audio_tuple_input(dtype, scale, offset):
    x = sine(44100, 1.0)
    stereo = np.stack([x, x], axis=1) * scale + offset  # (n, 2) as Gradio gives it
    check_sine(load_audio((44100, np.round(stereo).astype(dtype) if dtype != np.float32 else stereo.astype(dtype))), 1.0)


def test_audio_bare_array_is_16k():
    x = sine(16000, 0.5)
    assert np.array_equal(load_audio(x), x)


def test_audio_bad_inputs(media, tmp_path):
    with pytest.raises(MediaError, match=r"'empty\.wav'.*(empty|zero length)"):
        load_audio(media / "empty.wav")
    with pytest.raises(MediaError, match="empty"):
        load_audio(b"")
    with pytest.raises(MediaError, match="zero length"):
        load_audio((16000, np.zeros(0, np.int16)))
    with pytest.raises(MediaError, match=r"'v\.mp4' contains no audio track"):
        load_audio(media / "v.mp4")
    junk = tmp_path / "song.mp3"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match=r"'song\.mp3'.*(corrupt|not a supported)"):
        load_audio(junk)
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(MediaError, match="NaN"):
        load_audio((16000, np.array([0.0, np.nan], np.float32)))
    # a float WAV whose samples are NaN or infinite (the fuzzing's case: it used to give an empty answer)
    for bad in (np.nan, np.inf):
        wav = tmp_path / "float.wav"
        with av.open(str(wav), "w", format="wav") as c:
            stream = c.add_stream("pcm_f32le", rate=16000, layout="mono")
            frame = av.AudioFrame.from_ndarray(np.full((1, 1600), bad, np.float32), format="flt", layout="mono")
            frame.sample_rate = 16000
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                c.mux(packet)
        with pytest.raises(MediaError, match=r"'float\.wav' contains invalid samples \(NaN or infinity\)"):
            load_audio(wav)


# ------------------------------------------------------------------------------------------ video

def frame_ids(v: Video, step: int = 3) -> list[int]:
    return [int(round((f.mean() - 20) / step)) for f in v.frames]


def test_video_mp4_sampling(media):
    v = load_video(media / "v.mp4")  # 75 frames at 25 fps = 3 s -> 6 frames at 2 fps
    assert v.frames.shape == (6, 48, 64, 3) and v.frames.dtype == np.uint8
    assert frame_ids(v) == [0, 15, 30, 44, 59, 74] == sample_frame_indices(75, 25.0).tolist()
    assert v.total_frames == 75 and v.native_fps == 25.0 and v.duration == pytest.approx(3.0)
    assert v.fps == pytest.approx(2.0) and v.seconds_per_frame == pytest.approx(0.5)
    assert np.allclose(v.timestamps, np.array([0, 15, 30, 44, 59, 74]) / 25.0, atol=1e-6)
    assert v.audio is None and not v.has_audio_track
    assert load_video(media / "v.mp4", with_audio=True).audio is None  # no track: caller decides


def test_video_webm_with_audio_and_bytes(media):
    v = load_video((media / "v.webm").read_bytes(), with_audio=True)
    assert v.has_audio_track and v.audio_error is None
    check_sine(v.audio, 2.0, tol_s=0.05)
    assert v.frames.shape == (4, 48, 64, 3)  # 2 s * 2 fps = 4
    assert frame_ids(v, step=10) == sample_frame_indices(20, 10.0).tolist() == [0, 6, 13, 19]


def test_video_fps_and_frame_limits(media):
    assert load_video(media / "v9.webm").num_frames == 4           # 0.4 s: raised to min_frames
    assert load_video(media / "v.mp4", fps=25.0, max_frames=8).num_frames == 8
    assert load_video(media / "v.avi").num_frames == 2            # 3 frames: floored to even
    assert load_video(media / "one.mkv").num_frames == 1          # patcher pads T itself


def test_sample_frame_indices_rule():
    assert sample_frame_indices(300, 30.0, fps=1.0).tolist() == np.round(np.linspace(0, 299, 10)).tolist()
    assert len(sample_frame_indices(30 * 3600, 30.0)) == 768      # 1 h at 2 fps, capped
    assert len(sample_frame_indices(31, 30.0, fps=2.0)) == 4      # 2.07 -> min 4
    assert len(sample_frame_indices(100, 25.0, fps=2.5)) == 10


def test_video_bad_inputs(media, tmp_path):
    with pytest.raises(MediaError, match=r"'zero\.mkv' has no frames"):
        load_video(media / "zero.mkv")
    with pytest.raises(MediaError, match=r"'a\.flac' contains no video track"):
        load_video(media / "a.flac")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes((media / "v.mp4").read_bytes()[:600])  # moov atom lost
    with pytest.raises(MediaError, match=r"'cut\.mp4'.*corrupt"):
        load_video(cut)


def test_video_truncated_keeps_what_decodes(media, tmp_path):
    data = (media / "noise.webm").read_bytes()  # webm has no frame count: packets are counted
    v = load_video(data[: len(data) * 7 // 10])
    assert 10 <= v.total_frames < 20 and v.num_frames == 4
    data = (media / "front.mp4").read_bytes()   # header says 50 frames, fewer decode
    v = load_video(data[: len(data) // 2])
    assert 10 <= v.total_frames < 50 and v.num_frames == 4
    assert v.duration == pytest.approx(v.total_frames / 25) and v.timestamps[-1] < v.duration


# ------------------------------------------------------------------------------------------ images

def _pattern(w=40, h=30) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (200, 30, 30)
    a[:, w // 2:] = (30, 30, 200)
    return Image.fromarray(a)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_image_formats(tmp_path, fmt, ext):
    p = tmp_path / f"x.{ext}"
    _pattern().save(p, fmt)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert abs(int(img.getpixel((5, 5))[0]) - 200) < 12 and abs(int(img.getpixel((35, 5))[2]) - 200) < 12
    assert load_image(p.read_bytes()).size == (40, 30)


def test_image_alpha_and_palette_on_white(tmp_path):
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 0], a[:5, :, 3], a[5:, :, 3] = 255, 0, 128
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((0, 9)) == (255, 127, 127)
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_image_modes(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", "JPEG")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((3, 3))
    assert r > 200 and g < 50 and b < 50
    Image.fromarray(np.full((6, 8), 65535, np.uint16)).save(tmp_path / "i16.png")
    assert load_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (5, 5), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(Image.new("1", (5, 5), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_image_exif_rotation(tmp_path):
    img = _pattern(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    assert out.getpixel((10, 5))[0] > 150  # left (red) half of the stored image is now on top


def test_image_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(tmp_path / "a.gif").getpixel((4, 4)) == (255, 0, 0)


def test_image_arrays():
    a = np.zeros((6, 8, 3), np.uint8)
    a[..., 1] = 90
    assert load_image(a).getpixel((0, 0)) == (0, 90, 0)
    assert load_image(a.transpose(2, 0, 1)).size == (8, 6)                   # CHW
    assert load_image(np.full((6, 8), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(MediaError, match="shape"):
        load_image(np.zeros((2, 3, 5, 7), np.uint8))


def test_image_extension_lies(tmp_path):
    p = tmp_path / "photo.jpg"
    _pattern().save(p, "PNG")
    assert load_image(p).size == (40, 30)


def test_image_bad_inputs(tmp_path):
    _pattern(200, 200).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"'cut\.jpg'.*truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")
    (tmp_path / "notes.png").write_text("hello, not an image")
    with pytest.raises(MediaError, match=r"'notes\.png' is not an image format"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(MediaError, match="upload is empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_image_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "warn.png")    # 1600 px: between 1x and 2x the limit
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")  # 10000 px: Pillow's hard error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("warn.png", "bomb.png"):
        with pytest.raises(MediaError, match=rf"'{name}' is too large.*downscale"):
            load_image(tmp_path / name)


def test_tiny_and_elongated_images_rejected_at_resize(tmp_path):
    kw = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056)
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(MediaError, match=r"1x1 pixels, too small.*at least 4 pixels"):
        image_patches(load_image(tmp_path / "dot.png"), **kw)
    with pytest.raises(MediaError, match=r"201:1.*at most 200:1.*crop"):
        image_patches(load_image(Image.new("RGB", (1005, 5))), **kw)
    pv, grid = image_patches(load_image(Image.new("RGB", (1000, 5))), **kw)  # exactly 200:1 is allowed
    assert grid.tolist() == [[1, 2, 58]] and pv.shape == (116, 1176)
    assert smart_resize(5, 1000, 28, 3136, 12845056) == (28, 812)


def test_probe(media):
    from encoders.video import probe
    info = probe(media / "v.webm")
    assert info.has_video and info.has_audio and (info.width, info.height) == (64, 48)
    assert info.duration == pytest.approx(2.0, abs=0.1) and info.native_fps == 10.0
    info = probe(media / "a.flac")
    assert not info.has_video and info.has_audio and info.duration == pytest.approx(1.0, abs=0.05)
    with pytest.raises(MediaError, match="not a media file"):
        probe(b"\x00garbage" * 10)


def test_content_hash_follows_the_bytes_not_the_path(tmp_path):
    """A web client re-uploads the same file every turn (a new copy, a new mtime): the cached state must still
    match, and a different file at the same path must not."""
    import os

    from qwen_omni.engine.processor import content_hash

    a, b = tmp_path / "a.png", tmp_path / "copy" / "b.png"
    b.parent.mkdir()
    a.write_bytes(b"\x89PNG same bytes")
    b.write_bytes(b"\x89PNG same bytes")
    os.utime(b, (1, 1))
    assert content_hash(a) == content_hash(str(b))
    a.write_bytes(b"\x89PNG other bytes")
    assert content_hash(a) != content_hash(b)
