"""Supervised fine-tuning: next-token cross-entropy on supervised tokens only.

    L = - (1 / N) * sum_{t : y_t != -100} log p_theta(y_t | x_<=t)

where N is the number of supervised tokens in the whole optimizer step (all micro-batches, all processes).
This function returns the *sum* and the count; the training loop divides by the step's total count, which
is what makes gradient accumulation equal the big batch (a mean of per-micro-batch means would weight a
short micro-batch's tokens more than a long one's).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from pydantic import Field
from torch import nn

from tunelab.data.tokenize import IGNORE
from tunelab.objectives.base import LossSum, Objective
from tunelab.settings import Settings
from tunelab.techniques.base import forward_inputs


class SftSettings(Settings):
    """Supervised fine-tuning has no settings of its own: what is supervised is the data's choice (data.train_on_prompt)."""

    name: Literal["sft"] = Field("sft", description="Training objective (see the section's description).")


@contextmanager
def logits_only_where(model: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Make the output head project only the hidden states at ``keep`` positions.

    A (B, T, V) logit tensor is the largest activation of a small LM (V ~ 50k-150k), and most positions have no
    label. A forward pre-hook on the head replaces its input (B, T, H) by hidden[keep] (N, H), so the model
    returns logits (N, V). Techniques that prepend virtual tokens make T longer than ``keep``: the mask is
    left-padded with False to match.
    """
    head = extract_model_from_parallel(model).get_output_embeddings()  # under DDP, the wrapped model's head

    def select(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # (B, T', H)
        mask = keep
        if hidden.dim() == 3 and hidden.shape[1] != mask.shape[1]:
            mask = F.pad(mask, (hidden.shape[1] - mask.shape[1], 0), value=False)
        return (hidden[mask],) + tuple(args[1:])  # (N, H)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def sft_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    targets = batch["targets"]  # (B, T), already shifted: targets[:, t] is the label of position t's prediction
    keep = targets != IGNORE  # (B, T)
    with logits_only_where(model, keep):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **forward_inputs(model, batch)).logits  # (N, V)
    loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return LossSum(loss_sum, int(keep.sum()))


def count_supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


OBJECTIVE = Objective(
    name="sft", config_class=SftSettings, loss_sum=sft_loss_sum, count_units=count_supervised_tokens, units="tokens",
    summary="next-token cross-entropy on supervised tokens",
)
