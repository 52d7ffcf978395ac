"""Qwen3-Omni speech: its MoE talker and code predictor, and Code2Wav decoding the codes in growing chunks.

Streaming is exact: Code2Wav decodes chunks of 4, 8, 16, then 32 frames (small first, for latency; larger
later, since each chunk re-runs the conv stack over ~10 frames of left context), and every chunk is exactly
the matching span of the whole-clip decode. Voices come from `talker_config.speaker_id` (Chelsie, Ethan,
Aiden); the default is Ethan, the reference's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ...engine.generate import make_generator
from ...engine.sampling import SamplingParams
from ...models.config import read_config_json
from ...models.loader import empty_weights, load_into, read_prefixed
from ...models.omni_config import ThinkerConfig
from ..pipeline import SpeechPipeline, audio_in_video, media_of
from ..tap import ThinkerRecorder
from .code2wav import Code2Wav3, Code2WavStream
from .config import SpeechConfig
from .talker import PREDICTOR_SAMPLING, TALKER_SAMPLING, Talker3


def can_speak(path: Path) -> bool:
    """Qwen3 needs nothing beside the talker weights."""
    return True


def voices(path: Path) -> list[str]:
    """The checkpoint's speakers, default (Ethan) first; the released config's keys are lower case."""
    names = list(json.loads((Path(path) / "config.json").read_text())["talker_config"].get("speaker_id") or {})
    names = [n.capitalize() if n.islower() else n for n in names]
    return sorted(names, key=lambda n: (n.lower() != "ethan", n))


def load_speech3(path: str | Path, thinker_cfg: ThinkerConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
    """(Talker3, Code2Wav3) from a full Qwen3-Omni checkpoint directory (`talker.*`, `code2wav.*` keys)."""
    path = Path(path)
    cfg = SpeechConfig.parse(read_config_json(path), thinker_cfg)
    with empty_weights():
        talker, vocoder = Talker3(cfg), Code2Wav3(cfg.code2wav)
    load_into(talker, read_prefixed(path, ("talker.",)), lambda n: n.removeprefix("talker."), dtype, device,
              source=f"{path} (talker)")
    load_into(vocoder, read_prefixed(path, ("code2wav.",)), lambda n: n.removeprefix("code2wav."), dtype, device,
              source=f"{path} (code2wav)")
    return talker.eval(), vocoder.eval()


class SpeechPipeline3(SpeechPipeline):
    steps_per_second = 12.5
    chunks = (4, 8, 16, 32)  # Code2Wav frames per decode: the first small (latency), then growing

    def __init__(self, thinker, path: Path, dtype: torch.dtype, device: torch.device):
        super().__init__(thinker)
        self.talker, self.vocoder = load_speech3(path, thinker.cfg, dtype, device)
        self.hidden_layer = self.talker.cfg.talker.accept_hidden_layer
        self.predictor_params: SamplingParams | None = None

    def utterance(self, rec, voice, seed, codes_out):
        return _Utterance3(self, rec, voice, seed, codes_out)


class _Utterance3:
    def __init__(self, pipeline: SpeechPipeline3, rec: ThinkerRecorder, voice: str, seed, codes_out):
        self.e, self.rec, self.voice, self.codes_out = pipeline, rec, voice, codes_out
        dev = pipeline.talker.codec_head.weight.device
        self.gen = make_generator(None if seed is None else seed + 1, dev)
        self.talk = None
        self.wave = Code2WavStream(pipeline.vocoder)
        self.chunk = 0  # index into the pipeline's chunks

    def _open(self):
        e, rec, th = self.e, self.rec, self.e.thinker.cfg
        ids = rec.inputs["input_ids"]
        media = media_of(rec.inputs)
        if rec.inputs.get("feature_attention_mask") is not None:
            media["audio_lengths"] = e.thinker.audio_token_counts(rec.inputs["feature_attention_mask"]).tolist()
        media["use_audio_in_video"] = audio_in_video(ids, th.vision_start_token_id, th.audio_start_token_id)
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


Pipeline = SpeechPipeline3  # the name speech.FAMILIES looks up
