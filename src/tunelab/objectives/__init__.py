"""Objectives, one loss per file, behind an explicit registry keyed by ``objective.name``.

An objective is ``fn(model, batch) -> LossSum``. The loop adds up ``num_units`` over the accumulation window
and divides every micro-batch's ``loss_sum`` by that total before backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tunelab.objectives.base import LossSum
from tunelab.objectives.sft import count_supervised_tokens, sft_loss_sum

Objective = Callable[[nn.Module, dict[str, torch.Tensor]], LossSum]


@dataclass(frozen=True)
class ObjectiveSpec:
    """``loss_sum`` computes the summed loss; ``count_units`` counts a batch's units *before* the forward pass,
    so the loop knows the whole window's normaliser before the first backward."""

    loss_sum: Objective
    count_units: Callable[[dict[str, torch.Tensor]], int]


OBJECTIVES: dict[str, ObjectiveSpec] = {"sft": ObjectiveSpec(sft_loss_sum, count_supervised_tokens)}

__all__ = ["OBJECTIVES", "LossSum", "Objective", "ObjectiveSpec"]
