"""Validation under several processes: every process makes the same collectives, also one that has no batch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tunelab.eval import loss as eval_loss


class RecordingAccelerator:
    """Stands for rank 1 of 2: ``reduce`` records each call and returns the value (this process's share)."""

    process_index, num_processes = 1, 2

    def __init__(self) -> None:
        self.reduced: list[torch.Tensor] = []

    def reduce(self, value: torch.Tensor, how: str) -> torch.Tensor:
        assert how == "sum"
        self.reduced.append(value)
        return value


def test_a_process_without_a_batch_reduces_every_figure_the_others_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """One validation batch for two processes: rank 1 evaluates nothing, so it has no figures of its own. It must
    still reduce each figure rank 0 reports (here a preference objective's reward margin), or rank 0 waits forever in
    its third reduce (a DDP DPO run with a small validation set hung at its first evaluation)."""
    examples = [SimpleNamespace(input_ids=[1, 2, 3])]  # one batch: rank 0's

    def never_called(*args: Any) -> Any:
        raise AssertionError("rank 1 has no batch to evaluate")

    # what gather_object hands back: every process's names (rank 1's list is empty)
    monkeypatch.setattr(eval_loss, "gather_object", lambda names: [*names, "reward_margin"])
    accelerator = RecordingAccelerator()
    figures = eval_loss.validation_loss(torch.nn.Linear(1, 1), examples, never_called, 0, 8, torch.device("cpu"),
                                        accelerator, collate_fn=never_called)
    assert len(accelerator.reduced) == 3  # the loss sum, the unit count and the one figure
    assert figures["reward_margin"] == 0.0 and figures["tokens"] == 0
