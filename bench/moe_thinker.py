"""Qwen3-Omni-MoE thinker decode speed: ours vs transformers on the same weights and the same image + text prompt.

    python bench/moe_thinker.py                       # float32 (the CPU default of `load`), 64 new tokens
    python bench/moe_thinker.py --dtype bfloat16 --tokens 32 --keep /tmp/moe-thinker   # reuse the checkpoint
    python bench/moe_thinker.py --dtype bfloat16 --int8 ...   # + ours with int8 decoder weights (qwen_omni/models/quant.py)

Model: a `Qwen3OmniMoeThinkerForConditionalGeneration` built in-process by transformers with random weights (its
own init, bf16), `save_pretrained` to a temp dir, and loaded from there by `qwen_omni.load`; the transformers
model is cast to the benchmark dtype in memory, so both hold the same numbers. The text model is a
Qwen3-Omni-30B-A3B thinker scaled down but MoE-shaped like it: 12 layers, hidden 1024, 64 experts, top-8,
moe_intermediate 384 (renormalised top-k, no shared expert), 16 q / 8 kv heads of 64, vocab 151936, untied
lm_head, interleaved MRoPE and DeepStack; the audio and vision encoders are small (they run once, at prefill).

What is timed: decode tokens/s = (N - 1) / time from the first new token to the last, greedy, no stop tokens.
Ours goes through the public API, `Assistant.chat(..., max_new_tokens=N)` (its `stats["tokens_per_second"]`
is exactly that quantity); transformers through `model.generate(do_sample=False, min_new_tokens=N)` with a
streamer timestamping each new token. Both get the tensors of `Assistant.prepare(messages)`, so the prompt is
identical; a 2-token warm-up each, then `--rounds` timed runs each, alternating, the best one reported. The
prefill column is the time to the first new token (ours includes `prepare`: image decoding and patching).
Greedy agreement is printed for information: on random weights the logits are nearly flat, so flips in bf16 say
little.

Floor: a decode step must read the weights it uses once (all but the embedding and the encoders, experts top-k
of E) plus the KV cache; at the memory read bandwidth torch reaches here (1 GiB `sum`) that bounds tokens/s.
When both implementations run near the floor (a loaded, bandwidth-starved machine) no ratio above ~1 is
possible; the ratio measures per-step overhead only where the floor is far above both.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import TokenClock  # noqa: E402

# transformers imports torchaudio when installed, and the installed wheel cannot load with this torch.
import transformers.utils as _tu  # noqa: E402
import transformers.utils.import_utils as _tiu  # noqa: E402

_tu.is_torchaudio_available = lambda: False
_tiu.is_torchaudio_available = lambda: False

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # float32: the CPU default of `load`
TEXT = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=8, head_dim=64, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            # head_dim 64 -> 32 rotary frequencies, split T/H/W like 30B-A3B's [24, 20, 20] of 64
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [12, 10, 10],
                             "interleaved": True})
AUDIO = dict(d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=128,
             max_source_positions=1500, n_window=50, n_window_infer=800, conv_chunksize=500,
             downsample_hidden_size=64, output_dim=1024)
VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=1024, num_position_embeddings=2304,
              deepstack_visual_indexes=[1, 2, 3])


def build_checkpoint(d: Path):
    """Save a random thinker (bf16 on disk) plus tokenizer files to d; return the transformers model (bf16)."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    from tests.tiny_omni import save_tokenizer

    ids = save_tokenizer(d, "qwen3")  # a small BPE with the Qwen3-Omni special tokens and chat template
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=TEXT, audio_config=AUDIO, vision_config=VISION, position_id_per_seconds=13,
        audio_token_id=ids["audio"], image_token_id=ids["image"], video_token_id=ids["video"],
        audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 64 * 64,
        "max_pixels": 32 * 32 * 1280, "feature_size": 128, "sampling_rate": 16000}))
    return model


def prompt() -> list[dict]:
    from PIL import Image

    yy, xx = np.mgrid[0:224, 0:288]
    img = np.stack([xx * 255 / 288, yy * 255 / 224, 128 + 100 * np.sin(xx / 9 + yy / 13)], -1).astype(np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(img)},
                                         {"type": "text", "text": "what is in this picture? describe the image."}]}]


def run_transformers(model, inputs: dict, n: int, warm_up: bool) -> dict:
    hf_inputs = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    hf_inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if warm_up:
            model.generate(**hf_inputs, max_new_tokens=2, min_new_tokens=2, **kw)
        clock = TokenClock()
        t0 = time.perf_counter()
        out = model.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, streamer=clock, **kw)
    t_first, t_last = clock.times[1], clock.times[-1]  # times[0]: the prompt being put
    return dict(prefill_s=t_first - t0, tok_s=(n - 1) / (t_last - t_first),
                tokens=out[0, inputs["input_ids"].shape[1]:].tolist())


def run_ours(assistant, messages: list[dict], n: int, warm_up: bool) -> dict:
    import qwen_omni.assistant as assistant_module
    from qwen_omni.engine.prefix_cache import PrefixCache
    from qwen_omni.engine.tokenizer import StreamDecoder

    tokens: list[int] = []

    class Recording(StreamDecoder):  # chat returns text; the ids are taken where it detokenizes them
        def push(self, token):
            tokens.append(token)
            return super().push(token)

    assistant.stop_ids = []  # exactly n tokens, as min_new_tokens does for transformers
    if warm_up:
        assistant.chat(messages, max_new_tokens=2)
    assistant.prefix_cache = PrefixCache(capacity=4)  # time a full prefill, not a reused prompt
    assistant_module.StreamDecoder, original = Recording, assistant_module.StreamDecoder
    try:
        stats: dict = {}
        assistant.chat(messages, max_new_tokens=n, stats=stats)
    finally:
        assistant_module.StreamDecoder = original
    assert stats["reused_tokens"] == 0 and stats["completion_tokens"] == n
    return dict(prefill_s=stats["time_to_first_token"], tok_s=stats["tokens_per_second"], tokens=tokens)


def read_bandwidth() -> float:
    """Best read bandwidth (bytes/s) of a 1 GiB float32 `sum`, far above any cache."""
    a = torch.ones(2 ** 28)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def bytes_per_token(model, context: float) -> int:
    """Bytes one decode step reads: used weights once (experts: k of E; one embedding row ~ 0), plus the KV cache."""
    t = model.cfg.text
    total = 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:  # int8 weights are buffers (qwen_omni/models/quant.py)
        if name.startswith(("audio_tower.", "visual.", "model.embed_tokens.")):
            continue
        n = p.numel() * p.element_size()
        total += n * t.num_experts_per_tok // t.num_experts if ".experts." in name else n
    elem = model.model.embed_tokens.weight.element_size()
    return total + int(t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * context * elem)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=64, help="new tokens per run (greedy)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs per implementation, alternating; best taken")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--keep", type=Path, help="build the checkpoint here once and reuse it (default: a temp dir)")
    p.add_argument("--int8", action="store_true",
                   help="also time ours with int8 decoder weights (`load(quantize='int8')`), a third row")
    args = p.parse_args()
    if args.tokens < 2 or args.rounds < 1:
        raise SystemExit("--tokens must be at least 2 and --rounds at least 1")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    from qwen_omni.assistant import count_parameters, load

    bandwidth = read_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        d = args.keep or Path(tmp)
        if (d / "config.json").is_file():
            from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

            hf = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).eval()
        else:
            d.mkdir(parents=True, exist_ok=True)
            hf = build_checkpoint(d)
        hf = hf.to(dtype)  # bf16 values widen exactly: both implementations hold the same numbers
        built = time.perf_counter() - start
        assistant = load(d, device="cpu", dtype=dtype)
        messages = prompt()
        inputs = assistant.prepare(messages)
        n_prompt = inputs["input_ids"].shape[1]
        total, active = count_parameters(assistant.model)
        floor = bandwidth / bytes_per_token(assistant.model, n_prompt + args.tokens / 2)
        print(f"threads {args.threads}, torch {torch.__version__}, {args.dtype}; {total / 1e9:.2f} B parameters, "
              f"{active / 1e9:.2f} B active per token; prompt {n_prompt} tokens "
              f"({int((inputs['input_ids'] == assistant.model.cfg.image_token_id).sum())} image), "
              f"{args.tokens} new tokens; read bandwidth {bandwidth / 1e9:.1f} GB/s; checkpoint ready in {built:.0f} s",
              flush=True)
        impls = {"transformers": (None, floor), "ours": (assistant, floor)}
        if args.int8:
            q8 = load(d, device="cpu", dtype=dtype, quantize="int8")
            impls["ours int8"] = (q8, bandwidth / bytes_per_token(q8.model, n_prompt + args.tokens / 2))
        runs: dict[str, list[dict]] = {k: [] for k in impls}
        for r in range(args.rounds):  # alternate, so that a change in machine load hits all alike
            for name, (a, _) in impls.items():
                runs[name].append(run_transformers(hf, inputs, args.tokens, warm_up=r == 0) if a is None else
                                  run_ours(a, messages, args.tokens, warm_up=r == 0))
            print(f"[round {r + 1}: " + ", ".join(f"{k} {v[-1]['tok_s']:.2f} tok/s" for k, v in runs.items())
                  + f"; {time.perf_counter() - start:.0f} s so far]", flush=True)
        best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
    print(f"\n{'impl':<14}{'prefill ms':>11}{'decode tok/s':>14}{'floor tok/s':>13}{'% floor':>9}")
    for name, r in best.items():
        pct = 100 * r["tok_s"] / impls[name][1]
        print(f"{name:<14}{r['prefill_s'] * 1e3:>11.0f}{r['tok_s']:>14.2f}{impls[name][1]:>13.2f}{pct:>8.0f}%")
    theirs = best["transformers"]
    print()
    for name in [k for k in best if k != "transformers"]:
        agree = next((i for i, (a, b) in enumerate(zip(best[name]["tokens"], theirs["tokens"])) if a != b),
                     args.tokens)
        print(f"decode speed {name} / transformers: {best[name]['tok_s'] / theirs['tok_s']:.2f}x (target >= 1.5x); "
              f"greedy tokens identical for the first {agree} of {args.tokens}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
