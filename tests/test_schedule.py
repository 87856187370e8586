"""Learning-rate schedules: warmup never wastes a step at lr 0, the peak is reached, decay shapes are right."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.schedule import lr_multiplier, make_scheduler


def _rates(kind: str, warmup_ratio: float, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, kind, warmup_ratio, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_every_step_has_a_positive_rate_and_the_peak_follows_warmup(kind: str) -> None:
    rates = _rates(kind, 0.1, 20)  # 2 warmup steps
    assert all(rate > 0 for rate in rates)
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert max(rates) == pytest.approx(1.0)


def test_a_single_step_run_trains() -> None:
    # transformers' schedules give lr 0 on the first step: a one-step run would change nothing.
    assert _rates("cosine", 0.05, 1) == pytest.approx([0.5])


def test_decay_shapes() -> None:
    assert _rates("linear", 0.0, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert _rates("cosine", 0.0, 4) == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert _rates("constant", 0.0, 3) == pytest.approx([1.0, 1.0, 1.0])


def test_scheduler_state_round_trips_for_resume() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", 0.1, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    restored_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    restored = make_scheduler(restored_optimizer, "cosine", 0.1, 10)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.last_epoch == 4 and restored.get_last_lr() == scheduler.get_last_lr()
    assert lr_multiplier(4, kind="cosine", warmup_steps=1, total_steps=10) == pytest.approx(scheduler.get_last_lr()[0])
