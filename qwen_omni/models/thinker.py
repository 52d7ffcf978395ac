"""The Omni "Thinker": encoders -> merge into the token embeddings -> decoder -> lm_head.

This file only wires parts together. Encoder outputs replace the placeholder tokens (`<|AUDIO|>`,
`<|IMAGE|>`, `<|VIDEO|>`, or their Qwen3 names) in sequence order; a count mismatch between placeholders and
features is an error, never padded. Qwen3-Omni also feeds DeepStack features of images and videos (jointly, in
sequence order) into the first decoder layers.

Multi-turn reuse: `prefill(inputs, cache, start)` runs only prompt tokens from `start` on; media whose
placeholders all lie before `start` are already in the cache and are not encoded again. The rope delta of
the prompt (TMRoPE positions run ahead of or behind the token count) is kept on the cache for decoding.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from encoders.qwen3_audio import Qwen3AudioEncoder
from encoders.qwen3_vision import Qwen3VisionEncoder
from encoders.qwen25_audio import Qwen25AudioEncoder
from encoders.qwen25_vision import Qwen25VisionEncoder

from ..errors import InputError
from .decoder import TextModel
from .group_prefill import Prompt, prefill_prompts
from .kv_cache import KVCache
from .layers import Linear
from .omni_config import ThinkerConfig


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        q3 = cfg.is_qwen3
        self.audio_tower = (Qwen3AudioEncoder if q3 else Qwen25AudioEncoder)(cfg.audio)
        self.visual = (Qwen3VisionEncoder if q3 else Qwen25VisionEncoder)(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()
        self.encode_seconds = 0.0  # running total of time spent in the encoders (the app shows it per reply)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the embedding's (it stays float when the linears are quantized, quant.py)."""
        return self.model.embed_tokens.weight.dtype

    # ---- encoders -----------------------------------------------------------------------------------------
    def encode_vision(self, pixels: torch.Tensor, grid_thw: torch.Tensor):
        """-> (features (n_tokens, H), deepstack list or None) for images or videos."""
        t0 = time.perf_counter()
        out = self.visual(pixels.to(self.dtype), grid_thw)
        self.encode_seconds += time.perf_counter() - t0
        return out if isinstance(out, tuple) else (out, None)

    def encode_audio(self, input_features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
        """input_features (n, mels, T) padded + mask (n, T) -> (sum of audio tokens, H)."""
        lens = feature_mask.sum(-1).long()
        frames = input_features.transpose(1, 2)[feature_mask.bool()].T  # (mels, sum L) valid frames only
        t0 = time.perf_counter()
        out = self.audio_tower(frames.to(self.dtype), lens)
        self.encode_seconds += time.perf_counter() - t0
        return out

    # ---- forward ------------------------------------------------------------------------------------------
    def embed(self, inputs: dict, start: int = 0):
        """Token embeddings of ids[start:] with media features scattered in.

        Returns (embeds (1, S, H), deepstack list | None, visual mask (1, S) | None).
        """
        ids = inputs["input_ids"][:, start:].to(self.model.embed_tokens.weight.device)
        h = self.model.embed_tokens(ids)
        c = self.cfg
        visual_mask = torch.zeros_like(ids, dtype=torch.bool)
        deep: list[torch.Tensor] | None = None
        deep_parts: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        for token, pix_key, grid_key in ((c.image_token_id, "pixel_values", "image_grid_thw"),
                                         (c.video_token_id, "pixel_values_videos", "video_grid_thw")):
            mask = ids == token
            if inputs.get(pix_key) is None:
                if mask.any():
                    raise InputError(f"the prompt has {int(mask.sum())} {pix_key} placeholders but no media")
                continue
            if start == 0:  # every item is new; a batch (B > 1) lays its items out in row-major order
                pixels, grid = inputs[pix_key], inputs[grid_key]
            else:
                pixels, grid = select_items(inputs[pix_key], inputs[grid_key], items_after(
                    inputs["input_ids"][0], token, tokens_per_item(inputs[grid_key], self.merge), start))
            if grid.shape[0] == 0:
                continue
            feats, ds = self.encode_vision(pixels, grid)
            h = scatter(h, mask, feats, pix_key)
            visual_mask |= mask
            if ds is not None:
                deep_parts.append((mask, ds))
        if deep_parts:  # DeepStack: image and video features merged in sequence order
            deep = []
            for level in range(len(deep_parts[0][1])):
                joint = h.new_zeros(int(visual_mask.sum()), h.shape[-1])
                for mask, ds in deep_parts:
                    joint[mask[visual_mask]] = ds[level].to(h.dtype)
                deep.append(joint)
        amask = ids == c.audio_token_id
        if inputs.get("input_features") is not None:
            counts = self.audio_token_counts(inputs["feature_attention_mask"])
            keep = (torch.ones(counts.shape[0], dtype=torch.bool, device=counts.device) if start == 0 else
                    items_after(inputs["input_ids"][0], c.audio_token_id, counts, start))
            if keep.any():
                feats = self.encode_audio(inputs["input_features"][keep], inputs["feature_attention_mask"][keep])
                h = scatter(h, amask, feats, "audio")
        elif amask.any():
            raise InputError(f"the prompt has {int(amask.sum())} audio placeholders but no audio")
        return h, deep, (visual_mask if deep is not None else None)

    @property
    def merge(self) -> int:
        return self.cfg.vision.spatial_merge_size

    def audio_token_counts(self, feature_mask: torch.Tensor) -> torch.Tensor:
        return self.cfg.audio_output_lengths(feature_mask.sum(-1).long())

    def forward(self, inputs: dict, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits (1, S - start, V) of prompt tokens [start:]; positions from inputs["position_ids"]."""
        return self.lm_head(self.hidden(inputs, cache, start))

    def hidden(self, inputs: dict, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """The decoder's final (normed) states (B, S - start, H), before lm_head: the trainer applies the head to
        the labelled positions only."""
        h, deep, vmask = self.embed(inputs, start)
        pos = inputs["position_ids"][:, :, start:].to(h.device)
        return self.model(h, pos, cache, deep, vmask)

    # ---- the runner interface used by Assistant / generate -------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.cfg.text
        p = self.model.embed_tokens.weight  # stays float when the linears are quantized (quant.py)
        cache = KVCache(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, p.dtype, p.device)
        cache.rope_deltas = torch.zeros(batch, 1, dtype=torch.float32, device=p.device)
        return cache

    def prompt(self, inputs: dict, start: int = 0) -> Prompt:
        """Prompt tokens [start:] embedded (media encoded), with their positions: one row of a prefill."""
        h, deep, vmask = self.embed(inputs, start)
        return Prompt(h, inputs["position_ids"][:, :, start:].to(h.device), deep, vmask, inputs["rope_deltas"])

    def prefill(self, inputs: dict, cache: KVCache, start: int = 0) -> torch.Tensor:
        return prefill_prompts(self, [self.prompt(inputs, start)], [cache])

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B,) -> logits (B, V); text positions continue at cache length + rope delta on all axes."""
        pos = (cache.lengths[:, None].float() + cache.rope_deltas).unsqueeze(0).expand(3, -1, -1)
        h = self.model(self.model.embed_tokens(tokens[:, None].to(pos.device)), pos, cache)
        return self.lm_head(h[:, -1])


def tokens_per_item(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    return grid_thw.prod(-1) // (merge * merge)


def items_after(ids: torch.Tensor, token: int, counts: torch.Tensor, start: int) -> torch.Tensor:
    """(n_items,) bool: which media items have their placeholders at or after `start`.

    Items are laid out in order, each as `counts[i]` placeholders (possibly interleaved with other tokens, as
    audio and video are in audio-in-video). An item that begins before `start` must lie wholly before it: the
    prefix cache never splits one item's placeholders.
    """
    where = (ids == token).nonzero().flatten()
    if int(counts.sum()) != where.numel():
        raise InputError(f"{where.numel()} placeholder tokens but the media need {int(counts.sum())}")
    first = where[torch.cumsum(counts, 0) - counts] if counts.numel() else where[:0]
    last = where[torch.cumsum(counts, 0) - 1] if counts.numel() else where[:0]
    if bool(((first < start) & (last >= start)).any()):
        raise InputError("internal: the reused prefix ends inside a media item")
    return first >= start


def select_items(pixels: torch.Tensor, grid: torch.Tensor, keep: torch.Tensor):
    """The patch rows and grids of the kept items (rows per item = t*h*w)."""
    if bool(keep.all()):
        return pixels, grid
    rows = grid.prod(-1)
    row_keep = torch.repeat_interleave(keep, rows)
    return pixels[row_keep], grid[keep]


def scatter(h: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor, what: str) -> torch.Tensor:
    n = int(mask.sum())
    if n != feats.shape[0]:
        raise InputError(f"{what}: the prompt has {n} placeholder tokens but the encoder produced "
                         f"{feats.shape[0]} features")
    return h.masked_scatter(mask[..., None], feats.to(h.dtype))
