"""Command line: `python -m qwen_omni chat [--model PATH_OR_ID] ["question"] [--image F] [--audio F] [--video F]`,
`python -m qwen_omni serve [--model ...] [--host H] [--port P]` (OpenAI-compatible server, `serving/server.py`) and
`python -m qwen_omni space DIR [--model ...] [--hardware ...]` (a Hugging Face Space folder, `webapp/space.py`).

With a question, the answer streams to stdout and the program exits; without one, an interactive multi-turn
chat opens (`/reset` forgets the conversation, `/quit` or Ctrl-D leaves). Media flags attach files to the
first turn. Errors a user can cause print one line and exit with status 2; nothing prints a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import QwenOmniError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """What `load` takes from a command line (`chat` and `serve`): --model, --device, --dtype, --quantize."""
    p.add_argument("--model", default=None, help="model directory or Hub id (default: the embedded model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: decoder weights stored as int8, faster CPU decoding (models/quant.py)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qwen_omni", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("question", nargs="?", help="ask once and exit; omit for an interactive chat")
    add_model_arguments(chat)
    chat.add_argument("--image", action="append", default=[], help="attach an image (repeatable)")
    chat.add_argument("--audio", action="append", default=[], help="attach an audio file (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="attach a video (repeatable)")
    chat.add_argument("--use-audio-in-video", action="store_true", help="also listen to the videos' sound")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int, default=None)
    add_serve_parser(sub)
    space = sub.add_parser("space", help="write a Hugging Face Space folder (app, library, model, README YAML)")
    space.add_argument("dir", help="the folder to write (new or empty)")
    space.add_argument("--model", default=None,
                       help="a Hub id (fetched by the Space's build) or a checkpoint directory (copied in); "
                            "default: the embedded model, copied in")
    space.add_argument("--hardware", default="cpu-basic",
                       help="Space hardware: cpu-basic, zero-gpu, t4-small, l4, a10g, a100-large, ... "
                            "(decides the Python version and torch pin)")
    space.add_argument("--force", action="store_true", help="replace a previous build in DIR")
    return ap


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (see docs/serving.md)")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWEN_OMNI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $QWEN_OMNI_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="model id to report (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--max-model-len", type=int, default=4096, help="positions per slot (prompt + reply)")
    p.add_argument("--prefix-cache-size", type=int, default=16, help="conversations kept for prefix reuse")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (413 above)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs (off: 400)")
    p.add_argument("--media-dir", type=Path, default=None, help="allow local file paths under this folder")
    p.add_argument("--backend", choices=["local", "openai"], default="local",
                   help="local: run the model here; openai: forward to --base-url")
    p.add_argument("--base-url", default=None, help="with --backend openai: e.g. http://gpu-box:8000/v1")
    p.add_argument("--remote-api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="with --backend openai: the upstream's key (default: $OPENAI_API_KEY)")
    p.add_argument("--remote-model", default=None, help="with --backend openai: upstream model id (default: first)")
    p.add_argument("--engine-process", action="store_true",
                   help="run the model in a child process, so HTTP work and decode steps do not share a GIL "
                        "(serving/process_backend.py)")
    p.add_argument("--max-audio-seconds", type=float, default=None,
                   help="longest spoken reply (talker models; default: the talker's own budget)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is best on a busy shared machine)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def user_turn(text: str, images=(), audios=(), videos=()) -> dict:
    parts = [{"type": "image", "image": f} for f in images] + [{"type": "audio", "audio": f} for f in audios]
    parts += [{"type": "video", "video": f} for f in videos]
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def run_chat(args) -> int:
    from .assistant import load

    assistant = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    media = dict(images=args.image, audios=args.audio, videos=args.video)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stream=True)
    if assistant.processor is not None:
        opts["use_audio_in_video"] = args.use_audio_in_video

    def ask(text: str) -> None:
        nonlocal media
        history.append(user_turn(text, **media))
        media = {}
        reply = []
        try:
            for piece in assistant.chat(history, **opts):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except QwenOmniError as e:
            history.pop()
            raise e
        finally:
            sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})

    if args.question:
        ask(args.question)
        return 0
    print(f"qwen-omni chat with {assistant.path.name} ({assistant.kind}, {assistant.device}, "
          f"{str(assistant.dtype).removeprefix('torch.')}). /reset forgets, /quit leaves.")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history[:] = base
            continue
        if text:
            try:
                ask(text)
            except (QwenOmniError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from .serving.server import run_serve

            return run_serve(args)
        if args.command == "space":  # imported here: it needs no torch, and chat/serve need none of it
            from .webapp.space import run_space

            return run_space(args)
        return run_chat(args)
    except (QwenOmniError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
