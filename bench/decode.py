"""CPU decode benchmark: ours vs transformers `generate` on the same random weights, plus the physical floor.

    python bench/decode.py                       # everything (< 5 min on 2 cores)
    python bench/decode.py --only moe,dense_eq --dtype bfloat16 --no-int8 --tokens 32

Models (random weights built by transformers' own classes, `save_pretrained` to a temp dir, bf16 on disk so every
run below reads identical values):
- dense:    the Qwen3-0.6B architecture (28 layers, hidden 1024, 16 q / 8 kv heads of 128, MLP 3072,
            vocab 151936, tied embeddings) - `Qwen3ForCausalLM`.
- moe:      a Qwen3-30B-A3B scaled down (`Qwen3MoeForCausalLM`): 12 layers, hidden 1024, the same heads, 64 experts,
            top-8, moe_intermediate 384 (renormalised top-k, untied lm_head like 30B-A3B). 1.29 B parameters,
            0.35 B active per token.
- dense_eq: the dense model with the MoE's active parameters: the 0.6B layer shape, 12 layers, MLP 3072 (= 8
            experts x 384), untied lm_head. Same per-token weight bytes as `moe` but for its 64x1024 routers (0.4%).

Each (model, implementation, dtype) runs in its own subprocess so that its peak RSS (VmHWM) is its own. Timing:
prefill = a 128-token prompt to its first greedy token (transformers: `generate` start to the streamer's first new
token); decode = tokens/s over the following N-1 greedy tokens (one decode step each). One warm-up, one timed run
(time budget); repeat the whole script and take the best on a shared machine.

Floor = measured memory read bandwidth / bytes read per token (weights actually touched: all matrices except the
embedding, which is one row; for MoE only the top-k experts; plus the KV cache at the mean context). Bandwidth is
the best of a 1 GiB float32 `sum` and `copy` (read half of the copy traffic counted), i.e. what torch can stream.
Accuracy is ours in float16 / bfloat16 / int8 (and transformers bf16) against ours in float32 on the same prompt:
max |delta logits| over all 128 prompt positions, and how many of 32 greedy tokens agree. On random weights the
logits are nearly flat, so greedy agreement is a weak (pessimistic) signal; max |delta| is the better one.

A run on the idle machine (2 cores, 22 GB/s; 166 s in all): dense decode HF bf16 8.6 tok/s, ours bf16 9.9
(1.14x), fp16 8.3, int8 12.9 (1.49x); MoE / dense_eq time 1.25 (bf16), 1.11 (int8). Repeated runs move each
number by ~15%. The 2x-over-transformers goal is out of reach for int8 *weight-only* with torch's kernels: the
int8 GEMV is compute-bound at ~11.5 G weights/s on 2 cores (see qwen_omni/models/quant.py), so the 0.6B's 596 M weights
per token take >= 52 ms however little else a step does (<= ~19 tok/s).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import TokenClock  # noqa: E402

PROMPT = 128
AGREE = 32  # greedy tokens compared for accuracy
HEADS = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
             max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
MODELS = {
    "dense": ("qwen3", dict(HEADS, num_hidden_layers=28, intermediate_size=3072, tie_word_embeddings=True)),
    "moe": ("qwen3_moe", dict(HEADS, num_hidden_layers=12, intermediate_size=3072, num_experts=64,
                              num_experts_per_tok=8, moe_intermediate_size=384, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
    "dense_eq": ("qwen3", dict(HEADS, num_hidden_layers=12, intermediate_size=3072, tie_word_embeddings=False)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- setup --
def build_checkpoint(name: str, d: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    kind, kw = MODELS[name]
    cfg_cls, cls = (Qwen3Config, Qwen3ForCausalLM) if kind == "qwen3" else (Qwen3MoeConfig, Qwen3MoeForCausalLM)
    torch.manual_seed(0)
    model = cls._from_config(cfg_cls(**kw), dtype=torch.bfloat16)  # HF's own init (normal, std 0.02), in bf16
    model.save_pretrained(d)


def read_bandwidth() -> float:
    """Best memory read bandwidth (bytes/s) torch reaches here on a 1 GiB tensor (far above the L3)."""
    a = torch.ones(2 ** 28)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(4):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, a.nbytes / (time.perf_counter() - t))  # copy: count the read half of its traffic
    return best


def bytes_per_token(model: torch.nn.Module, cfg, ctx: float, kv_elem: int) -> int:
    """Bytes one decode step must read: every weight once (experts: top-k of E), embedding one row, KV cache."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or "rotary" in name:
            continue
        n = t.numel() * t.element_size()
        if ".experts." in name:  # stacked (E, ...) expert tensors: a token reads k of the E slices
            n = n * cfg.num_experts_per_tok // t.shape[0]
        total += n
    head = model.lm_head
    if getattr(head, "weight", None) is model.model.embed_tokens.weight:  # tied: the head reads it all
        total += head.weight.numel() * head.weight.element_size()
    total += int(cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * ctx * kv_elem)
    return total


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------------- worker --
def run_theirs(path: str, dtype: torch.dtype, ids: torch.Tensor, n: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids[:, :16], max_new_tokens=3, min_new_tokens=3, **kw)  # warm-up
    clock = TokenClock()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=clock, **kw)
    t_first, t_last = clock.times[1], clock.times[-1]  # times[0] is the prompt being put
    rss = peak_rss_mb()
    logits = model(ids).logits[0].float()
    return model, model.config, t_first - t0, (n - 1) / (t_last - t_first), out[0, ids.shape[1]:].tolist(), rss, logits


def run_ours(path: str, dtype: torch.dtype, int8: bool, ids: torch.Tensor, n: int):
    from qwen_omni.models.registry import build_model
    from qwen_omni.models.quant import quantize_int8

    net, _ = build_model(Path(path), dtype, torch.device("cpu"))
    if int8:
        quantize_int8(net)

    def greedy(prompt, steps):
        cache = net.new_cache(1, prompt.shape[1] + steps)
        tok = net.prefill({"input_ids": prompt}, cache).argmax(-1)
        t_first = time.perf_counter()
        toks = [int(tok)]
        for _ in range(steps - 1):
            tok = net.decode_step(tok, cache).argmax(-1)
            toks.append(int(tok))
        return t_first, time.perf_counter(), toks

    greedy(ids[:, :16], 3)  # warm-up
    t0 = time.perf_counter()
    t_first, t_end, toks = greedy(ids, n)
    rss = peak_rss_mb()
    logits = net(ids)[0].float()
    return net, net.cfg, t_first - t0, (n - 1) / (t_end - t_first), toks, rss, logits


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    vocab = MODELS[spec["model"]][1]["vocab_size"]
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if spec["impl"] == "transformers":
            model, cfg, prefill, tps, toks, rss, logits = run_theirs(spec["path"], dtype, ids, spec["tokens"])
        else:
            model, cfg, prefill, tps, toks, rss, logits = run_ours(spec["path"], dtype, spec["int8"], ids,
                                                                   spec["tokens"])
    torch.save(logits, spec["logits"])
    kv_elem = 2 if spec["int8"] else torch.finfo(dtype).bits // 8  # int8 mode keeps a bf16 KV cache
    nbytes = bytes_per_token(model, cfg, PROMPT + spec["tokens"] / 2, kv_elem)
    return dict(prefill_s=prefill, tok_s=tps, tokens=toks, rss_mb=rss, bytes=nbytes)


# ----------------------------------------------------------------------------------------------------- main --
def run_config(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode != 0:
        raise SystemExit(f"worker {spec['model']}/{spec['impl']}/{spec['label']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def configs(args, model: str) -> list[tuple[str, str, str, bool]]:
    """(impl, label, dtype, int8) per run, transformers first; its bf16 run is the baseline of the ratios.

    By default only the 0.6B model runs every dtype (and the accuracy table); the MoE comparison needs bf16/int8.
    """
    runs = [("transformers", "bf16", "bfloat16", False)]
    if args.hf_fp32 and model == "dense":
        runs.append(("transformers", "fp32", "float32", False))
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    dtypes = args.dtype or (list(DTYPES) if model == "dense" else ["bfloat16"])
    runs += [("ours", short[d], d, False) for d in dtypes]
    if args.int8:
        runs.append(("ours", "int8", "bfloat16", True))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="dense,moe,dense_eq", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--dtype", default="", help="our float dtypes, comma list (default: all three for the dense "
                                               "model, bfloat16 for the others)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="ours with int8 weights")
    p.add_argument("--hf-fp32", action=argparse.BooleanOptionalAction, default=True,
                   help="also transformers in float32 (on the dense model)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--keep", type=Path, help="reuse/keep checkpoints in this directory instead of a temp dir")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up even when piped
    args.dtype = [d for d in args.dtype.split(",") if d]
    models = [m for m in args.only.split(",") if m]
    if set(models) - set(MODELS) or set(args.dtype) - set(DTYPES) or args.tokens < 2:
        raise SystemExit(f"--only takes {list(MODELS)}, --dtype {list(DTYPES)}, --tokens at least 2")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    print(f"threads {args.threads}, torch {torch.__version__}, read bandwidth {bw / 1e9:.1f} GB/s, "
          f"prompt {PROMPT}, new tokens {args.tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        results = {}
        for m in models:
            d = root / m
            if not (d / "config.json").is_file():
                t = time.perf_counter()
                build_checkpoint(m, d)
                print(f"[{m}: built and saved in {time.perf_counter() - t:.0f} s]", flush=True)
            for impl, label, dtype, int8 in configs(args, m):
                spec = dict(model=m, impl=impl, label=label, dtype=dtype, int8=int8, path=str(d),
                            tokens=args.tokens, threads=args.threads, logits=f"{tmp}/{m}-{impl}-{label}.pt")
                results[m, impl, label] = run_config(spec)
                r = results[m, impl, label]
                print(f"[{m} {impl} {label}: {r['tok_s']:.1f} tok/s]", flush=True)
            report(m, results, bw, tmp)
        moe_vs_dense(results)
    print(f"total {time.perf_counter() - start:.0f} s")


def report(m: str, results: dict, bw: float, tmp: str) -> None:
    rows = {k[1:]: v for k, v in results.items() if k[0] == m}
    base = rows.get(("transformers", "bf16"))
    print(f"\n{m}: {MODELS[m][0]}, {sum(1 for _ in rows)} runs")
    print(f"{'impl':<13}{'dtype':<6}{'prefill ms':>11}{'decode tok/s':>14}{'floor tok/s':>13}{'% floor':>9}"
          f"{'MB/token':>10}{'peak RSS MB':>13}{'decode/HF-bf16':>16}{'prefill/HF-bf16':>17}")
    for (impl, label), r in rows.items():
        floor = bw / r["bytes"]
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        pratio = f"{base['prefill_s'] / r['prefill_s']:.2f}x" if base else "-"
        print(f"{impl:<13}{label:<6}{r['prefill_s'] * 1e3:>11.0f}{r['tok_s']:>14.1f}{floor:>13.1f}"
              f"{100 * r['tok_s'] / floor:>8.0f}%{r['bytes'] / 1e6:>10.0f}{r['rss_mb']:>13.0f}{ratio:>16}{pratio:>17}")
    ref_key = ("ours", "fp32")
    if ref_key not in rows:
        return
    ref = torch.load(f"{tmp}/{m}-ours-fp32.pt", weights_only=True)
    print(f"accuracy vs ours fp32 (logits over the {PROMPT}-token prompt: std {ref.std():.3f}, "
          f"max |x| {ref.abs().max():.3f}; greedy agreement over {AGREE} tokens, a weak signal on random weights)")
    for (impl, label), r in rows.items():
        if (impl, label) == ref_key:
            continue
        got = torch.load(f"{tmp}/{m}-{impl}-{label}.pt", weights_only=True)
        d = (got - ref).abs().max().item()
        agree = sum(a == b for a, b in zip(r["tokens"][:AGREE], rows[ref_key]["tokens"][:AGREE]))
        print(f"  {impl:<13}{label:<6} max|dlogits| {d:.4f} ({d / ref.abs().max().item():.2%} of max|logit|), "
              f"greedy {agree}/{AGREE}")


def moe_vs_dense(results: dict) -> None:
    pairs = [(k[1:], v) for k, v in results.items() if k[0] == "moe" and ("dense_eq",) + k[1:] in results]
    if pairs:
        print("\nMoE decode vs the dense model of equal active size (target: dense/MoE time <= 1.5)")
    for (impl, label), r in pairs:
        dense = results["dense_eq", impl, label]
        print(f"  {impl:<13}{label:<6} moe {r['tok_s']:.1f} tok/s, dense_eq {dense['tok_s']:.1f} tok/s, "
              f"ratio {dense['tok_s'] / r['tok_s']:.2f}")


if __name__ == "__main__":
    main()
