"""A training run's files: the resumable checkpoint (model, optimizer, step, stage, every RNG) and the log.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

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


def log(run: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    with open(run / "log.txt", "a") as f:
        f.write(line + "\n")
