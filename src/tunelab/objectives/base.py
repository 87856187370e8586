"""What an objective returns: a loss summed over its units (tokens, pairs, ...) and how many units it saw."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossSum(NamedTuple):
    loss_sum: torch.Tensor  # scalar, summed (not averaged) over the units of this micro-batch
    num_units: int  # supervised tokens for SFT; the loop normalises by the step's total
