"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", https://arxiv.org/abs/2305.18290), with conservative label smoothing (cDPO, Mitchell 2023).

For a prompt x with chosen y_w and rejected y_l, the implicit reward of an answer is r(y) = beta * (log pi(y|x) -
log pi_ref(y|x)) (summed over the answer's tokens), and with h = r(y_w) - r(y_l):

    L = - (1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

eps = label_smoothing: the share of pairs assumed mislabelled. Before training pi = pi_ref, so h = 0 and L = ln 2.
Summed over pairs here; the loop divides by the step's pair count.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.objectives.base import Batch, LossSum, Objective, Reference
from tunelab.objectives.logps import logps_memory
from tunelab.objectives.preference import (pair_rows, LOG_PROB_RANKING, NEVER_PACKED, REFERENCE_FIELD, ReferenceMode,
                                           attach_reference, collate_pairs, count_pairs, pair_stats, reference_logps, sequence_logps, split)
from tunelab.settings import Settings

PAIR_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "preference_accuracy")


class DpoSettings(Settings):
    name: Literal["dpo"] = Field("dpo", description="Training objective (see the section's description).")
    beta: float = Field(0.1, gt=0, description="KL strength: how far the policy may move from the reference "
                        "(small: further; typical 0.01-0.5).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: the share of pairs assumed mislabelled "
                                   "(0: plain DPO).")
    reference: ReferenceMode = REFERENCE_FIELD


def dpo_losses(policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], beta: float,
               label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected (B,), from summed log-probs."""
    reward_chosen = beta * (policy[0] - ref[0])  # (B,)
    reward_rejected = beta * (policy[1] - ref[1])  # (B,)
    h = reward_chosen - reward_rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, reward_chosen, reward_rejected


def dpo_loss_sum(model: nn.Module, batch: Batch, settings: DpoSettings, reference: Reference | None) -> LossSum:
    policy = split(sequence_logps(model, batch)[0])
    ref = reference_logps(model, batch, reference)
    losses, chosen, rejected = dpo_losses(policy, ref, settings.beta, settings.label_smoothing)
    return LossSum(losses.sum(), len(losses), pair_stats(chosen, rejected))


OBJECTIVE = Objective(
    name="dpo", config_class=DpoSettings, loss_sum=dpo_loss_sum, count_units=count_pairs, units="pairs",
    summary="direct preference optimization on {prompt, chosen, rejected} pairs against a reference policy",
    collate=collate_pairs, batch_rows=pair_rows, needs_reference=True, precompute=attach_reference, metrics=PAIR_METRICS, refuses={"packing": NEVER_PACKED},
    records="preference", evaluation=LOG_PROB_RANKING,
    loss_memory=logps_memory,  # the head runs in chunks (objectives.logps)
)
