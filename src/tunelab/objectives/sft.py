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
from tunelab.objectives.base import HeadOutput, LossSum, Objective, full_logits_memory
from tunelab.objectives.chunks import CHUNK_ROWS, ChunkLogits, softmax_in_place
from tunelab.settings import Settings
from tunelab.techniques.base import forward_inputs

class SftSettings(Settings):
    """Supervised fine-tuning has no settings of its own: what is supervised is the data's choice (data.train_on_prompt)."""

    name: Literal["sft"] = Field("sft", description="Training objective (see the section's description).")


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head; under DDP, the wrapped model's (the wrapper has none)."""
    return extract_model_from_parallel(model).get_output_embeddings()


def rows_at(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, T', H) at the ``keep`` (B, T) positions: (N, H). Techniques that prepend virtual
    tokens make T' longer than T: the mask is left-padded with False to match."""
    if hidden.dim() == 3 and hidden.shape[1] != keep.shape[1]:
        keep = F.pad(keep, (hidden.shape[1] - keep.shape[1], 0), value=False)
    return hidden[keep]


@contextmanager
def logits_only_where(model: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Make the output head project only the hidden states at ``keep`` positions.

    A (B, T, V) logit tensor is the largest activation of a small LM (V ~ 50k-150k), and most positions have no
    label. A forward pre-hook on the head replaces its input (B, T, H) by hidden[keep] (N, H), so the model
    returns logits (N, V) (``rows_at``).
    """
    head = output_head(model)

    def select(module: nn.Module, args: tuple) -> tuple:
        return (rows_at(args[0], keep),) + tuple(args[1:])  # (B, T', H) -> (N, H)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def hidden_only_where(model: nn.Module, keep: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Like ``logits_only_where``, but the head is left for the caller to run: the yielded list receives the hidden
    states at ``keep`` (N, H) and the head itself projects no rows (its output is (0, V))."""
    head = output_head(model)
    hidden_rows: list[torch.Tensor] = []

    def select(module: nn.Module, args: tuple) -> tuple:
        hidden_rows.append(rows_at(args[0], keep))  # (N, H)
        return (hidden_rows[-1][:0],) + tuple(args[1:])  # (0, H): nothing left for the head to do

    handle = head.register_forward_pre_hook(select)
    try:
        yield hidden_rows
    finally:
        handle.remove()


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_n CE(hidden[n] @ weight.T + bias, targets[n]), ``chunk_rows`` rows at a time, gradients included.

    The forward computes each chunk's logits, its loss and at once its gradients (softmax - one_hot), then drops
    the chunk: no (N, V) tensor is ever stored for the backward, which only scales the saved gradients. Under
    autocast the matmuls run in bfloat16 as the head would; the softmax, logsumexp and loss are float32 (a bfloat16
    logsumexp over 49k logits loses the small differences the loss is made of), and the weight gradient
    accumulates in float32. The chunks' tensors are reused (``chunks.ChunkLogits``).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (N, H)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # (V, H)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None  # (V,)
        chunks = ChunkLogits(weight, bias, min(chunk_rows, hidden.shape[0]), trains=grad_weight is not None)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows]  # (C, H)
            labels = targets[start : start + chunk_rows]  # (C,)
            grad_logits, logps = softmax_in_place(chunks.logits(rows), labels)  # (C, V) softmax, (C,)
            loss_sum += (-logps).sum()
            grad_logits[torch.arange(len(labels), device=labels.device), labels] -= 1.0  # softmax - onehot
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_rows] = chunks.times_weight(grad_logits)  # (C, H)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del grad_logits  # a fresh (C, V) output (a head with a bias) is made beside no earlier chunk's
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None


def sft_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    return chunked_sft_loss_sum(model, batch, CHUNK_ROWS)


def chunked_sft_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int) -> LossSum:
    """The SFT loss sum with the head and the cross-entropy run ``chunk_rows`` supervised rows at a time."""
    targets = batch["targets"]  # (B, T), already shifted: targets[:, t] is the label of position t's prediction
    keep = targets != IGNORE  # (B, T)
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  **forward_inputs(model, batch))
    head = output_head(model)
    if type(head) is not nn.Linear:  # a head a technique wraps (an adapter on it): it runs as itself, unchunked
        with logits_only_where(model, keep):
            logits = model(**inputs).logits  # (N, V)
        return LossSum(F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum()))
    with hidden_only_where(model, keep) as hidden_rows:
        model(**inputs)
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():  # evaluation: the forward would otherwise compute a trainable head's gradient
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    loss_sum = LinearCrossEntropySum.apply(hidden_rows[0], weight, bias, targets[keep], chunk_rows)
    return LossSum(loss_sum, int(keep.sum()))


def chunked_loss_memory(head: HeadOutput, chunk_rows: int = CHUNK_ROWS) -> tuple[int, ...]:
    """Bytes of the tensors ``LinearCrossEntropySum`` holds at once (see ``Objective.loss_memory``), C = min(chunk_rows,
    N) rows a chunk, CV = C x V cells, at the largest of its moments:

    - a chunk's float32 logits, which become its gradient in place (4·CV), with the gradient's half-precision copy
      the matmuls read (2·CV, under autocast or with a half-precision head); no chunk outlives the next one's head
      output (a float32 product is computed into the previous chunk's, a half one copied into the float32 buffer
      every chunk reuses, and a fresh one is made after the previous chunk is freed);
    - with a trainable head, a chunk's gradient beside its weight-gradient matmul's (V, H) output and, when that
      output is half precision, its float32 copy (adding it to the float32 gradient promotes it);
    and what lives through it: a trainable head's (V, H) float32 gradient (made in the forward, kept for backward),
    the selected (N, H) hidden rows and their gradient (float32 at most). A head a technique wraps runs unchunked:
    the whole logits (``full_logits_memory``)."""
    if not head.plain:
        return full_logits_memory(head)
    cells = min(chunk_rows, head.rows) * head.columns  # CV
    half = head.element_bytes != 4
    chunk = (4 * cells,) + ((2 * cells,) if half else ())
    moments = [chunk]
    kept = (4 * head.rows * head.hidden, 4 * head.rows * head.hidden)  # (N, H) rows and their gradient
    if head.trainable:
        product = head.element_bytes * head.columns * head.hidden  # the (V, H) output of grad_logits.T @ rows
        moments.append((4 * cells, product) + ((4 * head.columns * head.hidden,) if half else ()))
        kept += (4 * head.columns * head.hidden,)  # the head's (V, H) float32 gradient
    return max(moments, key=sum) + kept


def count_supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


OBJECTIVE = Objective(
    name="sft", config_class=SftSettings, loss_sum=sft_loss_sum, count_units=count_supervised_tokens, units="tokens",
    summary="next-token cross-entropy on supervised tokens", perplexity=True, loss_memory=chunked_loss_memory,
)
