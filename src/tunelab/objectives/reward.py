"""Reward model: a scalar score head trained with the Bradley-Terry loss on {prompt, chosen, rejected} pairs
(Bradley & Terry 1952; as in Ouyang et al. 2022, "Training language models to follow instructions with human
feedback", https://arxiv.org/abs/2203.02155).

The model is a one-label sequence classifier (AutoModelForSequenceClassification, num_labels=1): r(x, y) is the
score at the last token that is not padding. With an optional margin m:

    L = - log sigmoid(r(x, y_w) - r(x, y_l) - m)

P(y_w preferred) = sigmoid(r_w - r_l) is the Bradley-Terry model; the margin asks for a gap of at least m. With an
adapter technique PEFT trains the new head too and saves it with the adapter (modules_to_save), so the result
loads without tunelab as a one-label classifier.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.metrics import Metric, unit_mean
from tunelab.objectives.base import Batch, Evaluation, LossSum, Objective, NEW_HEAD
from tunelab.objectives.preference import (pair_rows, NEVER_PACKED, chance, collate_pairs, count_pairs, describe_ranking,
                                           ranking_stats, split)
from tunelab.settings import Settings
from tunelab.techniques.base import forward_inputs


class RewardSettings(Settings):
    name: Literal["reward"] = Field("reward", description="Training objective (see the section's description).")
    margin: float = Field(0.0, ge=0, description="Required score gap m between chosen and rejected (0: plain "
                          "Bradley-Terry).")


def bradley_terry_losses(score_chosen: torch.Tensor, score_rejected: torch.Tensor, margin: float) -> torch.Tensor:
    return -F.logsigmoid(score_chosen - score_rejected - margin)  # (B,)


def scores(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The score head's output for each row (R,): pooled by the model at its last non-padding token."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                 **forward_inputs(model, batch)).logits[:, 0].float()


def reward_loss_sum(model: nn.Module, batch: Batch, settings: RewardSettings) -> LossSum:
    chosen, rejected = split(scores(model, batch))
    losses = bradley_terry_losses(chosen, rejected, settings.margin)
    gap = (chosen - rejected).detach()
    return LossSum(losses.sum(), len(losses), {"pairwise_accuracy": (gap > 0).float().sum(), "score_margin": gap.sum()})


def _ranking_metrics(classes: list[str]) -> list[Metric]:
    return [unit_mean("pairwise_accuracy"), unit_mean("score_margin")]


@torch.no_grad()
def score_ranking(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Each pair's (value, 1) statistics: 1 when the score head rates the chosen answer above the rejected one,
    and the score gap r(x, y_w) - r(x, y_l)."""
    score_chosen, score_rejected = split(scores(model, batch))  # (B,), (B,)
    return ranking_stats(score_chosen - score_rejected, "pairwise_accuracy", "score_margin")


# `tunelab eval` of a reward model: does its score rank held-out pairs right, against the base's untrained head
# and against chance?
SCORE_RANKING = Evaluation(
    records="preference", collate=collate_pairs, metrics=_ranking_metrics, unit_stats=score_ranking,
    baseline=chance("pairwise_accuracy", "score_margin"),
    describe=describe_ranking("pairwise_accuracy", "score_margin", "score"),
)

OBJECTIVE = Objective(
    name="reward", config_class=RewardSettings, loss_sum=reward_loss_sum, count_units=count_pairs, units="pairs",
    summary="reward model: Bradley-Terry loss on a scalar score head over {prompt, chosen, rejected} pairs",
    collate=collate_pairs, batch_rows=pair_rows, num_labels=1, metrics=("pairwise_accuracy", "score_margin"),
    refuses={"packing": NEVER_PACKED},
    records="preference", evaluation=SCORE_RANKING,
    base_figures_uncached=NEW_HEAD,
)
