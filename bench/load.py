"""Bounded load test of `python -m qwen_omni serve`: N clients x M requests mixing media, streams and cancels.

    python bench/load.py                          # 8 clients x 20 requests on the test model, in-process server
    python bench/load.py --url http://127.0.0.1:8000 --model NAME   # against a running server

Each client cycles through: text, image (data URL), audio (input_audio), video (data URL mp4), a stream read to
the end, and a stream closed after two chunks (a cancel). Pass criteria: no failed request, no leaked slot
(/health shows 0 active and 0 waiting once the clients are done), and - in-process only - memory flat after
warm-up (every client has sent every kind once): live tensors within 16 MB (the caches are bounded) and resident
memory, measured after `malloc_trim`, within 10% + 30 MB.
`run_load()` is also what tests/test_server.py runs, shortened.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_clients  # noqa: E402
from tests.serve_utils import b64, data_url, mp4_bytes, png_bytes, wav_bytes  # noqa: E402

KINDS = ["text", "image", "audio", "video", "stream", "cancel"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory() -> dict:
    """This process's memory (it holds the in-process server): live torch tensors, and resident set size after
    handing freed heap pages back to the OS (`malloc_trim`; without it, glibc's per-thread arenas make RSS drift
    up and down by tens of MB with no live object behind it)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    tensors = [o for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return {"rss_mb": round(rss_mb(), 1), "tensors": len(tensors),
            "tensor_mb": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)}


def request_body(kind: str, model: str, i: int, max_tokens: int, media: dict) -> dict:
    text = {"type": "text", "text": f"request {i}: what is this?"}
    parts = {"image": [{"type": "image_url", "image_url": {"url": media["image"]}}, text],
             "audio": [{"type": "input_audio", "input_audio": {"data": media["audio"], "format": "wav"}}, text],
             "video": [{"type": "video_url", "video_url": {"url": media["video"]}}, text]}.get(kind, f"hello {i}")
    body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i}
    if kind in ("stream", "cancel"):
        body.update(stream=True, ignore_eos=True, max_tokens=max_tokens * (8 if kind == "cancel" else 1))
    return body


def one_request(client: httpx.Client, url: str, body: dict, kind: str) -> str:
    """'ok' | 'cancelled'; raises on any failure."""
    if not body.get("stream"):
        r = client.post(url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{kind}: HTTP {r.status_code}: {r.text[:200]}")
        if r.json()["usage"]["completion_tokens"] < 1:
            raise RuntimeError(f"{kind}: empty reply")
        return "ok"
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{kind}: HTTP {r.status_code}: {r.text[:200]}")
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                if "error" in json.loads(line[6:]):
                    raise RuntimeError(f"{kind}: {line[:200]}")
                chunks += 1
                if kind == "cancel" and chunks == 3:  # role chunk + two pieces, then hang up
                    return "cancelled"
            elif line == "data: [DONE]":
                return "ok"
    raise RuntimeError(f"{kind}: the stream ended without [DONE]")


def run_load(url: str, model: str, clients: int = 8, requests: int = 20, max_tokens: int = 16,
             on_done=None) -> dict:
    """Run the mix; `on_done(n)` is called after each finished request with the number finished so far."""
    media = {"image": data_url("image/png", png_bytes(96, 64)), "audio": b64(wav_bytes(1.0)),
             "video": data_url("video/mp4", mp4_bytes())}
    counts = {"ok": 0, "cancelled": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(requests):
                kind = KINDS[(c + i) % len(KINDS)]
                try:
                    result = one_request(http, url, request_body(kind, model, c * 1000 + i, max_tokens, media), kind)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    result = "failed"
                    with lock:
                        errors.append(f"client {c} request {i}: {e}")
                with lock:
                    counts[result] += 1
                    if on_done is not None:
                        on_done(sum(counts.values()))

    wall = run_clients(client, clients)
    leaked = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a cancel reaches the scheduler within one decode step
        h = httpx.get(url + "/health").json()
        leaked = {"active": h["active"], "waiting": h["waiting"]}
        if leaked == {"active": 0, "waiting": 0}:
            break
        time.sleep(0.05)
    return {**counts, "errors": errors[:10], "leaked": leaked, "seconds": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    ap.add_argument("--model", default=None, help="model id (with --url); default: the test model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process server")
    args = ap.parse_args()
    stop = None
    if args.url is None:
        import tempfile

        import torch

        torch.set_num_threads(args.threads)
        from tests.serve_utils import omni_model_dir, start_local_server

        model_dir = omni_model_dir(Path(tempfile.mkdtemp(prefix="qwen-omni-load-")))
        url, stop, _ = start_local_server(model_dir, max_batch=8, max_queue=64)
        model = model_dir.name
    else:
        url, model = args.url.rstrip("/").removesuffix("/v1"), args.model
    warm_at = args.clients * len(KINDS)  # every client has sent every kind once
    marks: dict[str, dict] = {}

    def on_done(n: int) -> None:
        if n == warm_at:
            marks["after_warmup"] = memory()
    report = run_load(url, model, args.clients, args.requests, args.max_tokens,
                      on_done=on_done if stop is not None else None)
    if stop is not None:
        marks["end"] = memory()
        stop()
        if "after_warmup" in marks:
            w, e = marks["after_warmup"], marks["end"]
            report["memory"] = marks
            # live tensors: the caches (prefix, media features) are bounded and mostly filled by the warm-up
            report["memory_flat"] = (e["rss_mb"] - w["rss_mb"] < 0.10 * w["rss_mb"] + 30
                                     and e["tensor_mb"] - w["tensor_mb"] < 16)
    print(json.dumps(report, indent=1))
    ok = report["failed"] == 0 and report["leaked"] == {"active": 0, "waiting": 0} and report.get("memory_flat", True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
