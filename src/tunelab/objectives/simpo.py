"""Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward", https://arxiv.org/abs/2405.14734). No reference policy.

The reward is the length-normalised log-prob, r(y) = beta * mean log pi(y|x), and a target margin gamma:

    L = - log sigmoid(r(y_w) - r(y_l) - gamma)

Length normalisation removes DPO's pull towards longer answers; gamma asks for a clear gap, not just any.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.objectives.base import Batch, LossSum, Objective
from tunelab.objectives.logps import logps_memory
from tunelab.objectives.dpo import PAIR_METRICS
from tunelab.objectives.preference import (pair_rows, LOG_PROB_RANKING, NEVER_PACKED, collate_pairs, count_pairs, pair_stats,
                                           sequence_logps, split)
from tunelab.settings import Settings


class SimpoSettings(Settings):
    name: Literal["simpo"] = Field("simpo", description="Training objective (see the section's description).")
    beta: float = Field(2.0, gt=0, description="Reward scale (the paper uses 2.0-2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin (the paper's gamma/beta is about 0.5).")


def simpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    reward_chosen, reward_rejected = beta * mean_chosen, beta * mean_rejected  # (B,)
    return -F.logsigmoid(reward_chosen - reward_rejected - gamma), reward_chosen, reward_rejected


def simpo_loss_sum(model: nn.Module, batch: Batch, settings: SimpoSettings) -> LossSum:
    sums, counts = sequence_logps(model, batch)
    losses, chosen, rejected = simpo_losses(*split(sums / counts.clamp(min=1)), settings.beta, settings.gamma)
    return LossSum(losses.sum(), len(losses), pair_stats(chosen, rejected))


OBJECTIVE = Objective(
    name="simpo", config_class=SimpoSettings,
    loss_sum=simpo_loss_sum,
    count_units=count_pairs, units="pairs", collate=collate_pairs, batch_rows=pair_rows, metrics=PAIR_METRICS,
    summary="simple preference optimisation: length-normalised log-prob rewards with a margin gamma (no reference)",
    refuses={"packing": NEVER_PACKED},
    records="preference", evaluation=LOG_PROB_RANKING,
    loss_memory=logps_memory,  # the head runs in chunks (objectives.logps)
)
