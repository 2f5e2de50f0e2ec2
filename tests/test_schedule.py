"""The one warm-up + cosine learning-rate schedule, as the stages and the bootstraps use it."""

from __future__ import annotations

import math

import pytest
import torch

from slit_lightning.training.schedule import warmup_cosine, warmup_cosine_lr


def test_warmup_then_cosine_to_the_floor():
    assert [warmup_cosine(s, 4, 14, 0.1) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_cosine(4, 4, 14, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(9, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(99, 4, 14, 0.1) == pytest.approx(0.1)  # past the end: the floor


def _rates(total: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = warmup_cosine_lr(optimizer, total)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_the_bootstraps_warm_up_over_a_twentieth_then_decay_to_zero():
    rates = _rates(100, 103)
    assert rates[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])  # warm-up of 5 steps
    assert rates[5] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0 / 95)))
    assert rates[52] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert max(rates) == pytest.approx(2.0) and rates[100:] == pytest.approx([0.0] * 3)
    assert _rates(0, 2)[0] == pytest.approx(2.0)  # a zero-step run is treated as one step
