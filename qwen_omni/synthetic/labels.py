"""Per-token labels of a rendered scene: which object, shape, colour or glyph lies under each vision token.

The renderer knows every object's geometry, so a scene can be labelled token by token in the vision encoder's
merged-token order. The vision stage of training reads these labels for its dense heads, and the attention
supervision reads the object map to find the tokens a question is about.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import media as sm

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
READ_SLOTS = 3  # glyphs per token that the reading heads name (18 px text: ~10 px glyphs in a 32 px token)
COVER = 0.08  # a token is labelled with an object once the object covers this share of its pixels


def object_mask(objs: list[sm.Obj], size: tuple[int, int]) -> np.ndarray:
    """(h, w) uint8 map of which object (1-based, in list order) covers each pixel; 0 = background."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(objs):
        sm.draw_shape(draw, o.shape, o.cx, o.cy, o.r, i + 1)
    return np.asarray(mask)


def token_labels(mask: np.ndarray, classes: dict[str, list[int]], centres, size: tuple[int, int],
                 grid: tuple[int, int], unit: int, glyphs=()) -> dict[str, torch.Tensor]:
    """Per-token labels (gh*gw,) in the encoder's merged-token order (row-major) for an image of `size` (w, h)
    whose resized version is a (gh, gw) grid of unit x unit px tokens. `glyphs` [(char class, cx, cy)] in
    reading order fill the read slots of the token holding each glyph's centre."""
    gh, gw = grid
    w, h = size
    ys = np.minimum((np.arange(gh * unit) + 0.5) * h / (gh * unit), h - 1).astype(int)
    xs = np.minimum((np.arange(gw * unit) + 0.5) * w / (gw * unit), w - 1).astype(int)
    m = mask[ys][:, xs].reshape(gh, unit, gw, unit).transpose(0, 2, 1, 3).reshape(gh * gw, unit * unit)
    # (tokens, objects): pixels of each object in each token (one all-zero column when there is no object)
    counts = np.stack([(m == i).sum(1) for i in range(1, len(classes["shape"]))] or [np.zeros(len(m), int)], 1)
    # The object covering most of the token, once it covers COVER of it; else background (0).
    obj = np.where(counts.max(1) >= COVER * unit * unit, counts.argmax(1) + 1, 0)
    out = {k: torch.as_tensor(np.asarray(v)[obj], dtype=torch.long) for k, v in classes.items()}

    def token_at(cx: float, cy: float) -> int:
        return min(gh - 1, int(cy / h * gh)) * gw + min(gw - 1, int(cx / w * gw))

    centre = np.zeros(gh * gw, np.int64)
    for cx, cy in centres:
        centre[token_at(cx, cy)] = 1
    out["centre"] = torch.as_tensor(centre)
    read = np.zeros((READ_SLOTS, gh * gw), np.int64)
    filled = np.zeros(gh * gw, np.int64)
    for cls, cx, cy in glyphs:  # left to right, so slot k of a token is its k-th glyph in reading order
        t = token_at(cx, cy)
        if filled[t] < READ_SLOTS:  # a fourth glyph in one token is left unnamed (none in 300 scenes)
            read[filled[t], t] = cls
            filled[t] += 1
    for k in range(READ_SLOTS):
        out[f"read{k}"] = torch.as_tensor(read[k])
    rows, cols = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    out["where"] = torch.as_tensor(np.stack([rows.ravel(), cols.ravel()], 1), dtype=torch.float32)
    return out
