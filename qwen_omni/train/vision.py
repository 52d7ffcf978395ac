"""Stage (v) of `qwen_omni.train.loop`: dense, per-token supervision of the vision encoder on the synthetic world.

Why: trained only through the language-model loss, the tiny vision tower learns slowly. The answer ("star")
is one token at the end of a long sequence, so each image gives the encoder a single, diluted signal (the probe
results before and after this stage are in the model card and docs/training-notes.md). The synthetic world
knows what lies under every vision token, though. So this stage trains the encoder alone, with small linear
heads on each merged token (the vectors the decoder reads):
  shape  - which shape covers this 32x32 px token (or background)          8-way CE
  colour - the colour of the shape covering it (text tokens count as bg)  12-way CE
  char   - which character of a rendered number/word covers it            37-way CE (bg, 0-9, a-z)
  read0..read2 - the characters whose glyph centres fall in this token,   37-way CE each
           left to right (slot k = the k-th such glyph, bg when fewer): a 32 px token can hold up to three
           small glyphs, and `char` names only the one covering most of it, so the others were never asked
           for. With the slots every glyph is named exactly once, in reading order: what "what number is
           written here?" needs from the tokens.
  centre - does an object's centre fall in this token (what counting needs)  2-way CE
  where  - the token's (row, col) in [0, 1] within the image              MSE (absolute place; what
           "top left" needs: the decoder's MRoPE only gives relative positions)
That is ~36 labels per image instead of one. The same heads read every view the decoder gets of those tokens: the
merged tokens, and the running sums after each DeepStack addition (`decoder_views`). The heads are thrown away
afterwards; the checkpoint format is unchanged. Batches render images directly (`synthetic_media`) and turn them
into patches with the serving `Processor`'s image path, with the same JPEG/rescale augmentation as the other
stages.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..synthetic import media as sm
from ..synthetic.labels import CHARS, READ_SLOTS, object_mask, token_labels
from ..synthetic.tasks import number_text
from .schedule import stage_lr

HEADS = {"shape": 1 + len(sm.SHAPES), "colour": 1 + len(sm.COLORS), "char": 1 + len(CHARS), "centre": 2,
         **{f"read{k}": 1 + len(CHARS) for k in range(READ_SLOTS)}}
BG_WEIGHT = 0.3  # background tokens' share of each head's loss, next to 1.0 for the objects' tokens
TEXT_P = 0.35  # share of images showing rendered text (the rest show shapes); --text-p-v
# Weight of the `where` regression next to the CE heads. It is the easiest label (the position table alone
# gives it), and weighted higher it crowded the others out (docs/training-notes.md).
WHERE_WEIGHT = 1.0


class VisionHeads(nn.Module):
    """One linear probe per label kind on the merged vision tokens (N, out_hidden)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in HEADS.items()})
        self.where = nn.Linear(dim, 2)

    @staticmethod
    def _norm(feats: torch.Tensor) -> torch.Tensor:
        # The decoder RMS-normalises what it reads; so do the probes (the tokens' scale is free to change).
        return F.layer_norm(feats, feats.shape[-1:])

    def loss(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x = self._norm(feats)
        parts = {}
        for k in HEADS:
            # Most tokens are background: average the objects' tokens and the background's separately, or the
            # heads learn to answer "background" everywhere.
            ce = F.cross_entropy(self.heads[k](x), labels[k], reduction="none")
            fg = labels[k] != 0
            parts[k] = (ce[fg].mean() if fg.any() else ce.new_zeros(())) + BG_WEIGHT * ce[~fg].mean()
        parts["where"] = F.mse_loss(self.where(x), labels["where"]) * WHERE_WEIGHT
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-head accuracy on the tokens that are not background (what the decoder must tell apart)."""
        out = {}
        for k in HEADS:
            fg = labels[k] != 0
            if fg.any():
                out[k] = float((self.heads[k](self._norm(feats[fg])).argmax(-1) == labels[k][fg]).float().mean())
        return out


# ---------------------------------------------------------------- labelled images

def _shape_scene(rng) -> tuple[Image.Image, np.ndarray, dict[str, list[int]], list[tuple[float, float]], list]:
    """(image, per-pixel object index map (h, w) uint8 with 0 = background, class of each index per head,
    object centres, glyphs [(char class, cx, cy)] (none here))."""
    img, objs = sm.render_shapes(rng, int(rng.integers(1, 5)), unique=bool(rng.random() < 0.5))
    mask = object_mask(objs, img.size)
    classes = {"shape": [0] + [sm.SHAPES.index(o.shape) + 1 for o in objs],
               "colour": [0] + [sm.COLORS.index(o.color) + 1 for o in objs],
               "char": [0] * (len(objs) + 1)}
    return img, mask, classes, [(o.cx, o.cy) for o in objs], []


def _text_scene(rng) -> tuple[Image.Image, np.ndarray, dict[str, list[int]], list, list]:
    text = number_text(rng) if rng.random() < 0.6 else sm.WORDS[rng.integers(len(sm.WORDS))]
    img, boxes = sm.render_text(rng, text, boxes=True)
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    for i, (_, box) in enumerate(boxes):  # glyph boxes, not ink: thin strokes would cover too few pixels
        draw.rectangle(box, fill=i + 1)
    # The text colour is not returned by render_text; the strokes' colour is learned on shapes only.
    classes = {"shape": [0] * (len(boxes) + 1), "colour": [0] * (len(boxes) + 1),
               "char": [0] + [CHARS.index(ch) + 1 for ch, _ in boxes]}
    glyphs = [(CHARS.index(ch) + 1, (x0 + x1) / 2, (y0 + y1) / 2) for ch, (x0, y0, x1, y1) in boxes]
    return img, np.asarray(mask), classes, [], glyphs


def make_batch(rng: np.random.Generator, proc, n: int, augment_p: float = 0.3, text_p: float = TEXT_P) -> dict:
    """n labelled images -> {pixel_values, image_grid_thw, labels: {head: (tokens,)}}."""
    pix, grids, labels = [], [], []
    merge = proc.p.merge_size
    unit = proc.p.patch_size * merge
    for _ in range(n):
        img, mask, classes, centres, glyphs = (_text_scene if rng.random() < text_p else _shape_scene)(rng)
        size = img.size
        if rng.random() < augment_p:  # labels follow the original geometry; the resize keeps the aspect
            img = sm.jpeg_resize(img, int(rng.integers(30, 90)), float(rng.uniform(0.7, 1.3)))
        p, g = proc.image(img)
        pix.append(p)
        grids.append(g)
        labels.append(token_labels(mask, classes, centres, size, (int(g[0, 1]) // merge, int(g[0, 2]) // merge),
                                   unit, glyphs))
    return {"pixel_values": torch.cat(pix), "image_grid_thw": torch.cat(grids),
            "labels": {k: torch.cat([x[k] for x in labels]) for k in labels[0]}}


# ---------------------------------------------------------------- the stage

def decoder_views(feats: torch.Tensor, deepstack: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """What the decoder's layers find at the vision positions: the merged tokens, then after each DeepStack
    addition the running sum (n_tokens, H) each. The heads train every view: trained on the merged tokens alone,
    they leave the DeepStack taps to the language loss, which made the taps larger than the merged tokens and poor
    at shape, so the later layers read mostly a shape-blind sum (docs/training-notes.md)."""
    views = [feats]
    for d in deepstack or []:
        views.append(views[-1] + d)
    return views


def run_stage_v(model, proc, steps: int, *, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                text_p: float = TEXT_P, budget_s: float = 0.0, log=lambda msg: None, log_every: int = 25,
                progress=None) -> int:
    """Train `model.visual` (all of it, mergers included) with the dense heads for `steps` steps or `budget_s`
    seconds, whichever ends first; returns the steps done. AdamW, linear warmup, cosine decay to 10 %."""
    heads = VisionHeads(model.cfg.vision.out_hidden_size)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.visual.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05, fused=True)
    rng = np.random.default_rng((seed, 4242))
    model.visual.train()
    t0 = time.time()
    warm = min(50, max(1, steps // 10))
    step = 0
    for step in range(steps):
        frac = step / steps
        if budget_s:
            frac = max(frac, (time.time() - t0) / budget_s)
            if frac >= 1.0:
                break
        for g in opt.param_groups:
            g["lr"] = stage_lr(step, steps, warm, lr, frac)
        b = make_batch(rng, proc, batch, text_p=text_p)
        views = decoder_views(*model.visual(b["pixel_values"], b["image_grid_thw"]))
        losses = [heads.loss(v, b["labels"]) for v in views]
        loss, parts = sum(x[0] for x in losses) / len(views), losses[-1][1]
        feats = views[-1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
        if (step + 1) % log_every == 0:
            acc = heads.accuracy(feats.detach(), b["labels"])
            log(f"stage v step {step + 1}/{steps} loss {float(loss.detach()):.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items()) + " | fg acc "
                + " ".join(f"{k} {v:.2f}" for k, v in acc.items())
                + f" | {(time.time() - t0) / (step + 1):.2f}s/step")
    else:
        step = steps
    for p in model.parameters():
        p.requires_grad_(True)
    return step
