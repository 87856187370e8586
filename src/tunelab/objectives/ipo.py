"""Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
Human Preferences", https://arxiv.org/abs/2310.12036).

With length-averaged log-probs (as TRL's IPO: a mean over each answer's tokens) and
h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):

    L = (h - 1 / (2 * beta))^2

A squared loss that pulls h to a finite target instead of pushing it to infinity, so it does not over-fit
deterministic preferences as DPO can. Before training h = 0 and L = 1 / (4 beta^2). Implicit rewards logged as
beta * (length-averaged log-ratio).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.objectives.base import Batch, LossSum, Objective, Reference
from tunelab.objectives.logps import logps_memory
from tunelab.objectives.dpo import PAIR_METRICS
from tunelab.objectives.preference import (pair_rows, LOG_PROB_RANKING, NEVER_PACKED, REFERENCE_FIELD, ReferenceMode,
                                           attach_reference, collate_pairs, count_pairs, pair_stats, reference_logps, sequence_logps, split)
from tunelab.settings import Settings


class IpoSettings(Settings):
    name: Literal["ipo"] = Field("ipo", description="Training objective (see the section's description).")
    beta: float = Field(0.1, gt=0, description="Regularisation: the target log-ratio margin is 1 / (2 beta).")
    reference: ReferenceMode = REFERENCE_FIELD


def ipo_losses(policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
               lengths: tuple[torch.Tensor, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and rewards, from summed log-probs and each side's token count."""
    ratio_chosen = (policy[0] - ref[0]) / lengths[0]  # (B,) length-averaged log-ratio
    ratio_rejected = (policy[1] - ref[1]) / lengths[1]
    losses = (ratio_chosen - ratio_rejected - 1 / (2 * beta)) ** 2
    return losses, beta * ratio_chosen, beta * ratio_rejected


def ipo_loss_sum(model: nn.Module, batch: Batch, settings: IpoSettings, reference: Reference | None) -> LossSum:
    sums, counts = sequence_logps(model, batch)
    ref = reference_logps(model, batch, reference)
    losses, chosen, rejected = ipo_losses(split(sums), ref, split(counts.float()), settings.beta)
    return LossSum(losses.sum(), len(losses), pair_stats(chosen, rejected))


OBJECTIVE = Objective(
    name="ipo", config_class=IpoSettings, loss_sum=ipo_loss_sum, count_units=count_pairs, units="pairs",
    summary="identity preference optimisation: a squared loss on the log-ratio margin, against a reference",
    collate=collate_pairs, batch_rows=pair_rows, needs_reference=True, precompute=attach_reference, metrics=PAIR_METRICS, refuses={"packing": NEVER_PACKED},
    records="preference", evaluation=LOG_PROB_RANKING,
    loss_memory=logps_memory,  # the head runs in chunks (objectives.logps)
)
