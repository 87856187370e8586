"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", https://arxiv.org/abs/2402.01306), on unpaired {prompt, completion, label} records.

With the log-ratio rho(x, y) = log pi(y|x) - log pi_ref(y|x) (summed over the completion's tokens) and a reference
point z0, an estimate of KL(pi || pi_ref) from mismatched pairs (prompt i with completion i+1 of the same
micro-batch), clamped at 0 and not differentiated:

    desirable y:    L = lambda_D * (1 - sigmoid(beta * (rho - z0)))
    undesirable y:  L = lambda_U * (1 - sigmoid(beta * (z0 - rho)))

Summed over examples; the loop divides by the step's example count. z0 is estimated per micro-batch, as in the
paper and TRL, so with gradient accumulation a step differs slightly from one big batch unless ``kl: zero``
(z0 = 0, exactly the big batch). Before training rho = z0 = 0 and every loss is lambda / 2.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.data import IGNORE, TokenizedExample, collate
from tunelab.data.pairs import TokenizedCompletion
from tunelab.objectives.base import Batch, LossSum, Objective, Reference
from tunelab.objectives.logps import logps_memory
from tunelab.objectives.preference import LOG_PROB_RANKING, NEVER_PACKED, reference_logps, sequence_logps, split
from tunelab.settings import Settings


class KtoSettings(Settings):
    name: Literal["kto"] = Field("kto", description="Training objective (see the section's description).")
    beta: float = Field(0.1, gt=0, description="KL strength, as DPO's beta.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of desirable completions.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of undesirable completions (raise it "
                                      "when they are fewer, so lambda_D n_D / (lambda_U n_U) stays in [1, 4/3]).")
    kl: Literal["batch", "zero"] = Field("batch", description="The reference point z0: 'batch' estimates KL from "
                                         "mismatched pairs of each micro-batch (the paper's); 'zero' uses 0.")
    reference: Literal["live"] = Field("live", description="The reference policy's log-probs, computed at every step "
                                       "(the mismatched pairs change with every shuffle, so they are not precomputed).")


def _prompt_length(example: TokenizedExample) -> int:
    """Tokens before the first supervised one: the prompt (the first label is IGNORE by construction)."""
    return next((i for i, label in enumerate(example.labels) if i and label != IGNORE), len(example.labels))


def mismatched(prompt_of: TokenizedExample, completion_of: TokenizedExample) -> TokenizedExample:
    """prompt_of's prompt followed by completion_of's completion (supervised): a sample for the KL estimate."""
    cut_p, cut_c = _prompt_length(prompt_of), _prompt_length(completion_of)
    return replace(prompt_of, input_ids=prompt_of.input_ids[:cut_p] + completion_of.input_ids[cut_c:],
                   labels=[IGNORE] * cut_p + completion_of.labels[cut_c:])


def collate_completions(rows: list[list[TokenizedCompletion]], pad_id: int) -> Batch:
    """B completions -> (2B, T): the completions, then the mismatched pairs (prompt i, completion i+1); and
    ``desirable`` (B,)."""
    items = [item for row in rows for item in row]
    real = [item.example for item in items]
    shifted = [mismatched(real[i], real[(i + 1) % len(real)]) for i in range(len(real))]
    batch = collate([[e] for e in real] + [[e] for e in shifted], pad_id)
    batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
    return batch


def completion_rows(item: TokenizedCompletion) -> tuple[int, ...]:
    """An example's rows in a batch (``Objective.batch_rows``): its completion and a mismatched pair (its prompt with
    another example's completion), counted as long as its own."""
    return (len(item.input_ids),) * 2


def count_examples(batch: Batch) -> int:
    return int(batch["desirable"].shape[0])


def kto_losses(ratio: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, settings: KtoSettings) -> torch.Tensor:
    """Per-example losses (B,) from log-ratios rho (B,), labels (B,) and the reference point z0 ()."""
    gain = settings.desirable_weight * (1 - torch.sigmoid(settings.beta * (ratio - z0)))
    loss = settings.undesirable_weight * (1 - torch.sigmoid(settings.beta * (z0 - ratio)))
    return torch.where(desirable, gain, loss)


def kto_loss_sum(model: nn.Module, batch: Batch, settings: KtoSettings, reference: Reference | None) -> LossSum:
    policy = split(sequence_logps(model, batch)[0])  # completions (B,), mismatched (B,)
    ref = reference_logps(model, batch, reference)
    ratio = policy[0] - ref[0]  # (B,)
    z0 = (policy[1] - ref[1]).mean().clamp(min=0).detach() if settings.kl == "batch" else ratio.new_zeros(())
    losses = kto_losses(ratio, batch["desirable"], z0, settings)
    rewards = settings.beta * ratio.detach()
    return LossSum(losses.sum(), len(losses), {"kl": z0 * len(losses), "reward": rewards.sum()})


OBJECTIVE = Objective(
    name="kto", config_class=KtoSettings, loss_sum=kto_loss_sum, count_units=count_examples, units="examples",
    summary="Kahneman-Tversky optimisation on unpaired {prompt, completion, label} records, against a reference",
    collate=collate_completions, batch_rows=completion_rows, needs_reference=True, metrics=("kl", "reward"), refuses={"packing": NEVER_PACKED},
    records="unpaired_preference", evaluation=LOG_PROB_RANKING,  # evaluated on pairs, as the policies above
    loss_memory=logps_memory,  # the head runs in chunks (objectives.logps)
)
