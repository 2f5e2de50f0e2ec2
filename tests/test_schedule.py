"""The bootstraps' warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from slit_lightning.training.schedule import warmup_cosine


def _rates(total: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = warmup_cosine(optimizer, total)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_warms_up_over_a_twentieth_then_follows_the_cosine_to_zero():
    rates = _rates(100, 103)
    assert rates[0] == pytest.approx(2.0 / 5)  # warm-up of 5 steps
    assert rates[4] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 4 / 100)))
    assert rates[50] == pytest.approx(1.0)  # half-way down the cosine
    assert max(rates) == pytest.approx(rates[4]) and rates[100:] == pytest.approx([0.0] * 3)
    assert _rates(0, 2)[0] == pytest.approx(2.0)  # a zero-step run is treated as one step
