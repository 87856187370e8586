"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

Written here rather than taken from ``transformers.get_scheduler`` because its warmup starts at a multiplier of
0: the first optimizer step runs at learning rate 0 and changes nothing (a one-step run trains nothing, and a
short run wastes a step). Here warmup step s (0-based) runs at (s + 1) / (warmup + 1) of the peak, so every
step moves the weights, and the peak is reached on the first step after warmup.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch

Schedule = Literal["cosine", "linear", "constant"]


def lr_multiplier(step: int, *, kind: Schedule, warmup_steps: int, total_steps: int) -> float:
    """Share of the peak learning rate used by optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    # progress is 0 on the first step after warmup and (n-1)/n on the last step, so no step runs at exactly 0.
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, kind: Schedule, warmup_ratio: float,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    # A partial (not a lambda) so the scheduler's state_dict stays plain data for checkpoints.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps)
    )
