"""Loss and perplexity over supervised tokens only, without accumulating logits.

Logits are computed at supervised positions only (the output head sees hidden[keep], see
``objectives.logits_only_where``) and reduced at once, so evaluation needs no more memory than one training
micro-batch, however large the set.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn

from tunelab.data.batching import collate
from tunelab.data.tokenize import IGNORE, TokenizedExample
from tunelab.objectives import LossFunction, logits_only_where
from tunelab.techniques.base import forward_inputs


@torch.no_grad()
def validation_loss(
    model: nn.Module, examples: list[TokenizedExample], objective: LossFunction, pad_id: int, batch_size: int,
    device: torch.device, accelerator: Any = None, collate_fn: Callable[[list[list[Any]], int], dict[str, torch.Tensor]] = collate,
) -> dict[str, float]:
    """Unit-weighted validation loss (per token for SFT, per pair for preference objectives), perplexity, and the
    mean of each figure the objective reports (``LossSum.stats``). Each process takes every world_size-th batch."""
    was_training = model.training
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths per batch: little padding
    batches = [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    stats: dict[str, torch.Tensor] = {}
    for batch in batches[rank::world]:
        tensors = {k: v.to(device) for k, v in collate_fn([[e] for e in batch], pad_id).items()}
        result = objective(model, tensors)
        loss_sum += result.loss_sum.double()
        tokens += result.num_units
        for name, value in result.stats.items():
            stats[name] = stats.get(name, torch.zeros((), dtype=torch.float64, device=device)) + value.double()
    if accelerator is not None and world > 1:
        loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
        # A process can have no batch at all (fewer batches than processes): its stats are empty, so the names to
        # reduce are agreed on first; every process must make the same collectives or they wait for each other.
        names = sorted(set(gather_object(sorted(stats))))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        stats = {name: accelerator.reduce(stats.get(name, zero), "sum") for name in names}
    model.train(was_training)
    units = max(int(tokens.item()), 1)
    return {**loss_summary(loss_sum.item(), int(tokens.item())),
            **{name: round(value.item() / units, 6) for name, value in stats.items()}}


def loss_summary(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": tokens}


@torch.no_grad()
def example_losses(model: nn.Module, examples: list[TokenizedExample], pad_id: int, batch_size: int,
                   device: torch.device) -> Iterator[tuple[float, int]]:
    """(summed token loss, supervised tokens) of each example, in the given order, one batch at a time."""
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        tensors = {k: v.to(device) for k, v in collate([[e] for e in batch], pad_id).items()}
        targets = tensors["targets"]  # (B, T)
        keep = targets != IGNORE  # (B, T)
        with logits_only_where(model, keep):
            logits = model(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False,
                           **forward_inputs(model, tensors)).logits  # (N, V)
        token_losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
        rows = keep.nonzero()[:, 0]  # (N,) the example each supervised position belongs to
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, token_losses.double())
        counts = keep.sum(dim=1)  # (B,)
        yield from zip(sums.tolist(), counts.tolist())
    model.train(was_training)
