"""Make the app's example media (`python assets/examples/make_examples.py`): one file per modality of the
embedded model, drawn from the synthetic world it was trained on (`qwen_omni.synthetic_*`), with held-out
voices and seeds, written in the formats users upload (PNG, JPEG, WAV, MP3, MP4 with an AAC soundtrack).

Deterministic: the same code writes byte-identical PNG/WAV files (the compressed ones depend on the codec
build). `examples.json` lists each file with a question the model was trained to answer; `answer` is the
ground truth the picture/sound was drawn with and `kind` the kind of answer (the app ignores both; the app's
tests check that the model's reply is an answer of that kind).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from qwen_omni.synthetic import audio as sa  # noqa: E402
from qwen_omni.synthetic import media as sm  # noqa: E402
from qwen_omni.speech.offline_voice import wav_bytes  # noqa: E402


def write_wav(path: Path, x: np.ndarray, sr: int = sa.SR) -> None:
    path.write_bytes(wav_bytes(x, sr))


def shapes_image(seed: int = 3):
    """Three shapes, one of them a star: 'What colour is the star?'"""
    for s in range(seed, seed + 1000):
        rng = np.random.default_rng((s, 42))
        img, objs = sm.render_shapes(rng, 3)
        star = [o for o in objs if o.shape == "star"]
        if star:
            return img, star[0], objs
    raise RuntimeError("no star drawn")


def main(out: Path = HERE) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261129)
    entries = []

    img, star, objs = shapes_image()
    img.save(out / "shapes.png")
    entries += [{"file": "shapes.png", "text": "What colour is the star?", "answer": star.color, "kind": "colour"},
                {"file": "shapes.png", "text": "How many shapes are there?", "answer": str(len(objs)),
                 "kind": "number"}]

    sm.render_text(rng, "42").convert("RGB").save(out / "number.jpg", quality=85)
    entries.append({"file": "number.jpg", "text": "What number is written?", "answer": "42", "kind": "number"})

    write_wav(out / "beeps.wav", sa.beeps(rng, 3, high=True, long=False))
    entries.append({"file": "beeps.wav", "text": "How many beeps do you hear?", "answer": "3", "kind": "number"})

    (out / "spoken.mp3").write_bytes(sa.encode_audio(sa.spoken_word(rng, "seven", "heldout"), "mp3", 48000))
    entries.append({"file": "spoken.mp3", "text": "Which word is spoken?", "answer": "seven",
                    "kind": "spoken_word"})

    frames, fps, obj = sm.render_video(rng, "right")
    audio = sa.beeps(rng, 2, high=False, long=False, total_s=len(frames) / fps)
    (out / "moving.mp4").write_bytes(sm.encode_mp4({"frames": frames, "fps": fps, "audio": audio}, crf=23))
    entries += [{"file": "moving.mp4", "text": "Which way does the shape move?", "answer": "right",
                 "kind": "motion"},
                {"file": "moving.mp4", "text": "How many beeps are in the video?", "answer": "2",
                 "kind": "number", "use_audio_in_video": True}]

    (out / "examples.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


if __name__ == "__main__":
    for e in main():
        print(e)
