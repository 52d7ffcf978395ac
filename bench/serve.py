"""Serving benchmark: continuous batching throughput and TTFT, and what prefix reuse saves on a follow-up turn.

    python bench/serve.py                 # builds the benchmark model, starts `python -m qwen_omni serve` three times
    python bench/serve.py --model DIR     # any checkpoint for both parts

Models: throughput runs on the embedded assets/tiny-omni when it exists (`--dense [0.6b|3b]`: a random dense text
model of a released width, see DENSE).
The second-turn test runs on a random Qwen3-Omni thinker built by transformers (`--shape`: "embedded" is the
embedded model's own shape, "wide" twice as wide and deep) with the usual 28*28*1280 px image budget: the
embedded model's preprocessor sizes images to 224x224 px (49 tokens), which makes any prefill cheap and says
nothing about reuse. Random weights do not change the cost of a step.

1. Throughput: 1 streaming client, then 8 concurrent ones, each asking for exactly N tokens (`ignore_eos`).
   Total tokens/s = all tokens received / wall time; TTFT = request sent -> first SSE event (sent by our server
   once the first token exists). Target: the 8-client total >= 4x the 1-client total.
2. Second turn with an image (896 px: 784 tokens) in the history: TTFT of the follow-up question with prefix
   reuse (default server) vs. a server started with `--prefix-cache-size 0` (full re-prefill: the image is encoded
   again and every token prefilled). Both servers keep preprocessed media (`qwen_omni/engine/media_cache.py`), so the difference is
   the KV reuse itself. Median over several conversations with different images. Target: >= 5x.
The servers are separate processes, so client threads do not share the server's interpreter. They run with one
torch thread by default: on a machine whose cores are busy with other work, a parallel region waits for its
slowest thread and a 2-thread step was measured 15-30x slower than a 1-thread one.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_clients  # noqa: E402
from tests.serve_utils import data_url, png_bytes, wait_ready  # noqa: E402


# Text / vision / audio sizes of the benchmark models (everything else is the test checkpoint's).
SHAPES = {
    # the embedded model's shape (qwen_omni/train/tiny_model.py "tiny"): what this project actually serves
    "embedded": dict(text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=64, moe_intermediate_size=256),
                     mrope=[12, 10, 10], vision=dict(hidden_size=128, intermediate_size=512, num_heads=4, depth=4),
                     audio=dict(d_model=128, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=512)),
    # twice as wide and deep: matmuls start to dominate a CPU decode step
    "wide": dict(text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=64, moe_intermediate_size=512),
                 mrope=[8, 12, 12], vision=dict(hidden_size=256, intermediate_size=1024, num_heads=4, depth=4),
                 audio=dict(d_model=128, encoder_attention_heads=4, encoder_ffn_dim=512)),
}


def build_model(d: Path, shape: str) -> Path:
    """A random Qwen3-Omni thinker of one of SHAPES (8 experts, top-2, like the test checkpoint)."""
    if (d / "config.json").is_file():
        return d
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from tests import tiny_omni

    d.mkdir(parents=True, exist_ok=True)
    ids = tiny_omni.save_tokenizer(d, "qwen3")
    cfg = tiny_omni.thinker_config("qwen3", ids)
    t, v, a, sh = cfg.text_config, cfg.vision_config, cfg.audio_config, SHAPES[shape]
    for k, val in sh["text"].items():
        setattr(t, k, val)
    t.rope_parameters = {**t.rope_parameters, "mrope_section": sh["mrope"]}
    hidden = sh["text"]["hidden_size"]
    for k, val in {**sh["vision"], "out_hidden_size": hidden}.items():
        setattr(v, k, val)
    for k, val in {**sh["audio"], "output_dim": hidden}.items():
        setattr(a, k, val)
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.04)
    model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 1280, "feature_size": 128, "sampling_rate": 16000,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return d


# Random dense text models for `--dense`: 8 layers of a released width, a 1024-token vocabulary. Every row of a
# decode step reads the same weights, which is what batching is for; with 8 of the 28-36 layers the fixed
# per-step costs (embedding, lm_head, sampling, serving) weigh more than in the full model, so the ratio measured
# on them is, if anything, lower than the full model's.
DENSE = {
    # Qwen3-0.6B's width (128M parameters)
    "0.6b": ("Qwen3", dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=128, rope_theta=1e6)),
    # the Qwen2.5-Omni-3B thinker's width (Qwen2.5-3B: q/k/v biases; 616M parameters)
    "3b": ("Qwen2", dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                         rope_theta=1e6)),
}


def build_dense(d: Path, width: str) -> Path:
    """A random dense text model of one of DENSE, stored in bfloat16 (built on the meta device: no float32 copy)."""
    if (d / "config.json").is_file():
        return d
    import torch
    import transformers

    from tests.tiny_tokenizer import save_tokenizer

    family, shape = DENSE[width]
    d.mkdir(parents=True, exist_ok=True)
    cfg = getattr(transformers, f"{family}Config")(vocab_size=1024, num_hidden_layers=8, max_position_embeddings=4096,
                                                   tie_word_embeddings=False, rms_norm_eps=1e-6, **shape)
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    model.save_pretrained(d)
    save_tokenizer(d, 400)
    return d


class Server:
    def __init__(self, model: Path, *extra: str, threads: int = 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "qwen_omni", "serve", "--model", str(model), "--port", str(port),
               "--log-level", "warning", "--max-batch", "8", "--threads", str(threads), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 300
        while True:
            try:
                wait_ready(self.url, timeout=300)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def stream(self, messages: list[dict], max_tokens: int, ignore_eos: bool = True,
               http: httpx.Client | None = None) -> tuple[float, int, str]:
        """(TTFT seconds, completion tokens, text) of one streamed request, on the caller's `http` client.

        TTFT is the time to the first SSE event: our server sends it once the first token exists (random weights
        often give tokens that are not yet printable text, so the first *content* would overstate it).
        A client keeps its connection, as the `openai` client does: a new `httpx.Client` per request cost 38 ms
        of this process's CPU (its TLS context), which 8 client threads pay one after another under the GIL and
        which went into every TTFT (TTFT p50 about 250 ms with 8 clients and 54 ms with one; 11-16 ms kept)."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
        if http is None:
            with httpx.Client(timeout=600) as http:
                return self.stream(messages, max_tokens, ignore_eos, http)
        t0 = time.perf_counter()
        ttft, tokens, text = None, 0, []
        with http.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices") or []:
                    if ch["delta"].get("content"):
                        text.append(ch["delta"]["content"])
        return ttft, tokens, "".join(text)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def throughput(server: Server, clients: int, requests: int, tokens: int) -> dict:
    ttfts, total = [], [0]
    lock = threading.Lock()

    https = [httpx.Client(timeout=600) for _ in range(clients)]  # made before the clock starts

    def client(c: int) -> None:
        for i in range(requests):
            msg = [{"role": "user", "content": f"client {c} request {i}: the quick brown fox " * (1 + c % 3)}]
            ttft, n, _ = server.stream(msg, tokens, http=https[c])
            with lock:
                ttfts.append(ttft)
                total[0] += n
    try:
        wall = run_clients(client, clients)
    finally:
        for h in https:
            h.close()
    return {"clients": clients, "tokens": total[0], "seconds": round(wall, 2),
            "tokens_per_s": round(total[0] / wall, 1), "ttft_p50_ms": round(1000 * pct(ttfts, 0.5), 1),
            "ttft_p95_ms": round(1000 * pct(ttfts, 0.95), 1)}


def second_turn_ttft(server: Server, conversations: int, image_px: int) -> dict:
    ttfts, prompt = [], None
    with httpx.Client(timeout=600) as http:
        for i in range(conversations):
            img = data_url("image/png", png_bytes(image_px, image_px, seed=100 + i))
            turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                  {"type": "text", "text": "describe the image."}]}]
            _, _, reply = server.stream(turn1, 8, ignore_eos=False, http=http)
            turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and the colour?"}]
            ttft, _, _ = server.stream(turn2, 2, http=http)
            ttfts.append(ttft)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": server.model, "messages": turn2,
                                                              "max_tokens": 1}, timeout=600).json()
    prompt = r["usage"]
    return {"ttft_median_ms": round(1000 * statistics.median(ttfts), 1), "prompt_tokens": prompt["prompt_tokens"],
            "cached_tokens": prompt["prompt_tokens_details"]["cached_tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: assets/tiny-omni, else a built --shape")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="embedded", help="random model to build")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request in the throughput runs")
    ap.add_argument("--requests", type=int, default=4, help="requests per client in the throughput runs")
    ap.add_argument("--dtype", default=None, help="server --dtype for the throughput runs (default: the server's)")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--image", type=int, default=896,
                    help="image side in pixels for the second-turn test (896: 784 image tokens)")
    ap.add_argument("--dense", nargs="?", const="0.6b", choices=sorted(DENSE), default=None,
                    help="throughput runs on a random dense text model of this width (DENSE; default 0.6b) instead")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="server --quantize for the throughput runs")
    ap.add_argument("--engine-process", action="store_true",
                    help="throughput runs with `serve --engine-process` (the model in its own process)")
    ap.add_argument("--threads", type=int, default=1,
                    help="server torch threads; more than the idle cores makes every step wait (default 1)")
    ap.add_argument("--reuse-model", type=Path, default=None,
                    help="model for the second-turn test (default: --model if given, else a built --shape model: "
                         "the embedded model sizes images to 224x224 px = 49 tokens, too few to weigh in a prefill)")
    ap.add_argument("--no-reuse", action="store_true", help="throughput only: skip the second-turn test")
    args = ap.parse_args()
    built = Path(tempfile.gettempdir()) / f"qwen-omni-bench-{args.shape}"
    embedded = ROOT / "assets" / "tiny-omni"
    if args.model or args.dense:
        model = args.model or build_dense(built.with_name(f"qwen-omni-bench-dense-{args.dense}"), args.dense)
    else:
        model = embedded if (embedded / "config.json").is_file() else build_model(built, args.shape)
    report: dict = {"model": str(model)}
    extra = [*(("--dtype", args.dtype) if args.dtype else ()), *(("--quantize", args.quantize) if args.quantize
             else ()), *(("--engine-process",) if args.engine_process else ())]
    server = Server(model, *extra, threads=args.threads)
    report["dtype"] = args.dtype or "server default"
    report["server_args"] = extra
    try:
        server.stream([{"role": "user", "content": "warm up"}], 4)
        one = throughput(server, 1, args.requests * 2, args.tokens)
        eight = throughput(server, 8, args.requests, args.tokens)
        report["throughput"] = {"1_client": one, "8_clients": eight,
                                "ratio": round(eight["tokens_per_s"] / one["tokens_per_s"], 2)}
    finally:
        server.close()
    if not args.no_reuse:
        reuse_model = args.reuse_model or args.model or build_model(built, args.shape)
        report["reuse_model"], report["second_turn"] = str(reuse_model), {}
        for name, extra in (("prefix_reuse", ()), ("full_prefill", ("--prefix-cache-size", "0"))):
            server = Server(reuse_model, *extra, threads=args.threads)
            try:
                server.stream([{"role": "user", "content": "warm up"}], 4)
                report["second_turn"][name] = second_turn_ttft(server, args.conversations, args.image)
            finally:
                server.close()
        st = report["second_turn"]
        st["speedup"] = round(st["full_prefill"]["ttft_median_ms"] / st["prefix_reuse"]["ttft_median_ms"], 2)
    print(json.dumps(report, indent=1))
    ok = report["throughput"]["ratio"] >= 4
    if not args.no_reuse:
        ok = ok and report["second_turn"]["speedup"] >= 5
        print("targets (>= 4x throughput, >= 5x second-turn TTFT):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
