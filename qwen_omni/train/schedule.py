"""The learning-rate schedule of every training stage: linear warm-up, then cosine decay to a floor.

A stage may end on a time budget instead of its step count, so its decay follows the larger of the step and
the time fractions (`stage_lr`): a run cut short by the clock still ends at the low learning rate.
"""
from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def stage_lr(step: int, total: int, warmup: int, peak: float, frac: float) -> float:
    """`lr_at` for a stage that may end on a time budget: warm up by step, then decay by progress `frac` (the
    larger of the step and the time fractions)."""
    return lr_at(step, total, warmup, peak) if step < warmup else lr_at(
        warmup + int(frac * (total - warmup)), total, warmup, peak)
