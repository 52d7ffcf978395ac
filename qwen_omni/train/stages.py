"""The training stages after (v): which parameters each trains, the plan of stages, the data of a stage, and the
loop that runs one stage with its optimizer, checkpoints, periodic evals and time limits (`StageLoop`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .binding import BindingLoss, parse_heads
from .checkpoint import log, save_ckpt
from .data import STAGE_A_TASKS, STAGE_B_WEIGHTS, JsonlData, SyntheticStream
from .evaluate import assistant_for, evaluate, format_table
from .losses import RouterLogits, lm_loss
from .schedule import stage_lr

PARAM_GROUPS = {
    "all": lambda n: True,
    "projectors": lambda n: n.startswith(("visual.merger", "audio_tower.proj1", "audio_tower.proj2")),
    "encoders": lambda n: n.startswith(("visual.", "audio_tower.")),
    "vision": lambda n: n.startswith("visual."),
    "llm": lambda n: n.startswith(("model.", "lm_head.")),
    # After stage (v): keep the vision tower's dense features; its mergers (the projectors) still train.
    "no-vision-tower": lambda n: not n.startswith(("visual.blocks.", "visual.patch_embed.", "visual.pos_embed")),
}


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


def stage_share(args, plan, stage: str) -> float:
    """Share of --minutes for `stage`: (v) and (a) get theirs, (b) the rest."""
    shares = {"v": args.v_share, "a": args.a_share}
    if stage in shares:
        return shares[stage]
    return 1.0 - sum(shares[p.name] for p in plan if p.name in shares)


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
