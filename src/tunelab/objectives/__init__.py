"""Objectives, one loss per file, behind an explicit registry keyed by ``objective.name``.

An objective is ``fn(model, batch) -> LossSum``. The loop adds up ``num_units`` over the accumulation window
and divides every micro-batch's ``loss_sum`` by that total before backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.objectives.base import LossSum
from tunelab.objectives.sft import count_supervised_tokens, sft_loss_sum
from tunelab.settings import Settings

Objective = Callable[[nn.Module, dict[str, torch.Tensor]], LossSum]


@dataclass(frozen=True)
class ObjectiveSpec:
    """``loss_sum`` computes the summed loss; ``count_units`` counts a batch's units *before* the forward pass,
    so the loop knows the whole window's normaliser before the first backward."""

    loss_sum: Objective
    count_units: Callable[[dict[str, torch.Tensor]], int]
    summary: str = ""  # one line for the config reference: what the loss is


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(sft_loss_sum, count_supervised_tokens, "next-token cross-entropy on supervised tokens"),
}
DEFAULT_OBJECTIVE = "sft"


class ObjectiveConfig(Settings):
    """The config's ``objective`` section: which registered objective trains the model."""

    name: Literal[tuple(OBJECTIVES)] = Field(  # type: ignore[valid-type]
        DEFAULT_OBJECTIVE, description="Training objective. "
        + "; ".join(f"'{name}': {spec.summary}" for name, spec in OBJECTIVES.items()) + ".",
    )


__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "LossSum", "Objective", "ObjectiveConfig", "ObjectiveSpec"]
