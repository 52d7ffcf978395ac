"""The web app's settings: flags, environment, loading the model, queue and launch options.

Settings come from flags, then `QWEN_OMNI_*` environment variables, then Gradio's own `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT` (what Hugging Face Spaces sets), then defaults (`parse_settings`). A bad environment value
is reported like a bad flag. Like `chat_session`, this module never imports gradio.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import CheckpointError
from .session import EXAMPLES_DIR, MAX_BYTES, ROOT


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
    assistant = load(settings.model, device=settings.device, dtype=settings.dtype, quantize=settings.quantize)
    assistant.speech.max_audio_seconds = settings.max_audio_seconds
    return assistant


def queue_options(settings: Settings) -> dict:
    return {"default_concurrency_limit": settings.concurrency, "max_size": settings.queue_size}


def launch_options(settings: Settings) -> dict:
    return {"server_name": settings.host, "server_port": settings.port, "share": settings.share,
            "inbrowser": settings.inbrowser, "show_error": False, "max_file_size": max(MAX_BYTES.values()),
            "allowed_paths": [str(EXAMPLES_DIR)], "ssr_mode": False, "quiet": True}


def on_gpu(fn: Callable) -> Callable:
    """`spaces.GPU` on Hugging Face ZeroGPU Spaces; the function itself everywhere else."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)
