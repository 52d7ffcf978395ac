"""Qwen2.5-Omni Talker: thinker embeddings + hidden states -> codec codes for token2wav, as a code stream.

The decoder is our `TextModel` (a Qwen2 stack with q/k/v bias and contiguous MRoPE, like the thinker's); only
its embedding differs: codec embeddings are `embedding_size` wide (= thinker hidden size), and every input
goes through `thinker_to_talker_proj` (Linear with bias) before the layers. `codec_head` gives the logits.

Inputs, exactly as transformers 5.24 `Qwen2_5OmniForConditionalGeneration.generate` builds them (E = thinker
hidden size; L = prompt length; n thinker tokens generated, token i fed back to the thinker for i < n-1):
* prompt (L + 2 slots):  [hidden_L + embed_L] ++ [thinker_embed(speaker bos_token)] ++ [reply_0]
  - embed_L: thinker input embeddings of the prompt with image/video/audio placeholder positions set to 0;
  - hidden_L: the thinker's last-layer (final-normed) hidden states of the prompt;
  - reply_i = hidden + embed of generated token i when the thinker fed it (`Talker25.reply_input`);
  - the last two slots also get the codec embeddings of codec_pad and codec_bos added; the other L slots
    get nothing for their `codec_mask` ids, which only feed the repetition penalty;
  - TMRoPE positions of [prompt ids, bos_token, generated token 0], with the talker config's token ids.
* decode step k >= 1: codec_embed(code k-1) + reply_k while the thinker has fed token k, then
  thinker_embed(tts_text_eos) once, then thinker_embed(tts_text_pad) for ever; text positions continue at
  cache length + rope delta on all three axes.
* codes: codec_bos is suppressed, the repetition penalty sees [codec_mask * L, codec_pad, codec_bos] plus
  the codes so far, and codec_pad / codec_end stop the stream (reference `talker_eos_token_id`).

So talker step k needs only the thinker's token k: `stream_codes` pulls reply parts lazily from an iterator
and yields codes as they come, and `speak` drives our Thinker's generation loop underneath (a hook on its
decoder records the embeddings and hidden states; no thinker code changes). The reference instead runs the
thinker to the end first; both produce the same codes (tests/test_speech25.py).

transformers 5.24 quirk: its `generate` drops an all-ones attention mask ("no padding"), and the talker builds
the TMRoPE positions and adds the codec pad/bos embeddings only when it gets a mask. So for one unpadded
sample 5.24 runs the talker with plain positions 0, 1, 2, ... and without those two embeddings, unlike a
padded batch and unlike the talker's design. We default to the design; `hf524_batch1=True` reproduces 5.24's
single-sample codes exactly. Both are tested against transformers' own talker code.

Speech output also needs the reference's system prompt (`SPEECH_SYSTEM_PROMPT`, see `speech_messages`).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from encoders.qwen25_audio import audio_output_lengths

from ...engine.generate import generate, pull_stream
from ...engine.sampling import SamplingParams, apply_repetition_penalty, sample
from ...errors import InputError
from ...models.decoder import TextModel
from ...models.kv_cache import KVCache
from ...models.positions import RopeSpec, decode_positions, family_rules, rope_index
from .config import TalkerConfig25

# Qwen2.5-Omni README / chat-templates.md: speech output is only supported under this exact system prompt.
SPEECH_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                        "perceiving auditory and visual inputs, as well as generating text and speech.")
VOICES = ("Chelsie", "Ethan")  # the released spk_dict.pt; the reference default is Chelsie
DEFAULT_VOICE = "Chelsie"
# transformers' talker defaults (generate(talker_do_sample=True, top_k=40, top_p=0.8, temperature=0.9, ...))
TALKER_SAMPLING = SamplingParams(temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05)
TALKER_GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.05)  # talker_do_sample=False


def speech_messages(messages: list[dict], replace_system: bool = False) -> list[dict]:
    """`messages` with the speech system prompt first: inserted when there is no system message; a different
    system message raises InputError unless `replace_system` (the talker was trained with this one only)."""
    if messages and messages[0].get("role") == "system":
        content = messages[0].get("content")
        text = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content if isinstance(p, dict))
        if text == SPEECH_SYSTEM_PROMPT:
            return list(messages)
        if not replace_system:
            raise InputError("speech output needs the system prompt "
                             f"{SPEECH_SYSTEM_PROMPT!r}; pass replace_system=True to use it instead of yours")
        messages = messages[1:]
    return [{"role": "system", "content": SPEECH_SYSTEM_PROMPT}, *messages]


def pick_voice(speakers: dict[str, dict], name: str | None = None) -> dict:
    """The spk_dict entry of voice `name` (default Chelsie, as the reference); InputError names the choices."""
    name = name or DEFAULT_VOICE
    if name not in speakers:
        raise InputError(f"voice {name!r} is not in this checkpoint's spk_dict.pt; available: {sorted(speakers)}")
    return speakers[name]


@dataclass
class TalkerPrompt:
    embeds: torch.Tensor  # (1, L + 2, E) thinker-space sums, before the codec pad/bos embeddings
    positions: torch.Tensor  # (3, 1, L + 2)
    rope_deltas: torch.Tensor  # (1, 1)
    codec_ids: torch.Tensor  # (1, L + 2) long: codec_mask * L, codec_pad, codec_bos (repetition-penalty context)


class Talker25(nn.Module):
    def __init__(self, cfg: TalkerConfig25):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.model = TextModel(cfg.text)
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embedding_size)  # codec embeddings, width E
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        c = cfg
        self.rope_spec = RopeSpec(
            image_token_id=c.image_token_index, video_token_id=c.video_token_index, audio_token_id=c.audio_token_index,
            vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
            audio_start_token_id=c.audio_start_token_id, audio_end_token_id=c.audio_end_token_id,
            spatial_merge_size=c.spatial_merge_size, position_id_per_seconds=c.position_id_per_seconds,
            **family_rules(qwen3=False, seconds_per_chunk=c.seconds_per_chunk))

    @staticmethod
    def reply_input(token_embed: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The per-step thinker input: (1, 1, E) thinker embedding of a fed token + its last hidden state."""
        return hidden + token_embed

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """embeds (1, S, E) thinker-space inputs -> codec logits (1, S, vocab) float32."""
        w = self.thinker_to_talker_proj.weight
        return self.codec_head(self.model(self.thinker_to_talker_proj(embeds.to(w)), positions, cache)).float()

    def build_prompt(self, input_ids: torch.Tensor, prompt_embeds: torch.Tensor, prompt_hidden: torch.Tensor,
                     first_reply: torch.Tensor, bos_embed: torch.Tensor, bos_token: int, first_token: int,
                     media: dict | None = None) -> TalkerPrompt:
        """The reference's talker prompt from the thinker's prompt pass and its first generated token.

        input_ids (1, L); prompt_embeds (1, L, E) with placeholders zeroed; prompt_hidden (1, L, E);
        first_reply (1, 1, E) = reply_input of generated token 0; bos_embed (1, 1, E) = thinker embedding of
        the speaker's bos_token. media: the processor's grids / audio mask, for the TMRoPE positions.
        """
        media = media or {}
        dev = input_ids.device
        text_ids = torch.cat([input_ids, torch.tensor([[bos_token, first_token]], device=dev)], dim=1)
        audio = media.get("feature_attention_mask")
        if audio is not None:
            audio = audio_output_lengths(audio.sum(-1).long())
        s = self.rope_spec
        ids = text_ids[0].tolist()
        in_video = any(a == s.vision_start_token_id and b == s.audio_start_token_id for a, b in zip(ids, ids[1:]))
        pos, deltas = rope_index(text_ids, s, media.get("image_grid_thw"), media.get("video_grid_thw"),
                                 media.get("video_second_per_grid"), audio, use_audio_in_video=in_video)
        embeds = torch.cat([prompt_hidden + prompt_embeds, bos_embed, first_reply], dim=1)
        c = self.cfg
        codec_ids = torch.tensor([[c.tts_codec_mask_token_id] * input_ids.shape[1]
                                  + [c.tts_codec_pad_token_id, c.tts_codec_start_token_id]], device=dev)
        return TalkerPrompt(embeds, pos, deltas, codec_ids)

    @torch.no_grad()
    def stream_codes(self, prompt: TalkerPrompt, replies: Iterable[torch.Tensor], text_eos_embed: torch.Tensor,
                     text_pad_embed: torch.Tensor, **kw) -> Iterator[int]:
        """Yield codec codes (stop code excluded), pulling reply_k from `replies` only when step k needs it.

        replies: reply parts (1, 1, E) of generated tokens 1, 2, ... (token 0's is in the prompt); when it is
        exhausted, text_eos_embed (1, 1, E) is used once, then text_pad_embed. Keyword arguments: `TalkerStream25`.
        """
        stream = TalkerStream25(self, prompt, text_eos_embed, text_pad_embed, **kw)
        yield from pull_stream(stream, replies, stream.codes, stream.push)


class TalkerStream25:
    """One utterance, push-style: `push(reply)` / `finish()` feed the thinker side, `codes()` yields what they allow.

    params: `TALKER_SAMPLING` (reference default) or `TALKER_GREEDY`. hf524_batch1: reproduce what transformers
    5.24 actually computes for one unpadded sample. Its `generate` drops an all-ones attention mask, and the
    talker only builds TMRoPE positions and adds the codec pad/bos embeddings when it receives a mask; so that
    path runs with plain positions 0, 1, 2, ... and without the two codec embeddings. Default (False): the
    talker as designed (and as transformers runs it when a mask reaches it, e.g. a left-padded batch).
    """

    @torch.no_grad()
    def __init__(self, talker: Talker25, prompt: TalkerPrompt, text_eos_embed: torch.Tensor,
                 text_pad_embed: torch.Tensor, *, params: SamplingParams = TALKER_SAMPLING, max_new_tokens: int = 4096,
                 generator: torch.Generator | None = None, stop_ids: Iterable[int] | None = None,
                 hf524_batch1: bool = False):
        c = talker.cfg
        self.t, self.params, self.max_new_tokens, self.generator = talker, params, max_new_tokens, generator
        self.text_eos, self.text_pad = text_eos_embed, text_pad_embed
        codec = talker.model.embed_tokens
        dev = codec.weight.device
        self.stop = set(stop_ids if stop_ids is not None else (c.tts_codec_pad_token_id, c.tts_codec_end_token_id))
        ids = lambda *t: torch.tensor(t, device=dev)  # noqa: E731
        embeds = prompt.embeds.to(codec.weight).clone()
        if not hf524_batch1:
            embeds[:, -1] += codec(ids(c.tts_codec_start_token_id))
            embeds[:, -2] += codec(ids(c.tts_codec_pad_token_id))
        L = embeds.shape[1]
        self.cache = KVCache(c.num_hidden_layers, 1, L + max_new_tokens, c.num_key_value_heads, c.head_dim,
                             codec.weight.dtype, dev)
        # positions None = the cache slots, the same on all three axes
        self.position = (lambda: None) if hf524_batch1 else (
            lambda: decode_positions(self.cache.lengths, prompt.rope_deltas.to(dev)))
        self.logits = talker(embeds, None if hf524_batch1 else prompt.positions.to(dev), self.cache)[:, -1]
        self.seen = prompt.codec_ids.to(dev)  # repetition-penalty context
        self.replies: deque[torch.Tensor] = deque()
        self.finished = self.text_done = self.done = False
        self.step = 0  # codes yielded
        self.code: torch.Tensor | None = None  # the last code, waiting for its reply part to be fed back

    def push(self, reply: torch.Tensor) -> None:
        """The reply part (1, 1, E) of the thinker's next fed token (`Talker25.reply_input`)."""
        self.replies.append(reply)

    def finish(self) -> None:
        """The thinker is done: tts_text_eos comes next, then tts_text_pad."""
        self.finished = True

    @torch.no_grad()
    def codes(self) -> Iterator[int]:
        c, codec = self.t.cfg, self.t.model.embed_tokens
        while not self.done:
            if self.code is None:
                logits = apply_repetition_penalty(self.logits, self.seen, self.params.repetition_penalty)
                logits[:, c.tts_codec_start_token_id] = float("-inf")  # suppress_tokens=[codec_bos]
                code = sample(logits, self.params, self.generator)  # (1,)
                if int(code) in self.stop:
                    self.done = True
                    return
                self.step += 1
                self.done = self.step >= self.max_new_tokens
                yield int(code)
                if self.done:
                    return
                self.seen = torch.cat([self.seen, code[:, None].to(self.seen.device)], dim=1)
                self.code = code
            if self.text_done:
                reply = self.text_pad
            elif self.replies:
                reply = self.replies.popleft()
            elif self.finished:  # the reply text is over: tts_text_eos once, then tts_text_pad
                reply, self.text_done = self.text_eos, True
            else:
                return  # ahead of the thinker: wait for its next token
            x = codec(self.code[:, None].to(codec.weight.device)) + reply.to(codec.weight)
            self.logits = self.t(x, self.position(), self.cache)[:, -1]
            self.code = None


class ThinkerTap:
    """Records, while our Thinker runs its normal prefill / decode_step, what the talker reads from it.

    A forward hook on the thinker's decoder (`thinker.model`) sees its input embeddings and final-normed hidden
    states: the first call is the prompt, every later call one fed token (whose reply part is queued).
    """

    def __init__(self, thinker: nn.Module):
        self.thinker = thinker
        self.prompt_embeds: torch.Tensor | None = None
        self.prompt_hidden: torch.Tensor | None = None
        self.replies: deque[torch.Tensor] = deque()
        self._hook = thinker.model.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        if self.prompt_hidden is None:
            self.prompt_embeds, self.prompt_hidden = args[0].detach(), output.detach()
        else:
            self.replies.append(Talker25.reply_input(args[0].detach(), output.detach()))

    def close(self) -> None:
        self._hook.remove()

    def talker_prompt_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt input embeddings with every media placeholder zeroed, as the reference hands them over."""
        if self.prompt_embeds is None or self.prompt_embeds.shape[1] != input_ids.shape[1]:
            raise InputError("speech needs the thinker to prefill the whole prompt in one pass (no reused prefix)")
        c = self.thinker.cfg
        media = torch.isin(input_ids.to(self.prompt_embeds.device),
                           torch.tensor([c.audio_token_id, c.image_token_id, c.video_token_id],
                                        device=self.prompt_embeds.device))
        return self.prompt_embeds.masked_fill(media[..., None], 0)


@torch.no_grad()
def speak(thinker: nn.Module, talker: Talker25, inputs: dict, speaker: dict, *, max_new_tokens: int = 1024,
          stop_ids: Iterable[int] = (), thinker_params: SamplingParams = SamplingParams(),
          talker_params: SamplingParams = TALKER_SAMPLING, talker_max_new_tokens: int = 4096,
          thinker_generator: torch.Generator | None = None, talker_generator: torch.Generator | None = None,
          on_token: Callable[[int], None] | None = None, hf524_batch1: bool = False) -> Iterator[int]:
    """Run the thinker on `inputs` (our processor's output) and yield the talker's codes as they come.

    Text tokens go to `on_token` as the thinker produces them (the stop token excluded). The thinker is only
    advanced as far as the talker needs, then run to its end after the talker stops. speaker: a spk_dict entry.
    hf524_batch1: see `Talker25.stream_codes`.
    """
    ids = inputs["input_ids"]
    cache = thinker.new_cache(1, ids.shape[1] + max_new_tokens + 1)
    tap = ThinkerTap(thinker)
    tokens: list[int] = []
    try:
        text = generate(lambda: thinker.prefill(inputs, cache), lambda t: thinker.decode_step(t, cache),
                        context_ids=ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, params=thinker_params,
                        generator=thinker_generator)

        def reply_parts() -> Iterator[torch.Tensor]:
            for t in text:
                tokens.append(t)
                if on_token is not None:
                    on_token(t)
                while tap.replies:
                    yield tap.replies.popleft()
            while tap.replies:
                yield tap.replies.popleft()

        replies = reply_parts()
        first = next(replies, None)  # needs the thinker to have fed its first token
        if first is not None:
            embed = thinker.model.embed_tokens
            tok = lambda t: embed(torch.tensor([[t]], device=embed.weight.device))  # noqa: E731
            prompt = talker.build_prompt(ids.to(embed.weight.device), tap.talker_prompt_embeds(ids), tap.prompt_hidden,
                                         first, tok(speaker["bos_token"]), speaker["bos_token"], tokens[0], inputs)
            yield from talker.stream_codes(prompt, replies, tok(talker.cfg.tts_text_end_token_id),
                                           tok(talker.cfg.tts_text_pad_token_id), params=talker_params,
                                           max_new_tokens=talker_max_new_tokens, generator=talker_generator,
                                           hf524_batch1=hf524_batch1)
        for _ in replies:  # the talker may stop before the text does: finish the text
            pass
    finally:
        tap.close()
