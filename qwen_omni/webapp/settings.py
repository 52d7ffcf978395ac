"""The web app's settings: flags, environment, loading the model, queue and launch options.

Settings come from flags, then `QWEN_OMNI_*` environment variables, then Gradio's own `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT` (what Hugging Face Spaces sets), then defaults (`parse_settings`). A bad environment value
is reported like a bad flag. Like `session.py`, this module never imports gradio.

On a ZeroGPU Space (`SPACES_ZERO_GPU` set) the model is loaded onto `cuda` unless --device says otherwise, and its
talker at once: under ZeroGPU a lazily loaded talker would be loaded inside a GPU call's forked worker and lost
with it. `on_gpu` and `gpu_duration` are the `spaces.GPU` wiring app.py uses.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import CheckpointError
from .session import AUDIO_DIR, EXAMPLES_DIR, MAX_BYTES, ROOT


@dataclass(frozen=True)
class Settings:
    model: str | None
    device: str | None
    dtype: str | None
    host: str
    port: int
    share: bool
    inbrowser: bool
    max_new_tokens: int
    concurrency: int
    queue_size: int
    backend: str = "local"  # "openai": answer through an OpenAI-compatible server (qwen_omni/serving/remote.py)
    base_url: str | None = None
    api_key: str | None = None
    max_audio_seconds: float | None = None  # cap on one spoken reply (talker steps); None: the reference's
    quantize: str | None = None  # "int8": decoder weights as int8 (CPU)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ

    def pick(*names: str, default: str | None = None) -> str | None:
        return next((env[n] for n in names if env.get(n)), default)

    p = argparse.ArgumentParser(prog="app.py", description="Qwen-Omni web chat (Gradio).")
    # String defaults go through `type`, so a bad environment value is reported like a bad flag.
    p.add_argument("--model", default=pick("QWEN_OMNI_MODEL"),
                   help="checkpoint directory or Hub id (default: the embedded model in assets/tiny-omni)")
    p.add_argument("--device", default=pick("QWEN_OMNI_DEVICE"), help="cpu, cuda, cuda:1, mps (default: best)")
    p.add_argument("--dtype", default=pick("QWEN_OMNI_DTYPE"), choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=pick("QWEN_OMNI_QUANTIZE"), choices=[None, "int8"],
                   help="int8: decoder weights stored as int8, faster CPU decoding")
    p.add_argument("--host", default=pick("QWEN_OMNI_HOST", "GRADIO_SERVER_NAME", default="127.0.0.1"))
    p.add_argument("--port", type=int, default=pick("QWEN_OMNI_PORT", "GRADIO_SERVER_PORT", default="7860"))
    p.add_argument("--share", action="store_true", default=_flag(pick("QWEN_OMNI_SHARE")),
                   help="also serve on a public gradio.live link")
    p.add_argument("--inbrowser", action="store_true", default=_flag(pick("QWEN_OMNI_INBROWSER")))
    p.add_argument("--max-new-tokens", type=int, default=pick("QWEN_OMNI_MAX_NEW_TOKENS", default="1024"),
                   help="upper end of the max-new-tokens slider")
    p.add_argument("--concurrency", type=int, default=pick("QWEN_OMNI_CONCURRENCY", default="1"),
                   help="replies generated at once; others wait in the queue and see their position")
    p.add_argument("--queue-size", type=int, default=pick("QWEN_OMNI_QUEUE_SIZE", default="64"))
    p.add_argument("--backend", choices=["local", "openai"], default=pick("QWEN_OMNI_BACKEND", default="local"),
                   help="openai: answer through an OpenAI-compatible server at --base-url (vLLM, qwen_omni serve)")
    p.add_argument("--base-url", default=pick("QWEN_OMNI_BASE_URL"), help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=pick("QWEN_OMNI_API_KEY", "OPENAI_API_KEY"), help="the server's key")
    p.add_argument("--max-audio-seconds", type=float, default=pick("QWEN_OMNI_MAX_AUDIO_SECONDS"),
                   help="longest spoken reply a talker may produce (default: the reference's 4096 talker steps)")
    a = p.parse_args(argv)
    for name in ("max_new_tokens", "concurrency", "queue_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.backend == "openai" and not a.base_url:
        p.error("--backend openai needs --base-url")
    return Settings(a.model, a.device, a.dtype, a.host, a.port, a.share, a.inbrowser, a.max_new_tokens,
                    a.concurrency, a.queue_size, a.backend, a.base_url, a.api_key, a.max_audio_seconds, a.quantize)


def load_assistant(settings: Settings):
    """`qwen_omni.load` with a clearer message when the embedded default model is not there."""
    from ..assistant import DEFAULT_MODEL, load

    if settings.backend == "openai":  # --model then names the server's model (default: its first)
        from ..serving.remote import RemoteAssistant

        return RemoteAssistant(settings.base_url, api_key=settings.api_key, model=settings.model).connect()
    if settings.model is None and not DEFAULT_MODEL.is_dir():
        raise CheckpointError(
            f"the default model ({DEFAULT_MODEL.relative_to(ROOT)}) is not in this checkout; pass --model PATH "
            f"(a checkpoint directory or a Hub id such as Qwen/Qwen2.5-Omni-3B) or set QWEN_OMNI_MODEL")
    zero = zero_gpu()
    assistant = load(settings.model, device=settings.device or ("cuda" if zero else None), dtype=settings.dtype,
                     quantize=settings.quantize, speech=True if zero else "lazy")
    assistant.speech.max_audio_seconds = settings.max_audio_seconds
    return assistant


def queue_options(settings: Settings) -> dict:
    return {"default_concurrency_limit": settings.concurrency, "max_size": settings.queue_size}


def launch_options(settings: Settings) -> dict:
    return {"server_name": settings.host, "server_port": settings.port, "share": settings.share,
            "inbrowser": settings.inbrowser, "show_error": False, "max_file_size": max(MAX_BYTES.values()),
            "allowed_paths": [str(EXAMPLES_DIR), str(AUDIO_DIR)], "ssr_mode": False, "quiet": True}


def zero_gpu(environ: dict[str, str] | None = None) -> bool:
    """Whether this runs on a ZeroGPU Space (the variable and values the `spaces` package itself reads)."""
    return (os.environ if environ is None else environ).get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


# ZeroGPU reserves a GPU for the seconds a call declares: a call running longer is cut off (the default, 60 s, can
# cut a long spoken reply), and a larger declaration waits longer in the queue and is refused when it exceeds the
# visitor's remaining daily quota. So the budget follows what was asked: a fixed part (attaching the GPU, encoding
# media, prefill), then per requested new token, more when the reply is spoken (talker and vocoder run per text
# token). These are margins chosen without a ZeroGPU to time them on; the cap keeps one call within a quota.
GPU_SECONDS_BASE = 15
GPU_SECONDS_PER_TOKEN = 0.05
GPU_SECONDS_PER_SPOKEN_TOKEN = 0.3
GPU_SECONDS_MAX = 300


def gpu_duration(max_new_tokens: int, speak: bool) -> int:
    per_token = GPU_SECONDS_PER_TOKEN + (GPU_SECONDS_PER_SPOKEN_TOKEN if speak else 0.0)
    return int(min(GPU_SECONDS_MAX, GPU_SECONDS_BASE + per_token * max(1, int(max_new_tokens))))


def on_gpu(duration: Callable[..., int]) -> Callable[[Callable], Callable]:
    """`spaces.GPU(duration=duration)` where the `spaces` package is installed (it does nothing off ZeroGPU);
    the function itself elsewhere. `duration` is called with the decorated function's arguments."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)
