"""Train the tiny Qwen3-Omni thinker from scratch on the synthetic world, or fine-tune a checkpoint.

    python -m qwen_omni.train --run runs/tiny --out assets/tiny-omni          # stage (a) then (b), from scratch
    python -m qwen_omni.train --steps-v 3000 --train no-vision-tower ...    # (v) first; (a)/(b) keep its tower
    python -m qwen_omni.train --run runs/tiny --resume                        # continue after an interruption
    python -m qwen_omni.train --init assets/tiny-omni --data my_folder --train projectors --steps 200 \\
        --run runs/ft --out runs/ft/model                                     # fine-tune on your own JSONL

Stages (from scratch): (v), with --steps-v, dense per-token training of the vision encoder alone
(`qwen_omni.train.vision`: what shape, colour, character lies under each vision token, and where that token is);
(a) alignment - captions of images/videos and transcripts of audio, so the encoders and
their projectors learn to put what they see and hear into words; (b) instruction tuning on the full Q&A mix
(every task of `qwen_omni.synthetic.tasks`, held-out wording never used). The decoder is trained from scratch too,
so stage (a) trains all parameters by default (`--train-a`); with a pretrained decoder pass
`--train-a encoders` to keep it frozen.

Data: samples are generated on the fly from a seeded stream (`synthetic.iter_samples`), turned into model
inputs by our `Processor` (the same one that serves), with the answer as the last assistant turn; the loss is
on the answer tokens and the closing `<|im_end|>` only. Robustness augmentation: some images are JPEG'd and
rescaled, some audio goes through MP3/Ogg, as users' uploads do. Batches are built inline (`--workers 0`): on 2
cores a worker process takes the cores from the training step (timing in docs/training-notes.md).

User data (`--data DIR`): every `*.jsonl` in DIR, one example per line:
    {"image": "cat.png", "question": "What colour is the cat?", "answer": "black"}
    {"audio": "clip.wav", "question": "How many beeps?", "answer": "3"}
    {"video": "clip.mp4", "use_audio_in_video": true, "question": "How many beeps?", "answer": "2"}
    {"question": "hi", "answer": "Hello!"}
`image` / `audio` / `video` are paths relative to the JSONL file (a list for several); all optional.

Loss: token cross-entropy + 0.01 x MoE load-balancing loss (Switch style, from router logits captured by
forward hooks on every `mlp.gate`) + 0.3 x attention supervision on questions about one object of an image
(`qwen_omni.train.binding`: chosen heads must look at that object). AdamW, linear warmup then cosine decay,
gradient clipping at 1.0.
Checkpoints (model + optimizer + step + RNG) every --ckpt-every steps to RUN/ckpt.pt; `--resume` continues.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import tiny_model as tm
from .checkpoint import load_ckpt, log, save_ckpt
from .data import task_weights
from .stages import PARAM_GROUPS, StageLoop, StageStart, stage_plan, stage_share
from .vision import TEXT_P, run_stage_v

def tune_malloc() -> None:
    """Keep freed activation buffers in the process instead of returning them to the kernel: a training step frees and
    re-allocates the same multi-MB tensors, and on a fresh page each costs a page fault per 4 KB (timing in
    docs/training-notes.md). Same as MALLOC_MMAP_THRESHOLD_=32M MALLOC_TRIM_THRESHOLD_=2G MALLOC_TOP_PAD_=256M; a
    no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: big buffers from the heap, not fresh mmaps
    libc.mallopt(-1, 1 << 31)   # M_TRIM_THRESHOLD: do not hand the heap's top back after each step
    libc.mallopt(-2, 256 << 20)  # M_TOP_PAD: grow the heap in large steps


# ---------------------------------------------------------------- schedule

# ---------------------------------------------------------------- checkpointing

def mix_arg(text: str) -> dict[str, float]:
    try:
        return task_weights(text)
    except ValueError as e:  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qwen_omni.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/tiny"), help="run folder (checkpoints, log, tokenizer)")
    ap.add_argument("--out", type=Path, default=None, help="write the final model here (HF thinker format)")
    ap.add_argument("--out-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the tensors written to --out (run/final stays float32 for further training)")
    ap.add_argument("--init", type=Path, default=None, help="fine-tune this checkpoint instead of training from scratch")
    ap.add_argument("--data", type=Path, default=None, help="folder of JSONL (media, question, answer) to fine-tune on")
    ap.add_argument("--train", default="all", choices=sorted(PARAM_GROUPS),
                    help="which parameters to train (stage b / fine-tune); after stage (v), no-vision-tower keeps "
                         "what it learned")
    ap.add_argument("--train-a", default="all", choices=sorted(PARAM_GROUPS), help="which parameters stage (a) trains")
    ap.add_argument("--size", default="tiny", choices=sorted(tm.SIZES))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps-v", type=int, default=0,
                    help="stage (v) steps: dense per-token training of the vision encoder (qwen_omni.train.vision) "
                         "before the other stages; 0 = skip")
    ap.add_argument("--lr-v", type=float, default=1e-3,
                    help="stage (v) peak LR (from scratch, 1e-3 told shape better after 400 steps than 3e-3)")
    ap.add_argument("--batch-v", type=int, default=32, help="stage (v) images per step")
    ap.add_argument("--v-share", type=float, default=0.12, help="share of --minutes for stage (v)")
    ap.add_argument("--text-p-v", type=float, default=TEXT_P,
                    help="share of stage (v) images that show rendered text (the rest show shapes)")
    ap.add_argument("--steps-a", type=int, default=300, help="stage (a) steps (from scratch only)")
    ap.add_argument("--steps", type=int, default=2000, help="stage (b) / fine-tune steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-a", type=float, default=None, help="stage (a) peak LR (default --lr)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="MoE load-balancing loss weight")
    ap.add_argument("--bind-coef", type=float, default=0.3,
                    help="weight of the attention supervision on object questions (qwen_omni.train.binding)")
    ap.add_argument("--bind-heads", default="-2:2,3;-1:0,1",
                    help="which heads it supervises: 'LAYER:HEAD,...;...' (negative layers count from the end)")
    ap.add_argument("--mix", type=mix_arg, default={},
                    help="stage (b) task weights to change, e.g. 'shape=2.5,pitch=0.2' (the rest keep STAGE_B_WEIGHTS)")
    ap.add_argument("--bucket", type=int, default=1,
                    help="batches of similar length: sort this many batches' worth of samples by length (less padding)")
    ap.add_argument("--augment", type=float, default=0.3, help="probability of JPEG/codec augmentation per media")
    ap.add_argument("--easy", type=float, default=0.7,
                    help="curriculum: share of easy samples (one large object) at the start; 0 = off")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast on CPU (off by default: for the tiny model it was no faster, or slower, than "
                         "float32 on the CPUs tried; see docs/training-notes.md)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0,
                    help="data worker processes (0 = build batches inline: on few cores a worker takes them from the "
                         "training step)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=4, help="held-out samples per task in the periodic eval")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long; 0 = no limit")
    ap.add_argument("--minutes", type=float, default=0,
                    help="wall-clock budget: each stage ends at its step count or its share of this time, whichever "
                         "comes first, and its LR schedule follows the larger of the two progress fractions "
                         "(stage a gets --a-share); 0 = steps only")
    ap.add_argument("--a-share", type=float, default=0.15, help="share of --minutes for stage (a)")
    ap.add_argument("--resume", action="store_true", help="continue from RUN/ckpt.pt")
    ap.add_argument("--no-tqdm", action="store_true")
    ap.add_argument("--stop-at-step", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill
    return ap.parse_args(argv)


def setup(args) -> tuple[torch.nn.Module, Path]:
    """Model and tokenizer directory (a new one, or the --init checkpoint's)."""
    run = args.run
    tok_dir = run / "tokenizer"
    if args.init is not None:
        model = tm.load_model(args.init)
        return model, args.init
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok = tm.train_tokenizer(tm.corpus_texts(), args.vocab)
        tm.save_tokenizer(tok, tok_dir)
        (tok_dir / "generation_config.json").write_text(json.dumps(tm.generation_config()))
    from tokenizers import Tokenizer as Backend

    vocab = Backend.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    return tm.new_model(vocab, args.size, args.seed), tok_dir


def train(args) -> Path | None:
    torch.set_num_threads(args.threads)
    tune_malloc()
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tok_dir = setup(args)
    ckpt_path = run / "ckpt.pt"
    state = load_ckpt(ckpt_path) if args.resume and ckpt_path.is_file() else None
    if args.resume and state is None:
        log(run, f"--resume: no checkpoint at {ckpt_path}; starting fresh")
    if state is not None:
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"]["torch"])
        npr = state["rng"]["numpy"]
        np.random.set_state((npr["kind"], npr["keys"].numpy().astype(np.uint32), npr["pos"], npr["has_gauss"],
                             npr["gauss"]))
        random.setstate(state["rng"]["python"])
    n_params = tm.count_parameters(model)
    log(run, f"model {n_params}; args {vars(args)}")
    plan = stage_plan(args)
    t_start = time.time()
    done_stages = state.get("done_stages", []) if state else []
    global_step = state["step"] if state else 0
    offset = 0
    loop = StageLoop(args, model, tok_dir, t_start)
    for stage in plan:
        if stage.name in done_stages:
            offset += stage.steps
            continue
        step0 = max(0, global_step - offset)  # steps already done in this stage
        budget_s = args.minutes * 60 * stage_share(args, plan, stage.name)
        if stage.name == "v":
            vision_stage(args, model, tok_dir, stage.steps, stage.peak, budget_s)
            stopped = False
            save_ckpt(ckpt_path, model, None, offset + stage.steps, stage.name,
                      {"done_stages": done_stages + [stage.name], "stage_elapsed": 0.0})
        else:
            resumed = state if state and state.get("stage") == stage.name else None
            stopped = loop.run(stage, StageStart(step0, offset, resumed, done_stages), budget_s)
        state = None
        offset += stage.steps
        global_step = offset
        if stopped:
            log(run, "time limit reached; checkpoint saved - rerun with --resume to continue")
            return None
        done_stages.append(stage.name)
    final = run / "final"
    export(model, tok_dir, final)
    log(run, f"saved {final}")
    if args.out is not None:
        export(model, tok_dir, args.out, getattr(torch, args.out_dtype))
        log(run, f"saved {args.out}")
    return final


def vision_stage(args, model, tok_dir, steps: int, peak: float, budget_s: float) -> None:
    from tqdm import tqdm

    log(args.run, f"stage v: {steps} steps, vision encoder with dense per-token heads, peak lr {peak}")
    with tqdm(total=steps, desc="stage v", disable=args.no_tqdm, dynamic_ncols=True) as bar:
        done = run_stage_v(model, tm.processor_for(model.cfg, tok_dir), steps, batch=args.batch_v, lr=peak,
                           seed=args.seed, text_p=args.text_p_v,
                           budget_s=budget_s, log=lambda m: log(args.run, m), log_every=args.log_every * 5,
                           progress=lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    log(args.run, f"stage v: done after {done} steps")


def export(model, tok_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
    model.eval()
    tm.save_pretrained(model, tok_dir, out, dtype=dtype)


def main(argv=None) -> None:
    args = parse_args(argv)
    train(args)
