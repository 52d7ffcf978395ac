"""Qwen2.5-Omni speech: its talker, and token2wav (a DiT to mel, then BigVGAN) over sliding windows.

Its exact stream cannot start before the DiT's ODE look-ahead has arrived: 36 blocks = 432 codes = 8.6 s of
speech with the released config (token2wav_stream.py), after most replies are over. So spoken replies use
the windowed sampler: 24-code windows (2 blocks, 0.48 s) with 24 codes of left and 12 of right context, and
BigVGAN in >= 24-frame pieces with its exact 34-frame context. First audio then needs ~60 codes (1.2 s of
speech) from the talker, whatever the reply's length; the window edges differ slightly from a whole-utterance
decode (`bench/tta.py` measures that seam error). `exact=True` on the pipeline gives the exact stream instead.

Prompts. The talker was trained under one system prompt (`SPEECH_SYSTEM_PROMPT`); a spoken reply uses it, and a
caller's own system message (a persona) moves to the start of the first user turn, the workaround the model's
README gives. Voices come from `spk_dict.pt` (Chelsie, Ethan; default Chelsie).

`load_speech25` builds the talker and token2wav on the meta device and fills them strictly from the
checkpoint's `talker.*` / `token2wav.*` tensors (`loader.load_into`; only those tensors are read), and reads
the speaker bank `spk_dict.pt` with `torch.load(weights_only=True)`: plain tensors, ints and dicts only, never
arbitrary pickled objects. It is the one non-safetensors file we read. token2wav stays float32 whatever
`dtype` is asked for, as the reference casts it (`enable_talker()` calls `.float()`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ...engine.generate import make_generator
from ...errors import CheckpointError
from ...models.config import read_config_json
from ...models.loader import empty_weights, load_into, read_prefixed
from ..pipeline import SpeechPipeline
from ..tap import ThinkerRecorder
from .config import SpeechConfig25
from .talker import SPEECH_SYSTEM_PROMPT, TALKER_SAMPLING, Talker25, TalkerStream25, speech_messages
from .token2wav import Token2Wav25
from .token2wav_stream import WaveStream25


def can_speak(path: Path) -> bool:
    """Qwen2.5 speaks only with its speaker bank beside the weights."""
    return (Path(path) / SPEAKER_FILE).is_file()


def voices(path: Path) -> list[str]:
    """The speaker bank's names, default (Chelsie) first."""
    return sorted(load_speakers(path), key=lambda n: (n != "Chelsie", n))


SPEAKER_FILE = "spk_dict.pt"


def load_speakers(path: Path) -> dict[str, dict[str, Any]]:
    """`spk_dict.pt`: {name: {"bos_token": int, "cond": (enc_emb_dim,), "ref_mel": (T, mel) or (1, T, mel)}}."""
    f = Path(path) / SPEAKER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {SPEAKER_FILE}; speech output needs the checkpoint's speaker bank")
    try:
        raw = torch.load(f, map_location="cpu", weights_only=True)  # tensors/ints/dicts only: no code runs
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{f}: cannot be read as plain tensors ({type(e).__name__}: {e})") from None
    speakers = {}
    for name, entry in raw.items():
        missing = {"bos_token", "cond", "ref_mel"} - set(entry)
        if missing:
            raise CheckpointError(f"{f}: speaker {name!r} lacks {sorted(missing)}")
        ref = torch.as_tensor(entry["ref_mel"]).float()
        speakers[name] = {"bos_token": int(entry["bos_token"]), "cond": torch.as_tensor(entry["cond"]).float(),
                          "ref_mel": ref if ref.dim() == 3 else ref[None]}
    return speakers


def load_speech25(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """-> (Talker25 in `dtype`, Token2Wav25 in float32, speakers) from a full Qwen2.5-Omni checkpoint directory."""
    path = Path(path)
    cfg = SpeechConfig25.parse(read_config_json(path))
    with empty_weights():
        talker = Talker25(cfg.talker)
        token2wav = Token2Wav25(cfg.token2wav)
    for module, prefix, dt in ((talker, "talker.", dtype), (token2wav, "token2wav.", torch.float32)):
        load_into(module, read_prefixed(path, (prefix,)), lambda name, p=prefix: name[len(p):], dt, device,
                  source=f"{path} ({prefix[:-1]})")
    return talker.eval(), token2wav.eval(), load_speakers(path)


WINDOW25 = dict(chunk_codes=24, left_codes=24, right_codes=12, vocoder_chunk_frames=24)


def persona_in_first_user_turn(messages: list[dict]) -> list[dict]:
    """Qwen2.5 speech: the fixed system prompt first; a caller's system message goes before the first user turn's
    text (the README's workaround for personas), so the talker keeps the prompt it was trained with."""
    if not messages or messages[0].get("role") != "system":
        return speech_messages(messages)
    c = messages[0].get("content")
    persona = (c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [] if isinstance(p, dict))).strip()
    rest = list(messages[1:])
    if persona and persona != SPEECH_SYSTEM_PROMPT:
        i = next((i for i, m in enumerate(rest) if m.get("role") == "user"), None)
        if i is None:
            rest.insert(0, {"role": "user", "content": persona})
        else:
            u = rest[i]["content"]
            rest[i] = {**rest[i], "content": f"{persona}\n\n{u}" if isinstance(u, str) else
                       [{"type": "text", "text": persona + "\n\n"}, *u]}
    return speech_messages(rest)


class SpeechPipeline25(SpeechPipeline):
    steps_per_second = 50.0

    def __init__(self, thinker, path: Path, dtype: torch.dtype, device: torch.device):
        super().__init__(thinker)
        self.talker, self.token2wav, self.speakers = load_speech25(path, dtype, device)
        self.hidden_layer = thinker.cfg.text.num_hidden_layers  # the final-normed output
        self.exact = False  # windowed DiT stream (module docstring); True: the exact, high-latency one
        self.window = dict(WINDOW25)
        self.num_steps = 10

    def messages(self, messages):
        return persona_in_first_user_turn(messages)

    def utterance(self, rec, voice, seed, codes_out):
        return _Utterance25(self, rec, voice, seed, codes_out)


class _Utterance25:
    def __init__(self, pipeline: SpeechPipeline25, rec: ThinkerRecorder, voice: str, seed, codes_out):
        self.e, self.rec, self.codes_out = pipeline, rec, codes_out
        self.speaker = pipeline.speakers[voice]
        dev = pipeline.talker.codec_head.weight.device
        self.gen = make_generator(None if seed is None else seed + 1, dev)
        self.noise = make_generator(None if seed is None else seed + 2)  # DiT initial noise, CPU: device-independent
        self.talk = self.wave = None

    def _open(self, first) -> None:
        e, rec, c = self.e, self.rec, self.e.talker.cfg
        ids = rec.inputs["input_ids"]
        th = e.thinker.cfg
        embeds = rec.token_embeds(ids)
        media = torch.isin(ids, torch.tensor([th.audio_token_id, th.image_token_id, th.video_token_id]))
        embeds = embeds.masked_fill(media[..., None].to(embeds.device), 0)  # placeholders zeroed, as the reference
        tok = lambda t: rec.token_embeds(torch.tensor([[t]]))  # noqa: E731
        token, emb, hidden = first
        bos = self.speaker["bos_token"]
        dev = embeds.device
        prompt = e.talker.build_prompt(ids.to(dev), embeds, rec.prompt_hidden(), hidden + emb, tok(bos), bos, token,
                                       rec.inputs)
        self.talk = TalkerStream25(e.talker, prompt, tok(c.tts_text_end_token_id), tok(c.tts_text_pad_token_id),
                                   params=e.talker_params or TALKER_SAMPLING, max_new_tokens=e.max_steps(),
                                   generator=self.gen)
        window = {} if e.exact else e.window
        self.wave = WaveStream25(e.token2wav, self.speaker["cond"][None], self.speaker["ref_mel"], noise=self.noise,
                                 num_steps=e.num_steps, exact=e.exact, **window)

    def step(self, final: bool) -> Iterator[torch.Tensor]:
        if self.talk is None:
            first = self.rec.take_fed(1)
            if not first:
                return  # the talker's prompt includes the first fed token: wait for it
            self._open(first[0])
        for _, emb, hidden in self.rec.take_fed():
            self.talk.push(hidden + emb)  # `Talker25.reply_input`
        if final:
            self.talk.finish()
        for code in self.talk.codes():
            if self.codes_out is not None:
                self.codes_out.append(code)
            yield from self.wave.push([code])
        if final:
            yield from self.wave.finish()


Pipeline = SpeechPipeline25  # the name speech.FAMILIES looks up
