"""Learning-rate schedules as pure functions of the step (unit-tested, plotted, resumable)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    ``step`` is the number of optimizer steps already taken; the value is the LR of the next one.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lambda_scheduler(optimizer, fn, base_lr: float):
    """A torch LambdaLR that sets the optimizer's LR to ``fn(step)`` (fn returns an absolute LR)."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = base_lr
        group.setdefault("initial_lr", base_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step) / base_lr)
