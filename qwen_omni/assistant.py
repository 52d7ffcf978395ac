"""`load()` and `Assistant`: the public API that the app, the CLI and the server all use.

`Assistant.prepare(messages)` turns a chat (Qwen / transformers message format) into exactly what the model
sees; `Assistant.chat(...)` generates the reply, as one string or as a stream of text pieces. Multi-turn
conversations reuse the KV state of earlier turns through a `PrefixCache`, so only new tokens are prefilled.

Generation runs under `torch.inference_mode` (here and in the batch scheduler), not `no_grad`: no view or version
tracking per op, which makes a CPU decode step faster (docs/cpu-kernels.md). Its tensors (the KV caches
kept for the next turn, cached media features) are then inference tensors, so every path that writes into
them runs in that mode too.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .engine import reasoning
from .engine.generate import generate, make_generator
from .engine.prefix_cache import PrefixCache
from .engine.processor import build_processor
from .engine.sampling import SamplingParams
from .engine.tokenizer import StreamDecoder, Tokenizer
from .errors import ContextOverflowError, InputError
from .models.kv_cache import copy_prefix
from .models.loader import resolve_checkpoint
from .models.moe import SparseMoE
from .models.quant import quantize_int8
from .models.registry import build_model
from .speech.pipeline import join_spoken
from .speech.switch import Speech

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-omni"


def pick_device(device: str | None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available")
        if device == "mps" and not torch.backends.mps.is_available():
            raise InputError("--device mps was asked for but MPS is not available")
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
        return DTYPES[dtype]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load(model: str | Path | None = None, *, device: str | None = None, dtype: str | torch.dtype | None = None,
         speech: bool | str = "lazy", quantize: str | None = None) -> "Assistant":
    """Load a checkpoint (local directory or Hub id; default: the embedded model in assets/).

    speech: "lazy" (default) loads a full Omni checkpoint's talker and vocoder when a spoken reply is first asked
    for; True loads them now; False disables spoken replies (see speech/switch.py).
    quantize: "int8" stores the decoder's linear and expert weights as int8 (CPU only; models/quant.py): faster decoding
    and less memory, at a small accuracy cost. The encoders, embedding, norms and routers stay in `dtype`.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: the only quantization is 'int8'")
    path = resolve_checkpoint(model if model is not None else DEFAULT_MODEL)
    dev = pick_device(device)
    if quantize and dev.type != "cpu":
        raise ValueError(f"int8 quantization runs on the CPU only (torch's int8 kernel); this device is {dev}")
    net, kind = build_model(path, pick_dtype(dtype, dev), dev)
    if quantize:
        quantize_int8(net, skip=("visual", "audio_tower"))
    return Assistant(net, Tokenizer.from_dir(path), path, kind, build_processor(path, net), speech=speech)


class Assistant:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None, path: Path, kind: str, processor=None,
                 speech: bool | str = "lazy"):
        self.model, self.tokenizer, self.path, self.kind = model, tokenizer, path, kind
        self.processor = processor  # media -> tensors for Omni thinkers; None for text-only models
        self.device = next(model.parameters()).device
        self.dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.context_window = model.cfg.max_position_embeddings
        self.stop_ids = self._stop_ids()
        self.prefix_cache = PrefixCache(capacity=4)
        self.lock = threading.Lock()  # one generation at a time per model (the server batches instead)
        self.speech = Speech(self, speech)  # spoken replies: talker/vocoder loaded on first use
        self.reasoning_mode = reasoning.mode(tokenizer)  # a thinking model's <think> part: see reasoning.py

    # ---- what the model sees ------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], add_generation_prompt: bool = True, **options: Any) -> dict:
        """The exact model inputs for `messages`: {"input_ids": (1, n) long, ...processor tensors}."""
        self._need_tokenizer()
        if self.processor is not None:
            return self.processor(self.tokenizer, messages, add_generation_prompt, **options)
        text = self.tokenizer.render(flatten_text(messages), add_generation_prompt=add_generation_prompt)
        return {"input_ids": torch.tensor([self.tokenizer.encode(text)], dtype=torch.long)}

    # ---- chatting ------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
             stream: bool = False, stats: dict | None = None, speech: bool = False, voice: str = "default",
             **options: Any):
        """Reply to `messages`; with stream=True an iterator of text pieces as they are produced.

        speech=True also speaks the reply (float32 mono 24 kHz numpy chunks): streamed, the iterator yields
        text pieces (str) and audio chunks (np.ndarray) interleaved as they are ready; not streamed, the result
        is (text, audio). Full Omni checkpoints speak with their talker (`voice` from `self.speech.voices`), other
        models with the offline voice, whose first audio comes once the first sentence is complete (speech/switch.py).
        `stats`, when given, is filled with token counts, timings, reuse information and, with speech, time to
        first audio and real-time factor.

        `messages` may also be a list of conversations (the model cards' batch example): the result is then a list
        with one reply per conversation, not streamed, and `stats` describes the last one.
        """
        if is_batch(messages):  # answered in turn: the server, not this call, batches concurrent requests
            if stream:
                raise InputError("stream=True takes one conversation; call chat once per conversation to stream each")
            return [self.chat(c, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty, seed=seed, stats=stats, speech=speech,
                              voice=voice, **options) for c in messages]
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        stats = stats if stats is not None else {}
        start = time.perf_counter()
        if speech:
            pieces = self.speech.reply(
                lambda msgs, tap: self._stream(msgs, max_new_tokens, params, seed, stats, options, tap=tap),
                messages, voice, stats, start, seed)
        else:
            pieces = self._stream(messages, max_new_tokens, params, seed, stats, options)
        if stream:
            return pieces
        if not speech:
            return "".join(pieces)
        return join_spoken(pieces)

    @torch.inference_mode()  # applied around each resume of the generator (module docstring)
    def _stream(self, messages, max_new_tokens, params, seed, stats, options, tap=None) -> Iterator[str]:
        """Text pieces of the reply. tap: a `speech_tap.ThinkerRecorder` that watches the thinker for the talker
        (it may refuse a reused prefix whose hidden states it lacks; it keeps its rows with the cached state)."""
        t0 = time.perf_counter()
        inputs = self.prepare(messages, **options)
        stats["prepare_time"] = time.perf_counter() - t0  # media decoding + features + template
        ids = inputs["input_ids"]
        n = ids.shape[1]
        if n >= self.context_window:
            raise ContextOverflowError(
                f"the prompt is {n} tokens (media placeholders included) but this model's context window is "
                f"{self.context_window}; shorten the conversation, or send smaller or fewer images/audio/video")
        budget = min(max_new_tokens, self.context_window - n)
        with self.lock:
            key = inputs.get("cache_key") or ids[0].tolist()
            cache, reused, extra = self.prefix_cache.take(key)
            if tap is not None and cache is not None:
                reused = tap.reusable(extra, reused)
                cache.truncate(reused)
            if cache is None or cache.max_len < n + budget:
                old, cache = cache, self.model.new_cache(1, n + budget)
                reused = copy_prefix(old, cache, reused) if old is not None else 0
            stats.update(prompt_tokens=n, reused_tokens=reused)
            gen = make_generator(seed)
            decoder = StreamDecoder(self.tokenizer)
            out: list[int] = []
            ttft = None

            def prefill():
                enc0 = getattr(self.model, "encode_seconds", 0.0)
                logits = self.model.prefill(inputs, cache, start=reused)
                enc = getattr(self.model, "encode_seconds", 0.0) - enc0
                if enc:  # media ran through the encoders: their time plus decoding and features (prepare)
                    stats["encode_time"] = stats["prepare_time"] + enc
                return logits

            try:
                if tap is not None:
                    tap.begin(inputs, extra, reused)
                for tok in generate(prefill, lambda t: self.model.decode_step(t, cache), context_ids=ids,
                                    max_new_tokens=budget, stop_ids=self.stop_ids, params=params, generator=gen):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    out.append(tok)
                    piece = decoder.push(tok)
                    if piece:
                        yield piece
                tail = decoder.flush()
                if tail:
                    yield tail
            finally:
                # keep the state for the next turn: the prompt plus what was generated and is in the cache
                held = list(key) + out[:-1]
                cache.truncate(len(held))
                self.prefix_cache.put(held, cache, tap.end(len(held)) if tap is not None else None)
                dt = time.perf_counter() - t0
                stats.update(completion_tokens=len(out), time_to_first_token=ttft, total_time=dt,
                             tokens_per_second=(len(out) - 1) / (dt - ttft) if ttft and len(out) > 1 and dt > ttft
                             else None)

    # ---- facts for the UI ----------------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)[0]

    @property
    def num_active_parameters(self) -> int:
        """Parameters touched per generated token: MoE layers count only top-k of their experts."""
        return count_parameters(self.model)[1]

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"{self.path} has no tokenizer files (tokenizer.json or vocab.json), so it cannot chat")

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        gen_cfg = self.path / "generation_config.json"
        for src in ([json.loads(gen_cfg.read_text())] if gen_cfg.is_file() else []):
            eos = src.get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None:
            for t in ("<|im_end|>", "<|endoftext|>"):
                if (i := self.tokenizer.token_id(t)) is not None:
                    ids.add(i)
        return sorted(ids)


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(total, active per generated token) parameters of a model; works on the meta device too.

    Active: MoE layers count only top-k of their experts, and an Omni thinker's audio and vision encoders are left
    out - they run once per media item at prefill, never per generated token. Tied weights count once.
    """
    total = active = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, SparseMoE):
            e = m.gate.weight.shape[0]  # the router scores every expert
            per_expert = sum(p.numel() for p in m.experts.parameters()) // e
            active -= (e - m.top_k) * per_expert
    for name in ("audio_tower", "visual"):
        encoder = getattr(module, name, None)
        if isinstance(encoder, torch.nn.Module):
            active -= sum(p.numel() for p in encoder.parameters())
    return total, active


def is_batch(messages) -> bool:
    """A list of conversations (each a list of messages) rather than one conversation."""
    return isinstance(messages, (list, tuple)) and bool(messages) and all(isinstance(c, (list, tuple))
                                                                          for c in messages)
def flatten_text(messages: list[dict]) -> list[dict]:
    """For text-only models: list-of-parts content -> one string; media parts are an error."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError("each message must be a dict with 'role' and 'content'")
        c = m["content"]
        if isinstance(c, list):
            kinds = {p.get("type") for p in c if isinstance(p, dict)} - {"text"}
            if kinds:
                raise InputError(f"this model reads text only; it cannot take {', '.join(sorted(map(str, kinds)))}")
            c = "".join(p.get("text", "") for p in c)
        elif not isinstance(c, str):
            raise InputError("message content must be a string or a list of parts")
        out.append({**m, "content": c})
    return out
