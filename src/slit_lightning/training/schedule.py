"""The one learning-rate schedule: a linear warm-up, then a cosine decay to a floor.

The Lightning stages step it per optimiser step (``SLITStage.configure_optimizers``); the built-in
models' bootstraps, plain PyTorch loops, take it as a ``LambdaLR`` (:func:`warmup_cosine_lr`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine", "warmup_cosine_lr"]


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear 0 -> 1 over ``warmup`` steps, then a cosine 1 -> ``floor`` that
    ends at step ``total`` (``floor`` after it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lr(
    optimizer: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine` over ``total`` steps, warming up over the first twentieth and
    decaying to 0; step it after every optimiser step."""
    total = max(1, total)
    warmup = max(1, total // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
