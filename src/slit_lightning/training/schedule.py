"""The learning-rate schedule of the built-in models' bootstraps (plain PyTorch loops).

The Lightning stages schedule their own learning rate (``stages/base.py``); the encoder tagger,
its count readout and the built-in LLM train in short loops of their own and share this one.
"""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine"]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5 % of ``total`` steps, times a cosine from 1 to 0 over all
    ``total`` (0 after them); step it after every optimizer step."""
    total = max(1, total)
    warmup = max(1, total // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        ),
    )
