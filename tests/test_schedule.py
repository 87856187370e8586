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


def _next_rates(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    rates = []
    for _ in range(n):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_scheduler_state_round_trips_for_resume() -> None:
    """Restored into a scheduler built afresh (at step 0, another state), the next rates are the original's."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", 0.2, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved = optimizer.state_dict(), scheduler.state_dict()
    expected = _next_rates(optimizer, scheduler, 5)

    fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = _next_rates(fresh_optimizer, make_scheduler(fresh_optimizer, "cosine", 0.2, 10), 5)
    assert fresh != pytest.approx(expected), "control: without the saved state the rates differ"
    restored_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    restored = make_scheduler(restored_optimizer, "cosine", 0.2, 10)
    restored_optimizer.load_state_dict(saved_optimizer)
    restored.load_state_dict(saved)
    assert _next_rates(restored_optimizer, restored, 5) == pytest.approx(expected)
    assert expected == pytest.approx([lr_multiplier(s, kind="cosine", warmup_steps=2, total_steps=10) for s in range(5, 10)])


def test_a_resume_with_more_steps_follows_the_new_schedule_from_the_saved_step() -> None:
    """training.max_steps may grow on --resume: the scheduler rebuilt with the new total continues at the saved step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, "linear", 0.0, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    longer_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    longer = make_scheduler(longer_optimizer, "linear", 0.0, 20)
    longer_optimizer.load_state_dict(optimizer.state_dict())
    longer.load_state_dict(scheduler.state_dict())
    assert _next_rates(longer_optimizer, longer, 3) == pytest.approx([1 - s / 20 for s in (5, 6, 7)])
