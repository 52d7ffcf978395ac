"""Synthetic world for training and evaluating the tiny omni model: tasks, question templates, answers.

Design: `make_sample(task, seed, split)` builds one chat-format sample on the fly from
`numpy.random.default_rng((seed, crc32(task), split))`, so it is a pure function of its arguments (same
arguments -> byte-identical media and text) and needs no dataset on disk. Media come from
`synthetic_media` (images, video) and `synthetic_audio` (beeps, espeak-ng speech). Question wording is
drawn from TRAIN or HELD-OUT paraphrase pools that share no template; the held-out pool (and the held-out
voices/speeds) measures generalisation to unseen wording and speakers. Surface noise (case, missing
punctuation, British/American spelling) is applied on top. Answers are short canonical strings, compared
after `normalize_answer`.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np

from qwen_omni.synthetic import audio as sa
from qwen_omni.synthetic import media as sm
from qwen_omni.synthetic.templates import (CAPABILITIES, CHITCHAT, REFUSAL, REFUSAL_PROMPTS, TEMPLATES,
                                           TRAIN_PREFIXES, TRAIN_SUFFIXES)

TASKS: tuple[str, ...] = (
    "colour", "shape", "count", "position", "number", "text", "beep_count", "pitch", "spoken_word",
    "video_direction", "video_beeps", "followup", "chitchat", "refusal", "caption", "transcript")
# Training-only tasks (never evaluated): several questions about one medium in one conversation.
TRAIN_ONLY: tuple[str, ...] = ("scene",)
SPLITS = ("train", "heldout")
NUMBER_WORDS = sa.DIGIT_WORDS + ("ten",)


@dataclass
class Sample:
    task: str
    messages: list[dict]  # chat format; the last message is the user turn to answer
    answer: str
    meta: dict = field(default_factory=dict)  # modality and task details, for eval breakdowns
    # For questions about one object of an image: the image's objects ("objects", renderer geometry), its size
    # ("size") and, per assistant turn, the index of the object the answer is about ("targets"; None for the
    # count). The trainer uses them to supervise where the decoder looks (`qwen_omni.train.binding`).


def text_parts(content: str | list[dict]) -> list[str]:
    """A message's text, media parts left out: a string content as is, else its "text" parts in order."""
    return [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]


# ---------------------------------------------------------------- answer normalisation

_UK_US = {"colour": "color", "colours": "colors", "grey": "gray", "centre": "center", "coloured": "colored"}
_SYNONYMS = {"middle": "center", "upper": "top", "lower": "bottom"}
_DIGITS = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(s: str) -> str:
    """Lower-case, punctuation -> space, drop articles, British -> American spelling, a few position
    synonyms, number words zero..ten -> digits, collapse whitespace."""
    out = []
    for w in re.sub(r"[^\w\s]", " ", s.lower()).split():
        w = _UK_US.get(w, w)
        w = _SYNONYMS.get(w, w)
        w = _DIGITS.get(w, w)
        if w not in _ARTICLES:
            out.append(w)
    return " ".join(out)


# ---------------------------------------------------------------- wording

_US_UK = [(re.compile(rf"\b{us}\b", re.I), uk) for us, uk in
          (("color", "colour"), ("colors", "colours"), ("gray", "grey"), ("center", "centre"))]


def _british(text: str) -> str:
    for pat, uk in _US_UK:
        text = pat.sub(lambda m, uk=uk: uk.capitalize() if m.group(0)[0].isupper() else uk, text)
    return text


def _vary(rng: np.random.Generator, text: str) -> str:
    """Surface noise a real user produces: spelling variety, case, dropped final punctuation."""
    if rng.random() < 0.5:
        text = _british(text)
    r = rng.random()
    text = text.lower() if r < 0.4 else text.upper() if r < 0.45 else text
    if rng.random() < 0.25:
        text = text.rstrip("?.!")
    return text


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _template(rng, key: str, split: str, **slots) -> str:
    t = _pick(rng, TEMPLATES[key][split]).format(**slots)
    t = t[0].upper() + t[1:]
    if split == "train":  # words around the question (drawn for train only: held-out samples stay as they were)
        r = rng.random()
        if r < 0.2:
            t = _pick(rng, TRAIN_PREFIXES) + t[0].lower() + t[1:]
        elif r < 0.35:
            t = t + _pick(rng, TRAIN_SUFFIXES)
    return t


def _where(pos: str) -> str:
    if pos == "center":
        return "in the center"
    return f"on the {pos}" if pos in ("left", "right") else f"at the {pos}"


def _ref(rng, obj: sm.Obj, n: int, by: str, attr: str) -> str:
    """Noun phrase naming obj among n objects by its 'shape', 'color' or 'position' (never by `attr`,
    the attribute asked about: "what shape is the shape?" is no question)."""
    if n == 1:
        return _pick(rng, ("the object", "the figure") if attr == "shape" else ("the shape", "the object"))
    if by == "shape":
        return f"the {obj.shape}"
    if by == "color":
        return _pick(rng, (f"the {obj.color} shape", f"the {obj.color} one", f"the {obj.color} object"))
    noun = "object" if attr == "shape" else _pick(rng, ("shape", "object"))
    return f"the {noun} {_where(obj.position)}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(o: sm.Obj) -> str:
    return f"{_article(o.color)} {o.color} {o.shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_objects(objs: list[sm.Obj]) -> str:
    return _join([f"{_noun(o)} {_where(o.position)}" for o in objs])


def beeps_transcript(count: int, high: bool, long: bool) -> str:
    kind = f"{'long' if long else 'short'} {'high' if high else 'low'}"
    return f"{NUMBER_WORDS[count]} {kind} beep{'s' * (count > 1)}"


# ---------------------------------------------------------------- media parts

def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _image(img) -> dict:
    return {"type": "image", "image": img}


def _audio(x: np.ndarray) -> dict:
    return {"type": "audio", "audio": (sm.SR, x)}


def _video(frames, fps, audio, use_audio: bool = False) -> dict:
    part = {"type": "video", "video": {"frames": frames, "fps": fps, "audio": audio}}
    if use_audio:
        part["use_audio_in_video"] = True
    return part


def number_text(rng) -> str:
    digits = int(rng.integers(1, 4))  # equal share of 1-, 2- and 3-digit numbers
    return str(int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)))


def _beep_clip(rng, max_count: int = 5) -> tuple[np.ndarray, int, bool, bool]:
    count, high, long = int(rng.integers(1, max_count + 1)), bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    return sa.beeps(rng, count, high, long), count, high, long


def _video_clip(rng, beeps: str, easy: bool = False) -> tuple[dict, str, sm.Obj, int]:
    """beeps: 'always' | 'maybe'. Returns (video dict, motion, object, beep count or 0)."""
    motion = _pick(rng, sm.MOTIONS)
    frames, fps, obj = sm.render_video(rng, motion, big=easy)
    dur, count, audio = len(frames) / fps, 0, None
    r = 0.0 if beeps == "always" else rng.random()
    if r < 0.25:
        count = int(rng.integers(1, 5))
        audio = sa.beeps(rng, count, bool(rng.random() < 0.5), False, total_s=dur)
    elif r < 0.5:
        audio = sa.noise_only(rng, dur)
    return {"frames": frames, "fps": fps, "audio": audio}, motion, obj, count


# ---------------------------------------------------------------- tasks

def _attr(o: sm.Obj, attr: str) -> str:
    return {"shape": o.shape, "color": o.color, "position": o.position}[attr]


def _geometry(img, objs: list[sm.Obj], targets: list[int | None]) -> dict:
    return {"objects": objs, "size": img.size, "targets": targets}


def _object_question(rng, split: str, attr: str, by_choices: tuple[str, str], easy: bool = False,
                     big: bool = False):
    """Image of 1-4 distinct shapes (easy: one; big: large and centred, when no turn asks its position); ask
    `attr` ('shape'|'color'|'position') of one of them."""
    n = 1 if easy else int(rng.integers(1, 5))
    img, objs = sm.render_shapes(rng, n, unique=True, big=easy and big)
    k = int(rng.integers(n))
    by = _pick(rng, by_choices)
    q = _template(rng, attr, split, obj=_ref(rng, objs[k], n, by, attr))
    return img, objs, k, q, by


def _task_object(task: str, rng, split: str, easy: bool = False) -> Sample:
    attr = {"colour": "color", "shape": "shape", "position": "position"}[task]
    by_choices = tuple(b for b in ("shape", "color", "position") if b != attr)
    img, objs, k, q, _ = _object_question(rng, split, attr, by_choices, easy, big=attr != "position")
    return Sample(task, [_user(_image(img), _text(_vary(rng, q)))], _attr(objs[k], attr),
                  {"modality": "image", "n_objects": len(objs), **_geometry(img, objs, [k])})


def _task_followup(rng, split: str, easy: bool = False) -> Sample:
    a1, a2 = (str(a) for a in rng.permutation(["shape", "color", "position"])[:2])
    by = ({"shape", "color", "position"} - {a1, a2}).pop()  # name it by the attribute neither turn asks
    img, objs, k, q1, _ = _object_question(rng, split, a1, (by, by), easy, big="position" not in (a1, a2))
    q2 = _template(rng, "followup_" + a2, split)
    msgs = [_user(_image(img), _text(_vary(rng, q1))), {"role": "assistant", "content": _attr(objs[k], a1)},
            _user(_text(_vary(rng, q2)))]
    return Sample("followup", msgs, _attr(objs[k], a2),
                  {"modality": "image", "first": a1, "second": a2, **_geometry(img, objs, [k, k])})


def _task_scene(rng, split: str, easy: bool = False) -> Sample:
    """Training only: 3-6 questions about one image of 1-4 distinct shapes in one conversation - colour, shape
    or position of an object named by another attribute, follow-ups about the same object ("and its shape?"),
    the count. The trainer supervises every answer, so one encoded image gives several answer tokens for less than
    proportionally more step time (what it did to held-out accuracy: docs/training-notes.md)."""
    n = 1 if easy else int(rng.integers(1, 5))
    img, objs = sm.render_shapes(rng, n, unique=True)
    attrs = ("shape", "color", "position")
    known: set[tuple[int, str]] = set()  # (object, attribute) asked or used to name it: never asked again
    counted = False
    msgs: list[dict] = []
    targets: list[int | None] = []
    last: int | None = None  # the object of the previous question, for a follow-up
    for t in range(int(rng.integers(3, 7))):
        r = rng.random()
        fresh = [(k, a) for k in range(n) for a in attrs if (k, a) not in known]
        again = [a for a in attrs if (last, a) not in known] if last is not None else []
        if (r < 0.12 or not fresh) and not counted:
            q, ans, last, counted = _template(rng, "count", split), str(n), None, True
        elif not fresh:
            break
        elif again and r < 0.4:
            attr = _pick(rng, again)
            q, ans = _template(rng, "followup_" + attr, split), _attr(objs[last], attr)
            known.add((last, attr))
        else:
            last, attr = fresh[int(rng.integers(len(fresh)))]
            by = _pick(rng, tuple(b for b in attrs if b != attr))
            q, ans = _template(rng, attr, split, obj=_ref(rng, objs[last], n, by, attr)), _attr(objs[last], attr)
            known |= {(last, attr), (last, by)} if n > 1 else {(last, attr)}  # one object is "the object"
        msgs += [_user(_image(img), _text(_vary(rng, q))) if t == 0 else _user(_text(_vary(rng, q))),
                 {"role": "assistant", "content": ans}]
        targets.append(last)
    return Sample("scene", msgs[:-1], msgs[-1]["content"],
                  {"modality": "image", "n_objects": n, **_geometry(img, objs, targets)})


def _task_caption(rng, split: str, easy: bool = False) -> Sample:
    r = rng.random()
    if r < 0.25:
        video, motion, obj, count = _video_clip(rng, "maybe", easy)
        cap = f"{_noun(obj)} {'moving ' + motion if motion in ('left', 'right', 'up', 'down') else motion}"
        if count:
            cap += f" with {NUMBER_WORDS[count]} beep{'s' * (count > 1)}"
        part, key, mod = _video(**video, use_audio=count > 0), "caption_video", "video"
    else:
        if r < 0.8:
            img, objs = sm.render_shapes(rng, 1 if easy else int(rng.integers(1, 5)), unique=False, big=easy)
            cap = caption_objects(objs)
        else:
            word = number_text(rng) if rng.random() < 0.5 else _pick(rng, sm.WORDS)
            img, cap = sm.render_text(rng, word), f"the {'number' if word.isdigit() else 'word'} {word}"
        part, key, mod = _image(img), "caption_image", "image"
    return Sample("caption", [_user(part, _text(_vary(rng, _template(rng, key, split))))], cap, {"modality": mod})


def _task_transcript(rng, split: str, easy: bool = False) -> Sample:  # no easy variant
    if rng.random() < 0.5:
        audio, count, high, long = _beep_clip(rng)
        ans, kind = beeps_transcript(count, high, long), "beeps"
    else:
        ans, kind = _pick(rng, sa.SPOKEN_WORDS), "speech"
        audio = sa.spoken_word(rng, ans, split)
    q = _vary(rng, _template(rng, "transcript", split))
    return Sample("transcript", [_user(_audio(audio), _text(q))], ans, {"modality": "audio", "kind": kind})


def _task_refusal(rng, split: str, easy: bool = False) -> Sample:  # no easy variant
    kind = _pick(rng, ("text", "text", "image", "audio"))
    q = _vary(rng, _pick(rng, REFUSAL_PROMPTS[kind][split]))
    if kind == "image":
        parts = [_image(sm.render_shapes(rng, int(rng.integers(1, 5)))[0])]
    elif kind == "audio":
        parts = [_audio(_beep_clip(rng)[0])]
    else:
        parts = []
    return Sample("refusal", [_user(*parts, _text(q))], REFUSAL, {"modality": kind})


def _task_chitchat(rng, split: str, easy: bool = False) -> Sample:  # no easy variant
    intent = _pick(rng, tuple(CHITCHAT))
    prompts, answer = CHITCHAT[intent]
    q = _vary(rng, _pick(rng, prompts[split]))
    return Sample("chitchat", [_user(_text(q))], answer, {"modality": "text", "intent": intent})


def _task_simple(task: str, rng, split: str, easy: bool = False) -> Sample:
    """One-turn tasks whose question has no slots: number, text, count, audio and video tasks."""
    meta: dict = {}
    key = task
    if task in ("number", "text"):
        ans = number_text(rng) if task == "number" else _pick(rng, sm.WORDS)
        part, meta["modality"] = _image(sm.render_text(rng, ans)), "image"
    elif task == "count":
        n = int(rng.integers(1, 5))
        part, ans, meta["modality"] = _image(sm.render_shapes(rng, n, unique=False)[0]), str(n), "image"
    elif task in ("beep_count", "pitch"):
        audio, count, high, _ = _beep_clip(rng)
        part, meta["modality"] = _audio(audio), "audio"
        ans = str(count) if task == "beep_count" else ("high" if high else "low")
    elif task == "spoken_word":
        ans = _pick(rng, sa.SPOKEN_WORDS)
        part, meta["modality"] = _audio(sa.spoken_word(rng, ans, split)), "audio"
    elif task == "video_direction":
        video, ans, _, _ = _video_clip(rng, "maybe", easy)
        part, meta["modality"] = _video(**video), "video"
        key = "video_size" if ans in ("growing", "shrinking") else "video_move"
    else:  # video_beeps (make_sample's table sends only these tasks here)
        video, _, _, count = _video_clip(rng, "always", easy)
        part, ans, meta["modality"] = _video(**video, use_audio=True), str(count), "video"
    q = _template(rng, key, split)
    return Sample(task, [_user(part, _text(_vary(rng, q)))], ans, meta)


def make_sample(task: str, seed: int, split: str = "train", easy: bool = False) -> Sample:
    """One sample of `task`, a pure function of (task, seed, split, easy). `split` picks the paraphrase, voice
    and speed pools: "train" or "heldout". `easy` (training curriculum): images hold a single object, large
    where its position is not asked, and videos a larger moving shape; it never applies to evaluation."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if task not in TASKS + TRAIN_ONLY:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS + TRAIN_ONLY}")
    rng = np.random.default_rng((int(seed) & (2**64 - 1), zlib.crc32(task.encode()), SPLITS.index(split)))
    return _BUILDERS[task](rng, split, easy)


# task -> builder(rng, split, easy)
_BUILDERS: dict[str, Callable[..., Sample]] = {
    **{t: partial(_task_object, t) for t in ("colour", "shape", "position")},
    **{t: partial(_task_simple, t) for t in ("count", "number", "text", "beep_count", "pitch", "spoken_word",
                                             "video_direction", "video_beeps")},
    "followup": _task_followup, "caption": _task_caption, "scene": _task_scene,
    "transcript": _task_transcript, "refusal": _task_refusal, "chitchat": _task_chitchat,
}
assert set(_BUILDERS) == set(TASKS + TRAIN_ONLY)


def iter_samples(seed: int, split: str = "train", tasks: Sequence[str] = TASKS,
                 weights: Sequence[float] | None = None, easy_p: Callable[[], float] | None = None
                 ) -> Iterator[Sample]:
    """Endless deterministic stream: task drawn by `weights` (uniform if None), each sample seeded from
    a stream-level generator; `easy_p()` (read per sample, so a trainer can lower it as it goes) is the chance
    of an easy sample (see `make_sample`)."""
    tasks = tuple(tasks)
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    rng = np.random.default_rng(seed)
    while True:
        task = tasks[int(rng.choice(len(tasks), p=p))]
        seed_i = int(rng.integers(2**63))
        easy = easy_p is not None and bool(rng.random() < easy_p())
        yield make_sample(task, seed_i, split, easy)


__all__ = ["TASKS", "Sample", "make_sample", "iter_samples", "normalize_answer", "CAPABILITIES", "REFUSAL",
           "caption_objects", "beeps_transcript"]
