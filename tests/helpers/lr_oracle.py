"""The lr schedules from their definitions (not from diffusers): the oracle the schedule tests
compare against, on the tiny UNet (test_train_mechanisms) and on float64 stand-ins (test_train_step)."""

from __future__ import annotations

import math


def expected_lr(kind: str, step: int, base: float, warmup: int, total: int) -> float:
    """The lr at 0-based step ``step`` of a ``kind`` schedule with ``warmup`` linear warm-up steps."""
    if kind == "constant":
        return base
    if step < warmup:
        return base * step / warmup
    if kind == "constant_with_warmup":
        return base
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine, half a period
