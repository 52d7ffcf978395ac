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
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import tiny_model as tm
from .binding import BindingLoss, parse_heads
from .data import STAGE_A_TASKS, STAGE_B_WEIGHTS, JsonlData, SyntheticStream, task_weights
from .evaluate import assistant_for, evaluate, format_table
from .losses import RouterLogits, lm_loss
from .schedule import stage_lr
from .vision import TEXT_P, run_stage_v

PARAM_GROUPS = {
    "all": lambda n: True,
    "projectors": lambda n: n.startswith(("visual.merger", "audio_tower.proj1", "audio_tower.proj2")),
    "encoders": lambda n: n.startswith(("visual.", "audio_tower.")),
    "vision": lambda n: n.startswith("visual."),
    "llm": lambda n: n.startswith(("model.", "lm_head.")),
    # After stage (v): keep the vision tower's dense features; its mergers (the projectors) still train.
    "no-vision-tower": lambda n: not n.startswith(("visual.blocks.", "visual.patch_embed.", "visual.pos_embed")),
}


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

def save_ckpt(path: Path, model, opt, step: int, stage: str, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    # Tensors, numbers, strings and tuples only, so resuming loads with weights_only=True (nothing unpickled).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    torch.save({"model": model.state_dict(), "opt": opt.state_dict() if opt is not None else {}, "step": step,
                "stage": stage, "rng": rng, **extra}, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the loop

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


def log(run: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    with open(run / "log.txt", "a") as f:
        f.write(line + "\n")


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


def make_loader(args, stage: str, tok_dir: Path, model, seed: int):
    """(batch iterator, dataset): the dataset is returned so the curriculum can lower its `easy_p`."""
    if args.data is not None:
        ds = JsonlData(args.data, tok_dir, model.config_dict, args.batch, seed)
    else:
        weights = STAGE_A_TASKS if stage == "a" else {**STAGE_B_WEIGHTS, **args.mix}
        ds = SyntheticStream(tok_dir, model.config_dict, weights, args.batch, seed, args.augment,
                             easy_p=easy_share(args.easy, stage, 0.0), bucket=args.bucket)
    kw = dict(num_workers=args.workers, prefetch_factor=4, persistent_workers=False) if args.workers else {}
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, **kw)), ds


def easy_share(start: float, stage: str, frac: float) -> float:
    """Curriculum: the share of easy samples (one large object; see `synthetic.make_sample`) at progress `frac` of
    a stage. From scratch, a small object among 36 vision tokens is a needle: attention that starts out uniform
    gives it ~1/36 of the signal, and a large centred object is learned several times sooner (docs/training-notes.md).
    So stage (a) starts at `start` and ends at start/3; stage (b) goes on from start/3 to 0 over its first 40%."""
    if stage == "a":
        return start * (1 - 2 / 3 * frac)
    return start / 3 * max(0.0, 1 - frac / 0.4)


@dataclass(frozen=True)
class Stage:
    """One entry of the training plan."""
    name: str  # "v" (vision encoder alone), "a" (alignment) or "b" (instruction tuning)
    steps: int
    group: str  # which parameters train (a PARAM_GROUPS key)
    peak: float  # peak learning rate


@dataclass
class StageStart:
    """Where a stage (re)starts: its first step, the plan's steps before it, a checkpoint taken inside it (or
    None), and the stages already finished."""
    step0: int
    offset: int
    state: dict | None
    done_stages: list[str]


def stage_plan(args) -> list[Stage]:
    plan = [Stage("v", args.steps_v, "vision", args.lr_v)] if args.steps_v > 0 and args.data is None else []
    if args.init is not None or args.data is not None:
        return plan + [Stage("b", args.steps, args.train, args.lr)]
    if args.steps_a > 0:
        plan.append(Stage("a", args.steps_a, args.train_a, args.lr_a or args.lr))
    plan.append(Stage("b", args.steps, args.train, args.lr))
    return plan


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


def stage_share(args, plan, stage: str) -> float:
    """Share of --minutes for `stage`: (v) and (a) get theirs, (b) the rest."""
    shares = {"v": args.v_share, "a": args.a_share}
    if stage in shares:
        return shares[stage]
    return 1.0 - sum(shares[p.name] for p in plan if p.name in shares)


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


class StageLoop:
    """Trains the stages after (v): one optimizer per stage, checkpoints, periodic evals and the time limits."""

    def __init__(self, args, model, tok_dir: Path, t_start: float):
        self.args, self.model, self.tok_dir, self.t_start = args, model, tok_dir, t_start

    def optimizer(self, stage: Stage, state: dict | None):
        """Freeze all but the stage's parameter group; AdamW over the rest (no weight decay on 1-D tensors)."""
        chooser = PARAM_GROUPS[stage.group]
        for n, p in self.model.named_parameters():
            p.requires_grad_(chooser(n))
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=stage.peak, betas=(0.9, 0.98),
                                eps=1e-8, fused=True)  # fused: one kernel for all tensors
        if state is not None and state.get("opt"):
            opt.load_state_dict(state["opt"])
        return opt, params

    def run(self, stage: Stage, start: StageStart, budget_s: float = 0.0) -> bool:
        """Train `stage` from `start.step0`; True when --max-minutes / --stop-at-step stopped it. With budget_s
        the stage also ends when its (resumable) elapsed time reaches budget_s."""
        from tqdm import tqdm

        args, model, run, steps = self.args, self.model, self.args.run, stage.steps
        opt, params = self.optimizer(stage, start.state)
        log(run, f"stage {stage.name}: {steps} steps, training {stage.group} ({sum(p.numel() for p in params):,} "
                 f"params), peak lr {stage.peak}, from step {start.step0}")
        loader, data = make_loader(args, stage.name, self.tok_dir, model,
                                   args.seed + 7919 * (start.offset + start.step0) + ord(stage.name))
        router = RouterLogits(model)
        binder = BindingLoss(model, parse_heads(args.bind_heads if args.bind_coef > 0 else "",
                                                len(model.model.layers)))
        model.train()
        bar = tqdm(total=steps, initial=start.step0, desc=f"stage {stage.name}", disable=args.no_tqdm,
                   dynamic_ncols=True)
        ema = None
        t_last = time.time()
        warm = min(args.warmup, max(1, steps // 10))
        t_stage = time.time() - (start.state.get("stage_elapsed", 0.0) if start.state is not None else 0.0)
        total_steps = steps

        def save(step: int, finished: bool) -> None:
            save_ckpt(run / "ckpt.pt", model, opt, start.offset + step, stage.name,
                      {"done_stages": list(start.done_stages) + ([stage.name] if finished else []),
                       "stage_elapsed": time.time() - t_stage})

        try:
            for step in range(start.step0, steps):
                batch = next(loader)
                frac = step / steps
                if budget_s:
                    frac = max(frac, (time.time() - t_stage) / budget_s)
                    if frac >= 1.0:
                        log(run, f"stage {stage.name}: time budget {budget_s / 60:.1f} min used after {step} steps")
                        total_steps = step
                        break
                for g in opt.param_groups:
                    g["lr"] = stage_lr(step, steps, warm, stage.peak, frac)
                if hasattr(data, "easy_p"):
                    data.easy_p = easy_share(args.easy, stage.name, frac)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    hidden = model.hidden(batch)
                loss, n_tok = lm_loss(model.lm_head, hidden, batch["labels"])
                aux = router.aux_loss()
                bind = binder.loss(batch)
                total = loss + args.aux_coef * aux + args.bind_coef * bind
                opt.zero_grad(set_to_none=True)
                total.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                value = float(loss.detach())
                ema = value if ema is None else 0.95 * ema + 0.05 * value
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", aux=f"{float(aux.detach()):.2f}")
                done = step + 1
                if done % args.log_every == 0 or done == steps:
                    dt = (time.time() - t_last) / args.log_every
                    t_last = time.time()
                    log(run, f"stage {stage.name} step {done}/{steps} loss {value:.4f} ema {ema:.4f} "
                             f"aux {float(aux.detach()):.3f} bind {float(bind.detach()):.3f} "
                             f"gnorm {float(gn):.2f} lr {opt.param_groups[0]['lr']:.2e} "
                             f"easy {getattr(data, 'easy_p', 0):.2f} seq {batch['input_ids'].shape[1]} "
                             f"ntok {n_tok} {dt:.2f}s/step")
                if done % args.ckpt_every == 0 or done == steps:
                    save(done, finished=False)
                if args.eval_every and (done % args.eval_every == 0 or done == steps) and args.data is None:
                    periodic_eval(args, model, self.tok_dir, done, stage.name)
                    router.logits.clear()
                    model.train()
                if (args.max_minutes and (time.time() - self.t_start) / 60 > args.max_minutes) or (
                        args.stop_at_step and start.offset + done >= args.stop_at_step):
                    save(done, finished=False)
                    return True
            else:
                total_steps = steps
            if total_steps < steps:  # ended by the time budget: final checkpoint and eval of this stage
                save(steps, finished=True)
                if args.eval_every and args.data is None:
                    periodic_eval(args, model, self.tok_dir, total_steps, stage.name)
        finally:
            bar.close()
            router.remove()
            binder.remove()
        return False


def periodic_eval(args, model, tok_dir, step, stage) -> None:
    model.eval()
    t0 = time.time()
    bot = assistant_for(model, tok_dir)
    with torch.no_grad():
        res = evaluate(bot, n=args.eval_n, robust=True, seed0=10_000, progress=False)
    log(args.run, f"eval stage {stage} step {step} ({time.time() - t0:.0f}s):\n" + format_table(res))
    with open(args.run / "evals.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, "step": step, **{k: v["acc"] for k, v in res.items()}}) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    train(args)
