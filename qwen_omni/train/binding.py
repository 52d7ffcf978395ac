"""Attention supervision for the trainer: make chosen decoder heads look at the object a question is about.

Why: asked "what colour is the star?" about 2-4 shapes, the decoder's heads that read the image look at the
objects but spread their attention evenly over all of them, so the answer is a blend: one answer token per
question is too weak a signal to bind the word "star" to the star's tokens. The synthetic world knows which
vision tokens cover which object, so this loss tells those heads directly: at the position that predicts an
answer about one object, -log(attention mass on that object's tokens). What it did and did not change in the
shipped model is in docs/training-notes.md.

Pieces: `targets()` turns a sample's renderer geometry (`Sample.meta`: "objects", "size", "targets") into
(query position, target token mask) rows for `train_data.encode`; `BindingLoss` keeps each supervised layer's
attention input with a forward pre-hook and recomputes only the supervised rows' scores (the decoder code is
unchanged and serving never sees this). Heads are named per layer, "LAYER:HEAD,HEAD;..." (negative layers
count from the end).
"""
from __future__ import annotations

import torch

from ..models.decoder import rotate
from ..synthetic.labels import object_mask, token_labels


def parse_heads(spec: str, n_layers: int) -> dict[int, list[int]]:
    """"-2:2,3;-1:0,1" -> {n-2: [2, 3], n-1: [0, 1]}; "" -> {}."""
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        layer, heads = part.split(":")
        out[int(layer) % n_layers] = [int(h) for h in heads.split(",")]
    return out


def targets(ids: torch.Tensor, answer_starts: list[int], meta: dict, grid_thw: torch.Tensor, merge: int,
            unit: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions (M,), target masks (M, S) bool) for one encoded sample.

    ids: (S,) prompt ids; answer_starts: the first label position of each assistant turn, in order;
    meta["targets"][i]: the object index turn i is about (None: no single object). The query is the position
    just before the answer, whose logits predict its first token."""
    objs = meta["objects"]
    g = grid_thw[0]
    # token -> covering object (1-based; 0 = background), with the object's index as its "shape" class
    lab = token_labels(object_mask(objs, meta["size"]), {"shape": list(range(len(objs) + 1))}, [], meta["size"],
                       (int(g[1]) // merge, int(g[2]) // merge), unit)["shape"]
    vis = (ids == pad_id).nonzero().flatten()
    qs, masks = [], []
    for start, k in zip(answer_starts, meta["targets"]):
        if k is None or len(vis) != len(lab) or not bool((lab == k + 1).any()):
            continue  # no single object, or one too small to cover a token
        m = torch.zeros(len(ids), dtype=torch.bool)
        m[vis[lab == k + 1]] = True
        qs.append(start - 1)
        masks.append(m)
    if not qs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, len(ids), dtype=torch.bool)
    return torch.tensor(qs), torch.stack(masks)


class BindingLoss:
    """Forward pre-hooks on the supervised layers' attention keep (normed input, cos, sin) of a training
    forward; `loss(batch)` is the mean over supervised rows and heads of -log(attention mass on the target)."""

    def __init__(self, model, heads: dict[int, list[int]]):
        self.heads = heads
        self.attn = {layer: model.model.layers[layer].self_attn for layer in heads}
        self._inputs: dict[int, tuple] = {}
        self.handles = [a.register_forward_pre_hook(self._keeper(layer)) for layer, a in self.attn.items()]

    def _keeper(self, layer: int):
        def keep(module, args):
            if module.training and torch.is_grad_enabled():
                self._inputs[layer] = args[:3]
        return keep

    def loss(self, batch: dict) -> torch.Tensor:
        rows = batch.get("bind_rows")
        if rows is None or rows.numel() == 0 or not self._inputs:
            self._inputs.clear()
            return torch.zeros(())
        qpos, tgt = batch["bind_q"], batch["bind_t"]
        M = len(rows)
        total, n = 0.0, 0
        for layer, (x, cos, sin) in self._inputs.items():
            a = self.attn[layer]
            S, D = x.shape[1], a.head_dim
            q = a.q_proj(x[rows, qpos]).view(M, a.heads, 1, D)  # (M, heads, 1, D)
            k = a.k_proj(x[rows]).view(M, S, a.kv_heads, D)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            q = rotate(q, cos[rows, 0, qpos][:, None, None], sin[rows, 0, qpos][:, None, None])
            k = rotate(k.transpose(1, 2), cos[rows], sin[rows])  # (M, kv_heads, S, D)
            later = torch.arange(S)[None] > qpos[:, None]  # causal: keys after the query are invisible
            for h in self.heads[layer]:
                kv = h // (a.heads // a.kv_heads)
                s = (q[:, h] @ k[:, kv].transpose(-1, -2))[:, 0] / D ** 0.5  # (M, S)
                p = s.masked_fill(later, float("-inf")).softmax(-1)
                total = total - torch.log((p * tgt).sum(-1) + 1e-6).sum()
                n += M
        self._inputs.clear()
        return total / max(n, 1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
