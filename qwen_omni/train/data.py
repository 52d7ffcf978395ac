"""Training data for `qwen_omni.train.loop`: synthetic-world or user JSONL samples -> padded model-input batches.

Design: a sample (chat messages + answer) goes through the serving `Processor`, so training sees exactly the
token ids, media tensors and MRoPE positions that inference does; labels cover every assistant turn's answer and
its closing `<|im_end|>` (nothing of the prompts). Batches right-pad ids/labels/positions and concatenate media
in row order (the order the model scatters features back in). Robustness augmentation (JPEG/rescale, MP3/Ogg)
mimics real uploads.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.tokenizer import Tokenizer
from ..models.omni_config import ThinkerConfig
from ..synthetic import audio as sa
from ..synthetic import media as sm
from ..synthetic.tasks import iter_samples
from . import tiny_model as tm
from .binding import targets

IGNORE = -100

# Task mixes of the synthetic stages (weights for `synthetic.iter_samples`).
STAGE_A_TASKS = {"caption": 3.0, "transcript": 2.0, "chitchat": 0.3}
# Stage (b): harder skills get more weight; captions/transcripts stay in the mix so stage (a) is not forgotten.
STAGE_B_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.3, "position": 1.2, "number": 1.8, "text": 1.2,
                   "beep_count": 1.3, "pitch": 0.8, "spoken_word": 1.8, "video_direction": 1.3,
                   "video_beeps": 1.5, "followup": 1.2, "chitchat": 0.4, "refusal": 0.6, "caption": 1.0,
                   "transcript": 0.5, "scene": 1.5}


def task_weights(text: str) -> dict[str, float]:
    """'shape=2.5,pitch=0.2' -> {'shape': 2.5, 'pitch': 0.2}; unknown tasks are an error, not a silent no-op."""
    out = {}
    for part in filter(None, text.split(",")):
        task, _, w = part.partition("=")
        if task.strip() not in STAGE_B_WEIGHTS or not w:
            raise ValueError(f"{part!r}: expected TASK=WEIGHT with TASK one of {sorted(STAGE_B_WEIGHTS)}")
        out[task.strip()] = float(w)
    return out


# ---------------------------------------------------------------- samples -> tensors

def augment(sample, rng: np.random.Generator, p: float):
    """JPEG + rescale some images, MP3/Ogg some audio (what real uploads go through)."""
    if p <= 0:
        return sample
    for m in sample.messages:
        if isinstance(m["content"], str):
            continue
        for part in m["content"]:
            if part["type"] == "image" and rng.random() < p:
                part["image"] = sm.jpeg_resize(part["image"], int(rng.integers(30, 90)), float(rng.uniform(0.7, 1.3)))
            elif part["type"] == "audio" and rng.random() < p * 0.5:
                sr, x = part["audio"]
                part["audio"] = (sr, sa.codec_roundtrip(x, "mp3" if rng.random() < 0.5 else "ogg"))
    return sample


def encode(processor, tokenizer, messages: list[dict], answer: str, meta: dict | None = None) -> dict:
    """Model inputs for messages + the answer as the assistant turn, and labels on every assistant turn's text +
    <|im_end|> (the earlier turns of a follow-up or a scene dialogue are supervised too). With a sample's `meta`
    naming the object each answer is about, also the attention-supervision rows (`train_binding.targets`)."""
    msgs = list(messages) + [{"role": "assistant", "content": answer}]
    inp = processor(tokenizer, msgs, add_generation_prompt=False)
    ids = inp["input_ids"][0]
    head = tokenizer.encode("assistant\n")
    ends = (ids == tm.TOKEN_IDS["<|im_end|>"]).nonzero().flatten().tolist()
    labels = torch.full_like(ids, IGNORE)
    starts = []
    for start in (ids == tm.TOKEN_IDS["<|im_start|>"]).nonzero().flatten().tolist():
        first = start + 1 + len(head)
        if ids[start + 1:first].tolist() == head:
            last = next(e for e in ends if e >= first)
            labels[first:last + 1] = ids[first:last + 1]
            starts.append(first)
    inp.pop("cache_key", None)
    inp["labels"] = labels[None]
    if meta and meta.get("targets") and "image_grid_thw" in inp:
        inp["bind_q"], inp["bind_t"] = targets(ids, starts, meta, inp["image_grid_thw"], processor.p.merge_size,
                                               processor.p.patch_size * processor.p.merge_size,
                                               tm.TOKEN_IDS["<|image_pad|>"])
    return inp


MEDIA_CAT = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Right-pad ids/labels/positions to the longest; concatenate media in row-major order."""
    S = max(x["input_ids"].shape[1] for x in items)
    B = len(items)
    out = {"input_ids": torch.full((B, S), pad_id, dtype=torch.long),
           "labels": torch.full((B, S), IGNORE, dtype=torch.long),
           "position_ids": torch.zeros((3, B, S), dtype=items[0]["position_ids"].dtype)}
    for i, x in enumerate(items):
        n = x["input_ids"].shape[1]
        out["input_ids"][i, :n] = x["input_ids"][0]
        out["labels"][i, :n] = x["labels"][0]
        out["position_ids"][:, i, :n] = x["position_ids"][:, 0]
        if n < S:  # pads continue the positions (they are masked out of the loss; causal attention ignores them)
            out["position_ids"][:, i, n:] = x["position_ids"][:, 0, -1:] + torch.arange(1, S - n + 1)
    for k in MEDIA_CAT:
        parts = [x[k] for x in items if k in x]
        if parts:
            out[k] = torch.cat(parts)
    bind = [(i, x["bind_q"], x["bind_t"]) for i, x in enumerate(items) if "bind_q" in x and len(x["bind_q"])]
    if bind:  # attention-supervision rows (train_binding): batch row, query position, target mask padded to S
        out["bind_rows"] = torch.cat([torch.full((len(q),), i) for i, q, _ in bind])
        out["bind_q"] = torch.cat([q for _, q, _ in bind])
        out["bind_t"] = torch.cat([F.pad(t, (0, S - t.shape[1])) for _, _, t in bind])
    feats = [(x["input_features"], x["feature_attention_mask"]) for x in items if "input_features" in x]
    if feats:
        T = max(f.shape[2] for f, _ in feats)
        out["input_features"] = torch.cat([F.pad(f, (0, T - f.shape[2])) for f, _ in feats])
        out["feature_attention_mask"] = torch.cat([F.pad(m, (0, T - m.shape[1])) for _, m in feats])
    return out


class SyntheticStream(torch.utils.data.IterableDataset):
    """Endless batches from the synthetic world (seeded; a worker gets its own stream).

    `bucket` > 1: draw `batch * bucket` samples, sort them by length and cut them into `bucket` batches, yielded
    in random order. Rows are right-padded to the longest in their batch, and in a random batch of the Q&A mix
    (lengths 38-211 tokens, median 73) about half the decoder's positions were padding."""

    def __init__(self, tok_dir: Path, model_cfg: dict, weights: dict[str, float], batch: int, seed: int,
                 augment_p: float, easy_p: float = 0.0, bucket: int = 1):
        self.tok_dir, self.model_cfg, self.weights = tok_dir, model_cfg, weights
        self.batch, self.seed, self.augment_p, self.bucket = batch, seed, augment_p, max(1, bucket)
        # Share of easy samples (curriculum, see synthetic.make_sample); the trainer lowers it as it goes. Read per
        # sample, so changes reach an inline stream (workers=0) at once; a worker process keeps its start value.
        self.easy_p = easy_p

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        if info is not None:  # a worker process; inline (workers=0) this is the trainer's own process
            torch.set_num_threads(1)
        tok = Tokenizer.from_dir(self.tok_dir)
        proc = tm.processor_for(ThinkerConfig.parse(self.model_cfg), self.tok_dir)
        tasks = list(self.weights)
        stream = iter_samples(self.seed * 1000 + wid, "train", tasks, [self.weights[t] for t in tasks],
                              easy_p=lambda: self.easy_p)
        rng = np.random.default_rng((self.seed, wid, 99))
        while True:
            items = []
            while len(items) < self.batch * self.bucket:
                s = augment(next(stream), rng, self.augment_p)
                items.append(encode(proc, tok, s.messages, s.answer, s.meta))
            if self.bucket == 1:
                yield collate(items)
                continue
            items.sort(key=lambda x: x["input_ids"].shape[1])
            for j in rng.permutation(self.bucket):
                yield collate(items[j * self.batch:(j + 1) * self.batch])


class JsonlData(torch.utils.data.IterableDataset):
    """A user's folder of (media, question, answer) JSONL files, shuffled every epoch."""

    def __init__(self, folder: Path, tok_dir: Path, model_cfg: dict, batch: int, seed: int):
        self.examples = load_jsonl_folder(folder)
        if not self.examples:
            raise SystemExit(f"{folder}: no examples found in *.jsonl files")
        self.tok_dir, self.model_cfg, self.batch, self.seed = tok_dir, model_cfg, batch, seed

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)
        tok = Tokenizer.from_dir(self.tok_dir)
        proc = tm.processor_for(ThinkerConfig.parse(self.model_cfg), self.tok_dir)
        rng = random.Random(self.seed)
        while True:
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            for i in range(0, len(order) - self.batch + 1 if len(order) >= self.batch else 1, self.batch):
                chunk = [self.examples[j] for j in order[i:i + self.batch]]
                yield collate([encode(proc, tok, m, a) for m, a in chunk])


def load_jsonl_folder(folder: Path) -> list[tuple[list[dict], str]]:
    """[(messages, answer)] from every *.jsonl in folder (see the module docstring for the format)."""
    out = []
    files = sorted(Path(folder).glob("*.jsonl")) if Path(folder).is_dir() else [Path(folder)]
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                parts = []
                for kind in ("image", "audio", "video"):
                    srcs = ex.get(kind) or []
                    for src in [srcs] if isinstance(srcs, str) else srcs:
                        part = {"type": kind, kind: str((f.parent / src).resolve())}
                        if kind == "video" and ex.get("use_audio_in_video"):
                            part["use_audio_in_video"] = True
                        parts.append(part)
                parts.append({"type": "text", "text": str(ex["question"])})
                out.append(([{"role": "user", "content": parts}], str(ex["answer"])))
            except (KeyError, ValueError, TypeError) as e:
                raise SystemExit(f"{f}:{n}: bad example ({e}); expected question, answer and optional "
                                 f"image/audio/video paths") from None
    return out
