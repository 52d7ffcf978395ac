"""Spoken replies: the checkpoint's own Talker + vocoder, streamed beside the text; the offline voice otherwise.

Who speaks. A full Omni checkpoint with talker weights (`qwen2_5_omni` with `spk_dict.pt`, `qwen3_omni_moe`)
speaks with its talker (`SpeechEngine25` / `SpeechEngine3`); any other model (the embedded tiny model, text
LMs, thinker-only checkpoints) with the offline espeak-ng voice (voice.py). `Speech` is the per-assistant
switch: `load(..., speech="lazy")` (default) reads only config.json at load time and loads the talker and
vocoder the first time a spoken reply is asked for, so text-only use never pays their memory;
`speech=True` loads them at once; `speech=False` refuses spoken replies with an InputError.

How it streams (batch 1, one thread). The thinker runs through the assistant's normal `generate()` loop; a
`ThinkerRecorder` (speech_tap.py) records, without a second forward pass, the hidden states and the fed
tokens' embeddings the talker reads. After every text piece the engine advances the talker as far as the text
allows (talker step k needs the thinker's k-th fed token: speaking starts a few tokens after the text does)
and the vocoder as far as the codes allow, and yields the new audio right after the text:
* Qwen3 (`Code2WavStream`, exact): chunks of 4, 8, 16, then 32 frames (0.32 s first: latency; larger later:
  each chunk re-runs the conv stack on ~10 frames of left context, so small chunks cost throughput). Every
  chunk is exactly the matching span of the whole-clip decode.
* Qwen2.5 (`WaveStream25`, windowed). Its exact stream cannot start before the DiT's ODE look-ahead has
  arrived: 36 blocks = 432 codes = 8.6 s of speech with the released config (token2wav_stream25.py), i.e.
  after most replies are over. So spoken replies use the windowed sampler: 24-code windows (2 blocks,
  0.48 s) with 24 codes of left and 12 of right context, and BigVGAN in >= 24-frame pieces with its exact
  34-frame context. First audio needs ~60 codes (1.2 s of speech) from the talker, independent of the reply
  length; the window edges differ slightly from a whole-utterance decode (bench/tta.py measures this seam
  error: 5e-5 max against an RMS of 0.7 on its random realistic-shape DiT, where the exact stream's first audio
  came only 3% before the reference's whole pipeline; trained weights may couple blocks more strongly, so
  re-measure there). `exact=True` on the engine gives the exact stream instead.
The reference (`generate(return_audio=True)`) runs thinker, then talker, then vocoder, each to the end, so its
first audio comes after the whole pipeline; bench/tta.py compares the two.

Prompts. Qwen2.5-Omni's talker was trained under one system prompt (`SPEECH_SYSTEM_PROMPT`); a spoken reply
uses it, and a caller's own system message (persona) is moved to the start of the first user turn, the
workaround its README gives. Qwen3-Omni has no such rule. Voices: Qwen2.5 `spk_dict.pt` (Chelsie, Ethan;
default Chelsie), Qwen3 `talker_config.speaker_id` (Chelsie, Ethan, Aiden; default Ethan, the reference's).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import CheckpointError, InputError
from .generate import make_generator
from .sampling import SamplingParams
from .speech_tap import ThinkerRecorder

Run = Callable[..., Iterator[str]]  # run(messages, tap) -> text pieces: the assistant's generation loop


def talker_family(path: Path) -> str | None:
    """"qwen3" / "qwen2_5" when the checkpoint has a talker with its weights, else None (config + headers only)."""
    from safetensors import safe_open

    from .loader import safetensors_files

    f = Path(path) / "config.json"
    raw = json.loads(f.read_text()) if f.is_file() else {}
    family = {"qwen3_omni_moe": "qwen3", "qwen2_5_omni": "qwen2_5"}.get(raw.get("model_type"))
    if family is None or not raw.get("talker_config") or raw.get("enable_audio_output") is False:
        return None
    if family == "qwen2_5" and not (Path(path) / "spk_dict.pt").is_file():
        return None
    try:
        files = safetensors_files(Path(path))
    except CheckpointError:
        return None
    for sf_path in files:
        with safe_open(str(sf_path), framework="pt") as sf:
            if any(k.startswith("talker.") for k in sf.keys()):
                return family
    return None


class Speech:
    """The assistant's speech switch and lazily loaded engine (`assistant.speech`)."""

    def __init__(self, assistant, mode: bool | str = "lazy"):
        if mode not in (True, False, "lazy"):
            raise InputError(f"speech must be True, False or 'lazy', not {mode!r}")
        self.assistant, self.mode = assistant, mode
        self.family = talker_family(assistant.path) if mode is not False and assistant.kind in (
            "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker") else None
        self.engine: SpeechEngine | None = None
        self._max_audio_seconds: float | None = None
        self._lock = threading.Lock()
        self._voices: list[str] | None = None
        if mode is True and self.family:
            self.load()

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    @property
    def max_audio_seconds(self) -> float | None:
        """Longest spoken reply the talker may produce (None: the reference's budget of 4096 talker steps)."""
        return self._max_audio_seconds

    @max_audio_seconds.setter
    def max_audio_seconds(self, seconds: float | None) -> None:
        self._max_audio_seconds = seconds
        if self.engine is not None:
            self.engine.max_audio_seconds = seconds

    @property
    def voices(self) -> list[str]:
        """Voice names a spoken reply may use ([] when speech is off); the first is the default."""
        if self.mode is False:
            return []
        if self._voices is None:
            if self.family == "qwen3":
                names = list(json.loads((self.assistant.path / "config.json").read_text())["talker_config"]
                             .get("speaker_id") or {})
                names = [n.capitalize() if n.islower() else n for n in names]  # released keys are lower case
                self._voices = sorted(names, key=lambda n: (n.lower() != "ethan", n))
            elif self.family == "qwen2_5":
                from .speech_config25 import load_speakers

                self._voices = sorted(load_speakers(self.assistant.path), key=lambda n: (n != "Chelsie", n))
            else:
                from .voice import VOICES

                self._voices = list(VOICES)
        return self._voices

    def resolve_voice(self, voice: str | None) -> str:
        """Canonical voice name; "default"/None -> the first; unknown -> InputError listing the choices."""
        voices = self.voices
        if self.family is None:  # the offline voice also takes espeak-ng's own voice names
            return voice or "default"
        if not voice or voice == "default":
            return voices[0]
        match = [v for v in voices if v.lower() == voice.lower()]
        if not match:
            raise InputError(f"unknown voice {voice!r}; this model's voices are {', '.join(voices)}")
        return match[0]

    def load(self) -> "SpeechEngine":
        with self._lock:
            if self.engine is None:
                a = self.assistant
                cls = SpeechEngine3 if self.family == "qwen3" else SpeechEngine25
                engine = cls(a.model, a.path, a.dtype, a.device)
                engine.max_audio_seconds = self.max_audio_seconds
                self.engine = engine
        return self.engine

    def reply(self, run: Run, messages: list[dict], voice: str | None, stats: dict, start: float,
              seed: int | None = None) -> Iterator[str | np.ndarray]:
        """Text pieces and float32 24-kHz audio chunks, interleaved. Checks (mode, voice) happen now, not lazily."""
        if self.mode is False:
            raise InputError("spoken replies are disabled for this model (it was loaded with speech=False); load it "
                             "with speech=True or 'lazy' to enable them")
        name = self.resolve_voice(voice)
        stats.update(voice=name)
        if self.family is None:
            from .assistant import speak

            stats.update(speech="offline")
            return speak(run(messages, None), name, stats, start, self.assistant.reasoning_mode)
        engine = self.load()
        stats.update(speech="talker")
        return engine.stream(run, messages, name, stats, start, seed)


class SpeechEngine:
    """Thinker -> talker -> vocoder for one family. Subclasses set `hidden_layer` and make utterances."""

    hidden_layer: int
    steps_per_second: float  # talker steps per second of audio

    def __init__(self, thinker: torch.nn.Module):
        self.thinker = thinker
        self.max_audio_seconds: float | None = None  # None: the reference's talker budget (4096 steps)
        self.talker_params: SamplingParams | None = None  # None: the reference's talker sampling
        self.record_codes: list | None = None  # a list: every utterance's codes are appended (tests, benchmarks)

    def messages(self, messages: list[dict]) -> list[dict]:
        return messages

    def max_steps(self) -> int:
        s = self.max_audio_seconds
        return 4096 if s is None else max(1, int(s * self.steps_per_second))

    def utterance(self, rec: ThinkerRecorder, voice: str, seed: int | None, codes_out: list | None):
        raise NotImplementedError

    def stream(self, run: Run, messages: list[dict], voice: str, stats: dict, start: float,
               seed: int | None = None) -> Iterator[str | np.ndarray]:
        """Yield the thinker's text pieces and the talker's audio (np.float32, 24 kHz) as each becomes ready.

        run(messages, tap): the assistant's text stream with `tap` watching the thinker. `record_codes`, when a
        list, receives this utterance's codes (Qwen3: a (G,) frame each; Qwen2.5: ints) as one list.
        """
        rec = ThinkerRecorder(self.thinker, self.hidden_layer)
        codes_out = None
        if self.record_codes is not None:
            codes_out = []
            self.record_codes.append(codes_out)
        utt = self.utterance(rec, voice, seed, codes_out)
        synth, audio_s = 0.0, 0.0

        def timed(chunks: Iterator[torch.Tensor]) -> Iterator[np.ndarray]:
            nonlocal synth, audio_s
            t = time.perf_counter()
            for a in chunks:
                synth += time.perf_counter() - t
                stats.setdefault("time_to_first_audio", time.perf_counter() - start)
                audio_s += a.numel() / 24000
                stats.update(audio_seconds=audio_s, real_time_factor=synth / audio_s if audio_s else None)
                yield a.numpy()
                t = time.perf_counter()
            synth += time.perf_counter() - t

        text = run(self.messages(messages), rec)
        try:
            for piece in text:
                yield piece
                yield from timed(utt.step(final=False))
        finally:
            text.close()  # on Stop: release the thinker (lock, cache, hooks) now, not at garbage collection
        yield from timed(utt.step(final=True))
        stats.update(audio_seconds=audio_s, real_time_factor=synth / audio_s if audio_s else None)


def _media(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid") if k in inputs}


def _audio_in_video(ids: torch.Tensor, vision_start: int, audio_start: int) -> bool:
    row = ids[0].tolist()
    return any(a == vision_start and b == audio_start for a, b in zip(row, row[1:]))


# ------------------------------------------------------------------------------------------------ Qwen3-Omni

class SpeechEngine3(SpeechEngine):
    steps_per_second = 12.5
    chunks = (4, 8, 16, 32)  # Code2Wav frames per decode: the first small (latency), then growing

    def __init__(self, thinker, path: Path, dtype: torch.dtype, device: torch.device):
        from .talker3 import load_speech3

        super().__init__(thinker)
        self.talker, self.vocoder = load_speech3(path, thinker.cfg, dtype, device)
        self.hidden_layer = self.talker.cfg.talker.accept_hidden_layer
        self.predictor_params: SamplingParams | None = None

    def utterance(self, rec, voice, seed, codes_out):
        return _Utterance3(self, rec, voice, seed, codes_out)


class _Utterance3:
    def __init__(self, engine: SpeechEngine3, rec: ThinkerRecorder, voice: str, seed, codes_out):
        from .code2wav3 import Code2WavStream

        self.e, self.rec, self.voice, self.codes_out = engine, rec, voice, codes_out
        dev = engine.talker.codec_head.weight.device
        self.gen = make_generator(None if seed is None else seed + 1, dev)
        self.talk = None
        self.wave = Code2WavStream(engine.vocoder)
        self.chunk = 0  # index into engine.chunks

    def _open(self):
        from .talker3 import PREDICTOR_SAMPLING, TALKER_SAMPLING

        e, rec, th = self.e, self.rec, self.e.thinker.cfg
        ids = rec.inputs["input_ids"]
        media = _media(rec.inputs)
        if rec.inputs.get("feature_attention_mask") is not None:
            media["audio_lengths"] = e.thinker.audio_token_counts(rec.inputs["feature_attention_mask"]).tolist()
        media["use_audio_in_video"] = _audio_in_video(ids, th.vision_start_token_id, th.audio_start_token_id)
        cfg = e.talker.cfg
        special = rec.token_embeds(torch.tensor(cfg.tts_special_ids))
        ctx = e.talker.prepare(ids, rec.token_embeds(ids), rec.prompt_hidden(), cfg.multimodal_mask(ids), special,
                               self.voice, media)
        return e.talker.stream(ctx, max_frames=e.max_steps(), params=e.talker_params or TALKER_SAMPLING,
                               predictor_params=e.predictor_params or PREDICTOR_SAMPLING, generator=self.gen)

    def step(self, final: bool) -> Iterator[torch.Tensor]:
        if final and not self.rec.fed:
            return  # the thinker fed back no token (empty reply): nothing to speak
        if self.talk is None:
            if not self.rec.prompt_ready:
                return
            self.talk = self._open()
        fed = self.rec.take_fed()
        if fed:
            self.talk.push_text(torch.cat([emb.reshape(-1, emb.shape[-1]) for _, emb, _ in fed]))
        if final:
            self.talk.finish()
        for frame in self.talk.frames():
            if self.codes_out is not None:
                self.codes_out.append(frame)
            self.wave.push(frame)
            if self.wave.pending >= self.e.chunks[self.chunk]:
                self.chunk = min(self.chunk + 1, len(self.e.chunks) - 1)
                if (out := self.wave.decode()) is not None and out.numel():
                    yield out
        if final and (out := self.wave.decode()) is not None and out.numel():
            yield out


# ------------------------------------------------------------------------------------------------ Qwen2.5-Omni

WINDOW25 = dict(chunk_codes=24, left_codes=24, right_codes=12, vocoder_chunk_frames=24)


def persona_in_first_user_turn(messages: list[dict]) -> list[dict]:
    """Qwen2.5 speech: the fixed system prompt first; a caller's system message goes before the first user turn's
    text (the README's workaround for personas), so the talker keeps the prompt it was trained with."""
    from .talker25 import SPEECH_SYSTEM_PROMPT, speech_messages

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


class SpeechEngine25(SpeechEngine):
    steps_per_second = 50.0

    def __init__(self, thinker, path: Path, dtype: torch.dtype, device: torch.device):
        from .speech_config25 import load_speech25

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
    def __init__(self, engine: SpeechEngine25, rec: ThinkerRecorder, voice: str, seed, codes_out):
        self.e, self.rec, self.codes_out = engine, rec, codes_out
        self.speaker = engine.speakers[voice]
        dev = engine.talker.codec_head.weight.device
        self.gen = make_generator(None if seed is None else seed + 1, dev)
        self.noise = make_generator(None if seed is None else seed + 2)  # DiT initial noise, CPU: device-independent
        self.talk = self.wave = None

    def _open(self, first) -> None:
        from .talker25 import TALKER_SAMPLING, TalkerStream25
        from .token2wav_stream25 import WaveStream25

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
