"""Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
Reference Model", https://arxiv.org/abs/2403.07691). No reference policy.

With length-averaged log-probs l_w = mean log pi(y_w|x), l_l = mean log pi(y_l|x) and odds(y) = p / (1 - p):

    log_odds = (l_w - l_l) - (log(1 - exp(l_w)) - log(1 - exp(l_l)))
    L = - l_w - lambda * log sigmoid(log_odds)

the chosen answer's SFT loss (per token) plus an odds-ratio penalty on the rejected one. Rewards logged as
lambda * l (as TRL logs them).
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


class OrpoSettings(Settings):
    name: Literal["orpo"] = Field("orpo", description="Training objective (see the section's description).")
    beta: float = Field(0.1, gt=0, description="lambda: the weight of the odds-ratio term against the chosen "
                        "answer's SFT loss.")


def orpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and rewards, from length-averaged log-probs (each < 0)."""
    log_odds = (mean_chosen - mean_rejected) - (torch.log1p(-torch.exp(mean_chosen)) - torch.log1p(-torch.exp(mean_rejected)))
    losses = -mean_chosen - beta * F.logsigmoid(log_odds)
    return losses, beta * mean_chosen, beta * mean_rejected


def orpo_loss_sum(model: nn.Module, batch: Batch, settings: OrpoSettings) -> LossSum:
    sums, counts = sequence_logps(model, batch)
    means = split(sums / counts.clamp(min=1))
    losses, chosen, rejected = orpo_losses(*means, settings.beta)
    return LossSum(losses.sum(), len(losses), pair_stats(chosen, rejected))


OBJECTIVE = Objective(
    name="orpo", config_class=OrpoSettings, loss_sum=orpo_loss_sum,
    count_units=count_pairs, units="pairs", collate=collate_pairs, batch_rows=pair_rows, metrics=PAIR_METRICS,
    summary="odds-ratio preference optimisation: SFT on the chosen answer plus an odds-ratio term (no reference)",
    refuses={"packing": NEVER_PACKED},
    records="preference", evaluation=LOG_PROB_RANKING,
    loss_memory=logps_memory,  # the head runs in chunks (objectives.logps)
)
