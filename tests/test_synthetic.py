"""Tests for the synthetic world generator: determinism, sample validity, split disjointness, answer
normalisation, render fidelity (colours, positions, motion, beep counts) and the eval's codec helpers."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwen_omni.synthetic import audio as sa
from qwen_omni.synthetic import media as sm
from qwen_omni.synthetic.tasks import TASKS, Sample, iter_samples, make_sample, normalize_answer, text_parts
from qwen_omni.synthetic.templates import CHITCHAT, REFUSAL_PROMPTS, TEMPLATES, TRAIN_PREFIXES, TRAIN_SUFFIXES

needs_espeak = pytest.mark.skipif(sa.ESPEAK is None,
                                  reason="espeak-ng CLI not installed (apt-get install espeak-ng)")
NO_SPEECH = tuple(t for t in TASKS if t not in ("spoken_word", "transcript"))
ANSWERS = {
    "colour": set(sm.COLORS), "shape": set(sm.SHAPES), "position": set(sm.POSITIONS),
    "count": {"1", "2", "3", "4"}, "number": {str(i) for i in range(1000)}, "text": set(sm.WORDS),
    "beep_count": {"1", "2", "3", "4", "5"}, "pitch": {"high", "low"}, "video_direction": set(sm.MOTIONS),
    "video_beeps": {"1", "2", "3", "4"}, "spoken_word": set(sa.SPOKEN_WORDS),
}


def _tasks():
    return TASKS if sa.ESPEAK else NO_SPEECH


def _key(x):
    """Byte-exact fingerprint of a sample's contents."""
    if isinstance(x, Image.Image):
        return ("img", x.mode, x.size, x.tobytes())
    if isinstance(x, np.ndarray):
        return ("arr", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, dict):
        return tuple((k, _key(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return tuple(_key(v) for v in x)
    return x


def _fp(s: Sample):
    return (s.task, _key(s.messages), s.answer)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_deterministic_by_seed(split):
    for task in _tasks():
        assert _fp(make_sample(task, 123, split)) == _fp(make_sample(task, 123, split)), task
    differ = sum(_fp(make_sample(t, 1, split)) != _fp(make_sample(t, 2, split)) for t in NO_SPEECH)
    assert differ >= len(NO_SPEECH) - 2  # chitchat may collide by chance


def test_iter_samples_deterministic_and_weighted():
    a = [_fp(s) for _, s in zip(range(20), iter_samples(5, tasks=NO_SPEECH))]
    b = [_fp(s) for _, s in zip(range(20), iter_samples(5, tasks=NO_SPEECH))]
    assert a == b
    only = [s.task for _, s in zip(range(30), iter_samples(0, tasks=("count", "pitch"), weights=[1, 0]))]
    assert set(only) == {"count"}


def _check_part(part: dict):
    kind = part["type"]
    if kind == "text":
        assert isinstance(part["text"], str) and part["text"].strip()
    elif kind == "image":
        img = part["image"]
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert 128 <= img.width <= 224 and 128 <= img.height <= 224
    elif kind == "audio":
        sr, x = part["audio"]
        assert sr == 16000 and x.dtype == np.float32 and x.ndim == 1 and 0.2 * sr < len(x) < 6 * sr
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    elif kind == "video":
        v = part["video"]
        f = v["frames"]
        assert f.dtype == np.uint8 and f.ndim == 4 and f.shape[3] == 3 and 4 <= f.shape[0] <= 8
        assert 96 <= f.shape[1] <= 128 and f.shape[1] % 2 == 0 and f.shape[2] % 2 == 0 and v["fps"] == 2.0
        if v["audio"] is not None:
            assert v["audio"].dtype == np.float32 and len(v["audio"]) == round(f.shape[0] / v["fps"] * 16000)
        if part.get("use_audio_in_video"):
            assert v["audio"] is not None
    else:
        raise AssertionError(f"unknown part type {kind}")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_task_valid(split):
    for task in _tasks():
        for seed in range(6):
            s = make_sample(task, seed, split)
            assert s.task == task and isinstance(s.answer, str) and s.answer
            assert s.messages[-1]["role"] == "user"
            for m in s.messages:
                if m["role"] == "assistant":
                    assert isinstance(m["content"], str)
                else:
                    assert m["content"][-1]["type"] == "text"
                    for part in m["content"]:
                        _check_part(part)
            if task in ANSWERS:
                assert s.answer in ANSWERS[task], (task, s.answer)
            if task == "video_beeps":
                assert s.messages[0]["content"][0].get("use_audio_in_video") is True
            if task == "followup":
                roles = [m["role"] for m in s.messages]
                assert roles == ["user", "assistant", "user"] and s.messages[0]["content"][0]["type"] == "image"
            if task == "refusal":
                assert s.answer.startswith("I can only")


def test_unknown_task_and_split_rejected():
    with pytest.raises(ValueError):
        make_sample("nope", 0)
    with pytest.raises(ValueError):
        make_sample("count", 0, "test")


def _norm_template(t: str) -> str:
    return re.sub(r"[^\w\s{}]", "", t.lower()).strip()


def test_heldout_wording_disjoint_from_train():
    pools = list(TEMPLATES.values()) + [p for p, _ in CHITCHAT.values()] + list(REFUSAL_PROMPTS.values())
    train_all = {_norm_template(t) for p in pools for t in p["train"]}
    held_all = {_norm_template(t) for p in pools for t in p["heldout"]}
    assert not train_all & held_all
    assert all(p["train"] and p["heldout"] for p in pools)
    # Slot-free questions seen in train samples never match a held-out template.
    held_plain = {normalize_answer(t) for t in held_all if "{" not in t}
    for task in ("count", "number", "text", "beep_count", "pitch", "chitchat", "refusal", "caption"):
        for seed in range(20):
            q = make_sample(task, seed, "train").messages[-1]["content"][-1]["text"]
            assert normalize_answer(q) not in held_plain, (task, q)


def test_heldout_voices_and_speeds_disjoint():
    assert not set(sa.TRAIN_VOICES) & set(sa.HELDOUT_VOICES)
    assert not set(sa.TRAIN_SPEEDS) & set(sa.HELDOUT_SPEEDS)
    accents = lambda vs: {v.split("+")[0] for v in vs}  # noqa: E731
    variants = lambda vs: {v.split("+")[1] for v in vs if "+" in v}  # noqa: E731
    assert not accents(sa.TRAIN_VOICES) & accents(sa.HELDOUT_VOICES)
    assert not variants(sa.TRAIN_VOICES) & variants(sa.HELDOUT_VOICES)


def test_surface_variation_present():
    qs = [make_sample("colour", s).messages[-1]["content"][-1]["text"] for s in range(80)]
    assert any("colour" in q.lower() for q in qs) and any("color" in q.lower() for q in qs)
    assert any(q == q.lower() for q in qs) and any(not q.endswith(("?", ".")) for q in qs)
    # words around the question: train samples only (held-out samples are exactly what they were before)
    starts = tuple(p.lower() for p in TRAIN_PREFIXES)
    ends = tuple(x.lower().rstrip("?.!") for x in TRAIN_SUFFIXES)
    def wrapped(q):
        return q.lower().startswith(starts) or q.lower().rstrip("?.!").endswith(ends)
    assert sum(map(wrapped, qs)) >= 10
    held = [make_sample(t, s, "heldout").messages[-1]["content"][-1]["text"] for t in ("colour", "count")
            for s in range(60)]
    assert not any(map(wrapped, held))


@pytest.mark.parametrize("raw,norm", [
    ("Red.", "red"), ("  The Circle! ", "circle"), ("Three", "3"), ("top-left", "top left"),
    ("Centre", "center"), ("grey", "gray"), ("It's a GREY square", "it s gray square"),
    ("412", "412"), ("an orange star in the middle", "orange star in center"), ("seven", "7"),
    ("Upper Right", "top right"), ("three high beeps", "3 high beeps"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_render_colours_positions_distinguishable():
    pal = {c: np.array(v, float) for c, v in sm.PALETTE.items()}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        img, objs = sm.render_shapes(rng, int(rng.integers(1, 5)), unique=seed % 2 == 0)
        arr = np.asarray(img, float)
        for o in objs:
            mask = Image.new("L", img.size, 0)
            sm.draw_shape(ImageDraw.Draw(mask), o.shape, o.cx, o.cy, o.r, 255)
            m = np.asarray(mask) > 0
            assert m.sum() > 50
            mean = arr[m].mean(axis=0)
            assert np.abs(mean - pal[o.color]).max() <= sm.COLOR_JITTER + 1
            assert min(pal, key=lambda c: np.linalg.norm(pal[c] - mean)) == o.color
            # The shape stands out from the background just outside its cell-bounded box.
            ring = np.zeros_like(m)
            y0, y1 = max(0, int(o.cy - o.r) - 3), int(o.cy + o.r) + 4
            x0, x1 = max(0, int(o.cx - o.r) - 3), int(o.cx + o.r) + 4
            ring[y0:y1, x0:x1] = True
            ring &= ~m
            assert np.linalg.norm(arr[ring].mean(axis=0) - mean) > 40
            col, row = min(2, int(3 * o.cx / img.width)), min(2, int(3 * o.cy / img.height))
            assert sm.POSITIONS[row * 3 + col] == o.position


def test_video_motion_matches_label():
    for seed, motion in enumerate(sm.MOTIONS * 2):
        frames, fps, obj = sm.render_video(np.random.default_rng(seed), motion)
        masks = np.abs(frames.astype(int) - np.array(obj.rgb)).max(axis=3) <= 2
        area = masks.sum(axis=(1, 2))
        ys, xs = [np.array([np.nonzero(m)[i].mean() for m in masks]) for i in (0, 1)]
        delta = {"left": -(xs[-1] - xs[0]), "right": xs[-1] - xs[0], "up": -(ys[-1] - ys[0]),
                 "down": ys[-1] - ys[0], "growing": area[-1] / area[0] - 1, "shrinking": area[0] / area[-1] - 1}
        assert delta[motion] > (1.0 if motion in ("growing", "shrinking") else 20), (motion, delta[motion])


def _count_bursts(x: np.ndarray) -> int:
    """Beeps = loud stretches of a 10 ms envelope, ignoring dips under 50 ms (beep gaps are >= 120 ms)."""
    env = np.convolve(np.abs(x), np.ones(160) / 160, mode="same")
    on = np.flatnonzero(env > 0.5 * env.max())
    return int(len(on) > 0) + int(np.sum(np.diff(on) > 800))


def test_beeps_count_and_pitch():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        count, high, long = int(rng.integers(1, 6)), bool(seed % 2), bool(seed % 3 == 0)
        x = sa.beeps(rng, count, high, long)
        assert _count_bursts(x) == count
        spec = np.abs(np.fft.rfft(x))
        peak = np.fft.rfftfreq(len(x), 1 / 16000)[spec.argmax()]
        assert (peak >= 900) == high
    clip = sa.beeps(np.random.default_rng(0), 4, True, False, total_s=2.0)
    assert len(clip) == 32000 and _count_bursts(clip) == 4


def test_resample_exact_ratio_and_band_limited():
    t = np.arange(22050) / 22050
    y = sa.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 22050, 16000)
    assert len(y) == 16000
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(y[100:-100] - ref[100:-100]).max() < 0.02
    hi = sa.resample(np.sin(2 * np.pi * 10000 * t).astype(np.float32), 22050, 16000)  # above new Nyquist
    assert np.abs(hi[100:-100]).max() < 0.05


@needs_espeak
def test_espeak_word_and_spoken_sample():
    pcm = sa.espeak_word("seven", sa.TRAIN_VOICES[0], sa.TRAIN_SPEEDS[0], sa.PITCHES[0])
    assert pcm.dtype == np.int16 and 0.2 * 16000 < len(pcm) < 1.5 * 16000 and not pcm.flags.writeable
    assert sa.espeak_word("seven", sa.TRAIN_VOICES[0], sa.TRAIN_SPEEDS[0], sa.PITCHES[0]) is pcm  # cached
    other = sa.espeak_word("seven", sa.HELDOUT_VOICES[0], sa.HELDOUT_SPEEDS[0], sa.PITCHES[0])
    assert other.tobytes() != pcm.tobytes()
    s = make_sample("spoken_word", 3, "heldout")
    assert s.answer in sa.SPOKEN_WORDS and s.messages[-1]["content"][0]["type"] == "audio"


def test_jpeg_resize():
    img, _ = sm.render_shapes(np.random.default_rng(0), 2)
    out = sm.jpeg_resize(img, quality=30, scale=0.5)
    assert out.mode == "RGB" and out.size == (round(img.width / 2), round(img.height / 2))
    same = sm.jpeg_resize(img, quality=95)
    assert np.abs(np.asarray(same, int) - np.asarray(img, int)).mean() < 3


@pytest.mark.parametrize("codec", ["mp3", "ogg"])
def test_audio_codec_roundtrip(codec):
    x = sa.beeps(np.random.default_rng(1), 3, False, True)
    y = sa.codec_roundtrip(x, codec)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.corrcoef(x, y)[0, 1] > 0.95  # aligned: codec delay is removed
    assert _count_bursts(y) == 3


def test_mp4_roundtrip():
    s = make_sample("video_beeps", 4)
    v = s.messages[-1]["content"][0]["video"]
    out = sm.mp4_roundtrip(v)
    assert out["frames"].shape == v["frames"].shape and out["frames"].dtype == np.uint8 and out["fps"] == v["fps"]
    assert np.abs(out["frames"].astype(int) - v["frames"].astype(int)).mean() < 8
    assert out["audio"].shape == v["audio"].shape and np.corrcoef(out["audio"], v["audio"])[0, 1] > 0.9
    assert _count_bursts(out["audio"]) == int(s.answer)


def test_easy_samples_for_the_curriculum():
    """easy=True: one object (large and centred unless its position is asked), a larger moving shape; still a
    valid, deterministic sample, and an easy-share of 0 leaves the stream's samples as they were."""
    for seed in range(6):
        s = make_sample("colour", seed, "train", easy=True)
        assert s.meta["n_objects"] == 1 and s.answer in ANSWERS["colour"]
        assert make_sample("colour", seed, "train", easy=True).answer == s.answer
        img = np.asarray(s.messages[0]["content"][0]["image"], dtype=np.int16)
        bg = img[0, 0]
        covered = (np.abs(img - bg).sum(-1) > 60).mean()
        assert covered > 0.1, covered  # a large shape, not a needle (a normal one covers 1-5%)
        assert make_sample("position", seed, "train", easy=True).meta["n_objects"] == 1
    frames_easy = make_sample("video_direction", 1, "train", easy=True).messages[0]["content"][0]["video"]["frames"]
    frames = make_sample("video_direction", 1, "train").messages[0]["content"][0]["video"]["frames"]
    assert frames_easy.shape[1:] == frames.shape[1:]
    # the stream's easy share is read per sample: at 1.0 every colour question shows one large object, at 0.0
    # the usual 1-4 (these five seeds draw 3, 3, 1, 4, 3)
    a = [s.meta["n_objects"] for s, _ in zip(iter_samples(3, tasks=("colour",), easy_p=lambda: 0.0), range(5))]
    b = [s.meta["n_objects"] for s, _ in zip(iter_samples(3, tasks=("colour",), easy_p=lambda: 1.0), range(5))]
    assert b == [1] * 5 and len(a) == 5 and max(a) > 1
    easy = [make_sample("count", 2, "train", easy=True), make_sample("count", 2, "train")]
    assert easy[0].answer == easy[1].answer  # tasks that need several objects are unchanged


def test_text_parts_leave_media_out():
    """What `python -m qwen_omni.eval --failures N` prints as the question: the last user turn's text, no media."""
    s = make_sample("position", 5, "heldout")
    content = s.messages[-1]["content"]
    texts = [part["text"] for part in content if part["type"] == "text"]
    assert texts and len(texts) < len(content)  # an image part too
    assert text_parts(content) == texts
    assert text_parts("hi there") == ["hi there"]
