"""TMRoPE: the (T, H, W) position of every prompt token, for Qwen2.5-Omni and Qwen3-Omni thinkers.

Same results as transformers' `get_rope_index` (5.24), HF quirks included; parity is tested in
tests/test_positions.py.

Rules:
* Text: the same position on all three axes. Each run continues from the max of the previous piece plus 1.
* Image (after `<|vision_bos|>`): T = 0, H = row, W = column of the merged grid, plus a start offset.
  So an image of 4x6 merged tokens uses 6 positions, however many tokens it has.
* Video: like an image, with T = frame_index * seconds_per_grid * position_id_per_seconds (the frame's
  time). Qwen2.5 truncates T to an integer. Qwen3 keeps the float32 value, and the next text runs on from it
  (e.g. 17.33, 18.33, ...).
* Audio (after `<|audio_bos|>`): one position per audio token, all three axes equal. An audio token stands
  for 40 ms in Qwen2.5 (25 per second) and about 1/13 s in Qwen3. So one position is one audio token, and
  a video frame at time t lines up with the audio token played at t.
* Audio-in-video, where the layout is `<|vision_bos|><|audio_bos|> ... <|audio_eos|><|vision_eos|>`:
  the video and audio tokens share one time axis. Their layout order differs by family:
  - "chunked" (Qwen2.5): split into windows of seconds_per_chunk (2 s = 50 positions). Each window holds
    its video tokens first, then its audio tokens. The two BOS tokens share one position, and so do the
    two EOS tokens.
  - "sorted" (Qwen3): merge-sorted by time, with video first on ties. BOS and EOS take two consecutive
    positions each.
  The processor uses the same ordering rule (see `audio_in_video_tokens`), so token i gets position i.
* After a media block, the end token is placed at max(last piece appended) + 1. HF takes the max of that
  last piece only, not of the whole block. For a video that outlasts its audio, or a large frame with
  little audio, the next positions can therefore overlap the frame's H/W range. We do the same.

Worked example (Qwen2.5; image grid 1x4x4, so 2x2 merged tokens; then 5 audio tokens):
    tokens  t  t  <vb> I  I  I  I  <ve> <ab> A  A  A  A  A  <ae> t  t
    T       0  1  2    3  3  3  3  5    6    7  8  9  10 11 12   13 14
    H       0  1  2    3  3  4  4  5    6    7  8  9  10 11 12   13 14
    W       0  1  2    3  4  3  4  5    6    7  8  9  10 11 12   13 14      rope_delta = 15 - 17 = -2
The same with a 4-frame video at 1 s per grid, 4 s of audio (100 tokens), use_audio_in_video:
    Qwen2.5: txt:0 <vb><ab>:1,1 V(T=2)x4 V(27)x4 A:2..51 V(52)x4 V(77)x4 A:52..101 <ae><ve>:102,102 txt:103
    Qwen3 (13/s, 52 tokens): txt:0 <vb>:1 <ab>:2 V(3)x4 A:3..15 V(16)x4 A:16..28 ... A:42..54 <ae>:55 <ve>:56

While decoding, every new token is text at `cache_length + rope_delta` on all three axes
(`decode_positions`). Here rope_delta = max(prompt positions) + 1 - prompt length.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, InputError


@dataclass(frozen=True)
class RopeSpec:
    """Everything `get_rope_index` reads from the thinker config."""
    image_token_id: int
    video_token_id: int
    audio_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    spatial_merge_size: int
    position_id_per_seconds: float
    seconds_per_chunk: float | None  # used only by "chunked"
    float_positions: bool  # Qwen3 keeps fractional video times; Qwen2.5 truncates them (`.long()`)
    interleave: str  # "chunked" (Qwen2.5) | "sorted" (Qwen3), see the module docstring

    @classmethod
    def from_thinker_config(cls, cfg: dict) -> "RopeSpec":
        """From config.json (the whole file or its `thinker_config`). Qwen2.5 names some ids `*_token_index`."""
        cfg = cfg.get("thinker_config", cfg)
        qwen3 = cfg.get("model_type", "").startswith("qwen3")

        def get(name: str):
            value = cfg.get(name, cfg.get(name.replace("_token_id", "_token_index")))
            if value is None:
                raise CheckpointError(f"thinker config.json has no {name!r}, which TMRoPE positions need")
            return value

        return cls(
            **{k: get(k) for k in ("image_token_id", "video_token_id", "audio_token_id", "vision_start_token_id",
                                   "vision_end_token_id", "audio_start_token_id", "audio_end_token_id")},
            spatial_merge_size=cfg["vision_config"]["spatial_merge_size"],
            position_id_per_seconds=cfg.get("position_id_per_seconds", 25),  # 25 is HF's default for both
            **family_rules(qwen3, cfg.get("seconds_per_chunk")))


def family_rules(qwen3: bool, seconds_per_chunk: float | None = None) -> dict:
    """The RopeSpec fields where the two families' TMRoPE differ (module docstring)."""
    return dict(seconds_per_chunk=None if qwen3 else (seconds_per_chunk or 2), float_positions=qwen3,
                interleave="sorted" if qwen3 else "chunked")


def rope_index(input_ids: torch.Tensor, spec: RopeSpec, image_grid_thw: torch.Tensor | None = None,
               video_grid_thw: torch.Tensor | None = None, video_second_per_grid: torch.Tensor | None = None,
               audio_lengths: Sequence[int] | torch.Tensor | None = None, use_audio_in_video: bool = False,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, S) float32 and rope_deltas (B, 1) for a batch of prompts.

    Media are consumed in order across the whole batch (row 0's first, as HF does).
    * `image_grid_thw` / `video_grid_thw` are (N, 3) patch grids, before merging.
    * `video_second_per_grid` is one value per video: temporal_patch_size / fps.
    * `audio_lengths` counts LLM audio TOKENS per audio, counting audio-in-video audio in order too, not
      mel frames. Convert feature lengths with `encoders.qwen25_audio.audio_output_lengths` or
      `encoders.qwen3_audio.audio_output_lengths`.
    * `attention_mask` is (B, S) with 0 for (left) padding. Padding gets position 1 (0 on Qwen3's media path,
      as in HF).
    * The block layout in `input_ids` decides what each block is. `use_audio_in_video` must be True if any
      block is audio-in-video, since HF mis-positions such blocks without it. A silent (plain) video in
      such a prompt gets plain video positions; HF's `get_rope_index` cannot mix the two.
    rope_deltas are int64 for Qwen2.5 and float32 for Qwen3, like HF's.
    """
    B, S = input_ids.shape
    mask = torch.ones(B, S, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() == 1
    dtype = torch.float32 if spec.float_positions else torch.long
    if image_grid_thw is None and video_grid_thw is None:
        # HF's text path, which audio-only prompts take too; their positions are sequential either way.
        # Padding reads 1 here and counts in the row max. That only changes the delta of a padded
        # one-token row.
        pos = (mask.to(dtype).cumsum(-1) - 1).masked_fill(~mask, 1)
        deltas = pos.max(-1, keepdim=True).values + 1 - mask.sum(-1, keepdim=True)
        return pos.float().expand(3, B, S).clone().to(input_ids.device), deltas.to(input_ids.device)

    media = _Media(image_grid_thw, video_grid_thw, video_second_per_grid, audio_lengths)
    positions = torch.full((3, B, S), 0.0 if spec.float_positions else 1.0)  # HF: zeros (Qwen3), ones (Qwen2.5)
    deltas = []
    for b in range(B):
        tokens = input_ids[b].cpu()[mask[b]].tolist()
        pos = _sequence_positions(tokens, spec, media, use_audio_in_video, dtype)
        positions[:, b, mask[b]] = pos.float()
        deltas.append(pos.max() + 1 - len(tokens))
    return positions.to(input_ids.device), torch.stack(deltas).view(B, 1).to(input_ids.device)


def decode_positions(cache_lengths: torch.Tensor, rope_deltas: torch.Tensor) -> torch.Tensor:
    """(3, B, 1) float32 position of the next token of each row, given how many real tokens the row caches.

    This is HF's decode rule: cache position + rope_delta, the same on all three axes. For a prompt that
    ends in text, it equals the last prompt position + 1 (`generate`'s rule).
    """
    pos = cache_lengths.view(-1, 1).to(rope_deltas.device) + rope_deltas  # float32 add for Qwen3, as in HF
    return pos.float().unsqueeze(0).expand(3, -1, -1)


# -- placeholder layouts (what the processor writes) --------------------------------------------------------

def vision_tokens(spec: RopeSpec, grid_thw: Sequence[int], video: bool = False) -> list[int]:
    """`<|vision_bos|>` + one pad token per merged patch + `<|vision_eos|>`."""
    n = int(grid_thw[0]) * (int(grid_thw[1]) // spec.spatial_merge_size) * (int(grid_thw[2]) // spec.spatial_merge_size)
    pad = spec.video_token_id if video else spec.image_token_id
    return [spec.vision_start_token_id, *[pad] * n, spec.vision_end_token_id]


def audio_tokens(spec: RopeSpec, n_audio: int) -> list[int]:
    return [spec.audio_start_token_id, *[spec.audio_token_id] * n_audio, spec.audio_end_token_id]


def audio_in_video_tokens(spec: RopeSpec, grid_thw: Sequence[int], second_per_grid: float,
                          n_audio: int) -> list[int]:
    """Full audio-in-video block: `<|vision_bos|><|audio_bos|>` + interleaved pads + `<|audio_eos|><|vision_eos|>`.

    This is the processor's `replace_video_with_audio_token` (both families); it computes frame times in
    float64, as the processor does.
    """
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // spec.spatial_merge_size) * (w // spec.spatial_merge_size)
    times = [k * second_per_grid * spec.position_id_per_seconds for k in range(t) for _ in range(per_frame)]
    V, A = spec.video_token_id, spec.audio_token_id
    if spec.interleave == "chunked":
        per_chunk = int(spec.position_id_per_seconds * spec.seconds_per_chunk)
        v_chunks, a_chunks = _chunk_bounds(times, per_chunk), _chunk_bounds(range(n_audio), per_chunk)
        body = []
        for j in range(max(len(v_chunks), len(a_chunks))):
            if j < len(v_chunks):
                body += [V] * (v_chunks[j][1] - v_chunks[j][0])
            if j < len(a_chunks):
                body += [A] * (a_chunks[j][1] - a_chunks[j][0])
    else:
        body, i, j = [], 0, 0
        while i < len(times) and j < n_audio:  # merge by time; a frame goes before audio of the same time
            if times[i] <= j:
                body.append(V)
                i += 1
            else:
                body.append(A)
                j += 1
        body += [V] * (len(times) - i) + [A] * (n_audio - j)
    return [spec.vision_start_token_id, spec.audio_start_token_id, *body,
            spec.audio_end_token_id, spec.vision_end_token_id]


# -- internals ----------------------------------------------------------------------------------------------

class _Media:
    """Grids, seconds per grid and audio lengths, handed out in prompt order across the batch."""

    def __init__(self, image_grid_thw, video_grid_thw, video_second_per_grid, audio_lengths):
        self.images: Iterator = iter([] if image_grid_thw is None else image_grid_thw.tolist())
        # HF multiplies the float32 value: 2/3 s per grid is 0.6666667, not the float64 value.
        spg = [] if video_second_per_grid is None else torch.as_tensor(video_second_per_grid).cpu().float().view(-1)
        grids = [] if video_grid_thw is None else video_grid_thw.tolist()
        if len(spg) < len(grids):
            raise InputError(f"{len(grids)} videos but {len(spg)} video_second_per_grid values")
        self.videos: Iterator = iter(zip(grids, spg))
        self.audios: Iterator = iter([] if audio_lengths is None else [int(n) for n in audio_lengths])

    @staticmethod
    def take(it: Iterator, what: str):
        try:
            return next(it)
        except StopIteration:
            raise InputError(f"the prompt holds more {what} placeholders than {what} inputs were given") from None


def _sequence_positions(tokens: list[int], spec: RopeSpec, media: _Media, use_audio_in_video: bool,
                        dtype: torch.dtype) -> torch.Tensor:
    """(3, n) positions of one unpadded prompt in `dtype` (int64 for Qwen2.5, float32 for Qwen3).

    Arithmetic follows HF's order and dtypes so Qwen3's float positions match bit for bit.
    """
    shared_bos_eos = spec.interleave == "chunked"
    pieces: list[torch.Tensor] = []  # (3, k) blocks in token order

    def after_last() -> torch.Tensor:  # HF: max of the *last piece appended* + 1
        return pieces[-1].max() + 1 if pieces else torch.zeros((), dtype=dtype)

    def run(n: int, start: torch.Tensor) -> torch.Tensor:  # n consecutive positions, equal on the 3 axes
        return (torch.arange(n, dtype=dtype) + start).expand(3, n)

    def boundary(n: int, start: torch.Tensor) -> torch.Tensor:  # BOS or EOS token(s) of a block
        return run(1, start).expand(3, n) if shared_bos_eos else run(n, start)

    cur = 0
    while (bos := _next_block(tokens, cur, spec)) is not None:
        kind = _block_kind(tokens, bos, spec)
        if kind == "audio_in_video" and not use_audio_in_video:
            raise InputError("an audio-in-video block in the prompt but use_audio_in_video=False")
        start = after_last()
        if bos > cur:
            pieces.append(run(bos - cur, start))
            start = start + (bos - cur)
        n_bos = 2 if kind == "audio_in_video" else 1
        pieces.append(boundary(n_bos, start))
        content = bos + n_bos
        start = start + (1 if shared_bos_eos else n_bos)

        if kind == "audio":
            n = media.take(media.audios, "audio")
            _expect(tokens, content, {spec.audio_token_id: n}, spec.audio_end_token_id)
            pieces.append(run(n, start))
        elif kind in ("image", "video"):
            grid, spg = ((media.take(media.images, "image"), torch.tensor(1.0)) if kind == "image"
                         else media.take(media.videos, "video"))
            vis = _vision_positions(grid, spg, start, spec, dtype)
            pad = spec.image_token_id if kind == "image" else spec.video_token_id
            n = vis.shape[1]
            _expect(tokens, content, {pad: n}, spec.vision_end_token_id)
            pieces.append(vis)
        else:
            grid, spg = media.take(media.videos, "video")
            n_audio = media.take(media.audios, "audio")
            vid = _vision_positions(grid, spg, start, spec, dtype)
            aud = run(n_audio, start)
            n = vid.shape[1] + n_audio
            _expect(tokens, content, {spec.video_token_id: vid.shape[1], spec.audio_token_id: n_audio},
                    spec.audio_end_token_id, spec.vision_end_token_id)
            if spec.interleave == "chunked":
                pieces += _interleave_chunked(vid, aud, start, spec)
            else:
                pieces += _interleave_sorted(vid, aud)
        pieces.append(boundary(n_bos, after_last()))
        cur = content + n + n_bos

    if cur < len(tokens):
        pieces.append(run(len(tokens) - cur, after_last()))
    return torch.cat(pieces, dim=1)


def _next_block(tokens: list[int], cur: int, spec: RopeSpec) -> int | None:
    for i in range(cur, len(tokens)):
        if tokens[i] == spec.vision_start_token_id or tokens[i] == spec.audio_start_token_id:
            return i
    return None


def _block_kind(tokens: list[int], bos: int, spec: RopeSpec) -> str:
    if tokens[bos] == spec.audio_start_token_id:
        return "audio"
    nxt = tokens[bos + 1] if bos + 1 < len(tokens) else None
    kinds = {spec.image_token_id: "image", spec.video_token_id: "video", spec.audio_start_token_id: "audio_in_video"}
    if nxt not in kinds:
        raise InputError(f"<|vision_bos|> at {bos} is followed by token {nxt}, not an image/video/audio block")
    return kinds[nxt]


def _expect(tokens: list[int], start: int, counts: dict[int, int], *end_ids: int) -> None:
    """The block's content is exactly `counts` pad tokens (any order) and then `end_ids`."""
    n = sum(counts.values())
    body, tail = tokens[start:start + n], tokens[start + n:start + n + len(end_ids)]
    if any(body.count(tok) != c for tok, c in counts.items()) or tail != list(end_ids):
        raise InputError(f"media block at token {start}: expected {counts} pad tokens then {list(end_ids)}; "
                         "the placeholder count does not match the media inputs")


def _vision_positions(grid_thw: Sequence[int], second_per_grid: torch.Tensor, start: torch.Tensor,
                      spec: RopeSpec, dtype: torch.dtype) -> torch.Tensor:
    """(3, t*h*w) positions of a merged vision grid: frame time, row, column, offset by `start`."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // spec.spatial_merge_size, int(grid_thw[2]) // spec.spatial_merge_size
    # float32 like HF; .to(long) is Qwen2.5's truncation (0.667 s/grid at 25/s -> 0, 16, 33, 50)
    times = (torch.arange(t) * second_per_grid * spec.position_id_per_seconds).to(dtype)
    grid = torch.stack(torch.meshgrid(times, torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype),
                                      indexing="ij"))
    return grid.reshape(3, -1) + start


def _chunk_bounds(times: Sequence[float], per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) runs of non-decreasing `times`, cut where a time reaches the next multiple of `per_chunk`.

    As in HF's `get_chunked_index`, the cut line advances one chunk per token at most, so a jump over
    several chunks gives one-token runs. With 4 s per grid, frame 1 (t=100) splits into 1 + the rest.
    The processor and the model both cut this way, so the layouts still agree.
    """
    bounds, first, limit = [], 0, per_chunk
    for i, time in enumerate(times):
        if time >= limit:
            bounds.append((first, i))
            first, limit = i, limit + per_chunk
    bounds.append((first, len(times)))
    return bounds


def _interleave_chunked(vid: torch.Tensor, aud: torch.Tensor, start: torch.Tensor,
                        spec: RopeSpec) -> list[torch.Tensor]:
    """Qwen2.5: video chunk j, then audio chunk j. Chunks are cut on the times relative to the block start."""
    per_chunk = int(spec.position_id_per_seconds * spec.seconds_per_chunk)
    v_chunks = _chunk_bounds((vid[0] - start).tolist(), per_chunk)
    a_chunks = _chunk_bounds(range(aud.shape[1]), per_chunk)
    out = []
    for j in range(max(len(v_chunks), len(a_chunks))):
        if j < len(v_chunks):
            out.append(vid[:, v_chunks[j][0]:v_chunks[j][1]])
        if j < len(a_chunks):
            out.append(aud[:, a_chunks[j][0]:a_chunks[j][1]])
    return out


def _interleave_sorted(vid: torch.Tensor, aud: torch.Tensor) -> list[torch.Tensor]:
    """Qwen3: stable merge on T with video first on ties.

    Returns [merged prefix, trailing run]. HF appends the leftover tokens of the longer stream as one
    piece, and the EOS position comes from that piece alone.
    """
    vt, at = vid[0].contiguous(), aud[0].contiguous()
    # Merged slot of each token: its index plus how many tokens of the other stream come first.
    v_slot = torch.arange(len(vt)) + torch.searchsorted(at, vt, right=False)
    a_slot = torch.arange(len(at)) + torch.searchsorted(vt, at, right=True)
    merged = torch.empty(3, len(vt) + len(at), dtype=vid.dtype)
    merged[:, v_slot], merged[:, a_slot] = vid, aud
    is_video = torch.zeros(merged.shape[1], dtype=torch.bool)
    is_video[v_slot] = True
    # Trailing run: tokens after the last token of the other stream.
    other = (~is_video if is_video[-1] else is_video).nonzero()
    tail = int(other[-1]) + 1 if len(other) else 0
    return [merged[:, :tail], merged[:, tail:]]
