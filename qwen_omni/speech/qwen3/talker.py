"""Qwen3-Omni talker: thinker outputs -> codec frames (num_code_groups codes per 12.5-Hz frame), streamed.

Design. The talker is our `TextModel` (Qwen3 layers with q/k norm, interleaved MRoPE, every layer a `SparseMoE`
with the sigmoid-gated shared expert) plus what is specific to speech: a codec embedding instead of token
embeddings, `codec_head`, two resize MLPs from the thinker width, and the code predictor - a small dense
`TextModel` with one embedding and one head per residual code group. Names are the checkpoint's minus `talker.`.

What the talker reads from the thinker (transformers 5.24 `Qwen3OmniMoeForConditionalGeneration.generate`):
* prompt, user turns only: `hidden_projection(thinker hidden @ accept_hidden_layer)` at multimodal placeholders,
  `text_projection(thinker token embedding)` elsewhere. System turns and earlier assistant turns are dropped.
* assistant turn ("segment": `<|im_start|>assistant\\n` from the prompt, then each generated token the
  thinker CONSUMED, i.e. its input embedding at each decode step - so not the last generated token, normally the
  EOS, which HF never embeds): prefix = seg[0:3], tts_pad x4, tts_bos, seg[3] (9 rows), each added to the codec
  embedding of (0, 0, 0, nothink, think_bos, think_eos, speaker, codec_pad, codec_bos).
* step k >= 1: input = sum of the G group embeddings of frame k-1 + trailing[k-1], where trailing =
  seg[4:] + [tts_eos], and tts_pad once it runs out. So generated tokens need only their EMBEDDING; the thinker
  hidden state is read only at the prompt's multimodal positions.
Because step k needs only seg[4 + k - 1], the talker can run while the thinker is still generating: it waits
only when it gets ahead of the text (`TalkerStream`). Its output is then identical to the offline result.

Frames: code 0 comes from `codec_head` (repetition penalty over earlier code-0s, the last 1024 ids except EOS
suppressed); codes 1..G-1 from the code predictor, fed [talker's final normed hidden, embed(code 0)] and then
each new code's embedding (a fresh cache per frame). EOS as code 0 ends the stream. Batch 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.generate import pull_stream
from ...engine.sampling import SamplingParams, apply_repetition_penalty, sample
from ...errors import InputError
from ...models.config import TextConfig
from ...models.decoder import TextModel
from ...models.kv_cache import KVCache
from ...models.positions import decode_positions, rope_index
from .config import SpeechConfig

# transformers' defaults in `generate` (talker) and in the talker's code-predictor call (sampling mode).
TALKER_SAMPLING = SamplingParams(temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05)
PREDICTOR_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.8)
# Greedy as HF runs it with talker_do_sample=False: the talker's repetition penalty still applies.
TALKER_GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.05)
PREDICTOR_GREEDY = SamplingParams(temperature=0.0)


class ResizeMLP(nn.Module):
    """thinker width -> talker width: fc2(silu(fc1(x))), both with bias."""

    def __init__(self, cfg: TextConfig, thinker_hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(thinker_hidden, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerModel(TextModel):
    """`talker.model`: the decoder with `codec_embedding` (codec vocab) where a text LM has `embed_tokens`."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.codec_embedding = self.embed_tokens
        del self.embed_tokens


class CodePredictorModel(TextModel):
    """`talker.code_predictor.model`: dense layers; codec_embedding[g] embeds residual group g+1."""

    def __init__(self, cfg: TextConfig, groups: int):
        super().__init__(cfg)
        del self.embed_tokens
        self.codec_embedding = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(groups - 1))


class CodePredictor(nn.Module):
    def __init__(self, cfg: TextConfig, groups: int):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.model = CodePredictorModel(cfg, groups)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(groups - 1))

    def new_cache(self) -> KVCache:
        p = self.lm_head[0].weight
        return KVCache(self.cfg.num_hidden_layers, 1, self.groups, self.cfg.num_key_value_heads, self.cfg.head_dim,
                       p.dtype, p.device)

    def predict(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor, cache: KVCache,
                params: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """talker_hidden, code0_embed: (1, H) -> codes 1..G-1 (G-1,) and their embeddings [(1, H)] * (G-1)."""
        cache.reset()
        x = torch.stack([talker_hidden, code0_embed], dim=1)  # (1, 2, H), positions 0 and 1
        codes, embeds = [], []
        for g in range(self.groups - 1):
            h = self.model(x, None, cache)
            tok = sample(self.lm_head[g](h[:, -1]), params, generator)  # (1,)
            codes.append(tok)
            embeds.append(self.model.codec_embedding[g](tok))
            x = embeds[-1][:, None]
        return torch.cat(codes), embeds


@dataclass
class TalkerContext:
    """The thinker prompt, turned into talker rows (everything before the first generated token)."""
    user_embeds: torch.Tensor  # (1, U, H) projected user-turn rows
    user_ids: torch.Tensor  # (1, U) their thinker ids (for TMRoPE)
    segment: list[torch.Tensor]  # projected assistant-segment rows so far, (H,) each
    tts_bos: torch.Tensor  # (H,)
    tts_eos: torch.Tensor
    tts_pad: torch.Tensor
    speaker_id: int
    media: dict = field(default_factory=dict)  # `positions.rope_index` keyword arguments for the user media


class Talker3(nn.Module):
    def __init__(self, cfg: SpeechConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.talker
        self.model = TalkerModel(t.text)
        self.text_projection = ResizeMLP(t.text, t.thinker_hidden_size)
        self.hidden_projection = ResizeMLP(t.text, t.thinker_hidden_size)
        self.codec_head = nn.Linear(t.text.hidden_size, t.text.vocab_size, bias=False)
        self.code_predictor = CodePredictor(t.code_predictor, t.num_code_groups)

    @property
    def dtype(self) -> torch.dtype:
        return self.codec_head.weight.dtype

    @torch.no_grad()
    def prepare(self, ids: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor, multimodal_mask: torch.Tensor,
                special_embeds: torch.Tensor, speaker: str, media: dict | None = None) -> TalkerContext:
        """The talker's view of a thinker prompt (batch 1).

        ids (1, P) prompt ids ending inside the last assistant turn (normally with `<|im_start|>assistant\\n`;
        generated tokens already consumed by the thinker may follow - then do not push them again);
        embeds (1, P, Ht) the thinker's token embeddings (hidden_states[0]); hidden (1, P, Ht) its hidden states
        at `accept_hidden_layer` (only multimodal rows are read); multimodal_mask (1, P) bool
        (`SpeechConfig.multimodal_mask(ids)`); special_embeds (3, Ht) the thinker embeddings of
        `SpeechConfig.tts_special_ids` (tts_bos, tts_eos, tts_pad); media: `rope_index` kwargs (image_grid_thw,
        video_grid_thw, video_second_per_grid, audio_lengths in LLM tokens, use_audio_in_video).
        """
        c, dt, dev = self.cfg, self.dtype, self.codec_head.weight.device
        speaker_id = c.talker.speaker_id.get(speaker.lower())
        if speaker_id is None:
            raise InputError(f"unknown speaker {speaker!r}; this checkpoint has {sorted(c.talker.speaker_id)}")
        ids, embeds, hidden = ids.to(dev), embeds.to(dev, dt), hidden.to(dev, dt)
        ids0, P = ids[0], ids.shape[1]
        # Role of each token = the token after the latest <|im_start|> at or before it (HF's rule).
        pos = torch.arange(P, device=ids.device)
        opened = torch.where(ids0 == c.im_start_token_id, pos, torch.full_like(pos, -1)).cummax(0).values.clamp_min(0)
        user = ids0[(opened + 1).clamp_max(P - 1)] == c.user_token_id
        mm = multimodal_mask[0].to(ids.device)
        rows = torch.empty(P, c.talker.text.hidden_size, dtype=dt, device=ids.device)
        if mm.any():  # project all prompt rows in the same two batches HF does
            rows[mm] = self.hidden_projection(hidden[0][mm])
        rows[~mm] = self.text_projection(embeds[0][~mm])
        starts = ((ids0[:-1] == c.im_start_token_id) & (ids0[1:] == c.assistant_token_id)).nonzero().flatten()
        if starts.numel() == 0:
            raise InputError("the prompt has no '<|im_start|>assistant' turn for the talker to speak")
        a = int(starts[-1])
        tts = self.text_projection(special_embeds[None].to(dev, dt))[0]  # (3, H)
        segment = list(self.text_projection(embeds[0, a:]).unbind(0))
        return TalkerContext(rows[user][None], ids0[user][None], segment, tts[0], tts[1], tts[2], speaker_id,
                             dict(media or {}))

    def stream(self, ctx: TalkerContext, **kw) -> "TalkerStream":
        return TalkerStream(self, ctx, **kw)

    def stream_codes(self, ctx: TalkerContext, text_embeds: Iterable[torch.Tensor], **kw) -> Iterator[torch.Tensor]:
        """Yield code frames (G,) long as the thinker's generated-token embeddings ((Ht,) or (n, Ht)) arrive.

        `text_embeds` yields the thinker's input embedding of each decode step (every generated token but the
        last, normally EOS); it is pulled only when the talker needs more text, and its end means the thinker is
        done. Keyword arguments go to `TalkerStream`.
        """
        stream = TalkerStream(self, ctx, **kw)
        yield from pull_stream(stream, text_embeds, stream.frames, stream.push_text)

    def generate_codes(self, ctx: TalkerContext, generated_embeds: torch.Tensor, **kw) -> torch.Tensor:
        """Offline: the thinker's decode-step input embeddings (n, Ht) at once -> codes (G, T)."""
        frames = list(self.stream_codes(ctx, [generated_embeds], **kw))
        return torch.stack(frames, dim=1) if frames else torch.zeros(self.cfg.talker.num_code_groups, 0,
                                                                      dtype=torch.long)


class TalkerStream:
    """One utterance: `push_text` / `finish` feed the thinker side, `frames()` yields what that allows.

    max_frames: frame budget (HF's talker_max_new_tokens = max_frames + 1: its last code 0 never gets residual
    codes). params / predictor_params: `TALKER_SAMPLING` / `PREDICTOR_SAMPLING` (HF defaults) or the greedy pair.
    """

    def __init__(self, talker: Talker3, ctx: TalkerContext, max_frames: int = 4096,
                 params: SamplingParams = TALKER_SAMPLING, predictor_params: SamplingParams = PREDICTOR_SAMPLING,
                 generator: torch.Generator | None = None):
        self.t, self.ctx, self.max_frames = talker, ctx, max_frames
        self.params, self.predictor_params, self.generator = params, predictor_params, generator
        tc = talker.cfg.talker
        self.G, self.eos = tc.num_code_groups, tc.codec_eos_token_id
        V = tc.text.vocab_size
        self.suppress = torch.tensor([i for i in range(V - 1024, V) if i != self.eos], dtype=torch.long)
        w = talker.codec_head.weight
        self.cache = KVCache(tc.text.num_hidden_layers, 1, ctx.user_embeds.shape[1] + 9 + max_frames,
                             tc.text.num_key_value_heads, tc.text.head_dim, w.dtype, w.device)
        self.cp_cache = talker.code_predictor.new_cache()
        self.segment = list(ctx.segment)
        self.finished = self.done = False
        self.n = 0  # frames yielded
        self.seen = torch.zeros(1, 0, dtype=torch.long)  # code-0 history for the repetition penalty
        self.rope_delta: torch.Tensor | None = None
        self.last_group_embeds: torch.Tensor | None = None  # (1, 1, H) sum over the groups of the last frame

    @torch.no_grad()
    def push_text(self, embeds: torch.Tensor) -> None:
        """The thinker's input embeddings (Ht,) or (n, Ht) of its next decode steps (the tokens it consumed)."""
        rows = self.t.text_projection(embeds.reshape(-1, embeds.shape[-1]).to(self.t.codec_head.weight))
        self.segment.extend(rows.unbind(0))

    def finish(self) -> None:
        """The thinker has stopped: after the last pushed token come tts_eos, then tts_pad."""
        self.finished = True

    def _trailing(self, j: int) -> torch.Tensor | None:
        k = 4 + j
        if k < len(self.segment):
            return self.segment[k]
        if not self.finished:
            return None  # the talker is ahead of the text: wait for the thinker
        return self.ctx.tts_eos if k == len(self.segment) else self.ctx.tts_pad

    @torch.no_grad()
    def frames(self) -> Iterator[torch.Tensor]:
        while not self.done:
            if self.n == 0:
                if len(self.segment) < 4:
                    if self.finished:
                        raise InputError("the assistant turn is too short for the talker (needs 1 generated token)")
                    return
                logits, hidden = self._prefill()
            else:
                trailing = self._trailing(self.n - 1)
                if trailing is None:
                    return
                x = self.last_group_embeds + trailing
                pos = decode_positions(self.cache.lengths, self.rope_delta)
                logits, hidden = self._forward(x, pos)
            code0 = self._choose(logits)
            if int(code0) == self.eos:
                self.done = True
                return
            embed0 = self.t.model.codec_embedding(code0)  # (1, H)
            rest, embeds = self.t.code_predictor.predict(hidden, embed0, self.cp_cache, self.predictor_params,
                                                         self.generator)
            # HF sums the G embeddings in one reduction over a (1, G, H) stack.
            self.last_group_embeds = torch.stack([embed0, *embeds], dim=1).sum(1, keepdim=True)
            self.n += 1
            self.done = self.n >= self.max_frames
            yield torch.cat([code0, rest]).cpu()

    def _prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, ctx, seg = self.t.cfg.talker, self.ctx, self.segment
        text = torch.stack([*seg[:3], *[ctx.tts_pad] * 4, ctx.tts_bos, seg[3]])  # (9, H)
        codec = self.t.model.codec_embedding(torch.tensor(
            [c.codec_nothink_id, c.codec_think_bos_id, c.codec_think_eos_id, ctx.speaker_id, c.codec_pad_id,
             c.codec_bos_id], device=text.device))
        prefix = text + torch.cat([codec.new_zeros(3, codec.shape[1]), codec])
        x = torch.cat([ctx.user_embeds, prefix[None]], dim=1)  # (1, U + 9, H)
        ids = torch.cat([ctx.user_ids, ctx.user_ids.new_full((1, 9), self.t.cfg.tts_pad_token_id)], dim=1)
        pos, self.rope_delta = rope_index(ids.cpu(), self.t.cfg.rope, **ctx.media)
        self.rope_delta = self.rope_delta.to(x.device)
        return self._forward(x, pos.to(x.device))

    def _forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (1, S, H) -> last position's codec logits (1, V) and final normed hidden (1, H)."""
        h = self.t.model(x, pos, self.cache)[:, -1]
        return self.t.codec_head(h), h

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        logits = apply_repetition_penalty(logits.float(), self.seen.to(logits.device), self.params.repetition_penalty)
        logits[:, self.suppress.to(logits.device)] = float("-inf")
        tok = sample(logits, self.params, self.generator)  # (1,)
        self.seen = torch.cat([self.seen, tok[:, None].cpu()], dim=1)
        return tok
