"""Per-token log-probs of the supervised targets with the output head run in chunks: what the preference objectives
(DPO, IPO, KTO, ORPO, SimPO, their reference passes and pair ranking) and the policy-gradient ones (GRPO, PPO, their
scoring passes) read, without a (N, V) logits tensor.

For the N supervised rows h_n (N, H) of a plain head z_n = W h_n + b (W: (V, H)):

    log p(y_n) = z_n[y_n] - logsumexp_v z_n[v]
    d log p(y_n) / d z_n = onehot(y_n) - softmax(z_n)
    d log p(y_n) / d h_n = (onehot(y_n) - softmax(z_n)) W
    entropy_n = - sum_v softmax(z_n)[v] log softmax(z_n)[v]          (a figure: no gradient)

``LinearTokenLogps`` computes them ``chunk_rows`` rows at a time (the rows a chunk makes: C x V float32, ~48 MiB on
SmolLM2 with C = 256). The upstream gradient is per token here, not the scalar of SFT's ``LinearCrossEntropySum``:
with a frozen head (every technique but full fine-tuning) d log p / d h_n (N, H) is computed in the forward, chunk by
chunk, and the backward only scales each row by its token's upstream gradient; a trainable head's weight gradient
sums g_n (onehot - softmax_n) h_n over tokens, which needs g_n, so its backward runs the chunks again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data import IGNORE
from tunelab.objectives.base import Batch, HeadOutput, full_logits_memory, scoring_pass_memory
from tunelab.objectives.chunks import CHUNK_ROWS, ChunkLogits, softmax_in_place
from tunelab.objectives.sft import hidden_only_where, logits_only_where, output_head
from tunelab.techniques.base import forward_inputs

def entropy_in_place(probs: torch.Tensor) -> torch.Tensor:
    """-sum_v p log p (C,) of a (C, V) softmax, which it overwrites (p log p, in place: no (C, V) temporary); a p
    that underflowed to 0 adds 0, as its limit."""
    return -probs.xlogy_(probs).sum(dim=-1)


class LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden[n] @ weight.T + bias)[targets[n]] (N,), ``chunk_rows`` rows at a time, and with
    ``with_entropy`` each row's entropy (N,), without gradient (else an empty tensor).

    No (N, V) tensor is made. Under autocast the head's matmuls run in bfloat16 as the head would; the softmax,
    logsumexp, log-probs and entropy are float32. With a frozen head the forward stores d(-log p)/d hidden (N, H),
    in the hidden rows' dtype, which the backward scales by each token's upstream gradient (negated); a trainable
    head saves only its inputs and the backward recomputes each chunk under the forward's autocast state.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                targets: torch.Tensor, chunk_rows: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        head_trains = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        # (N, H) d(-log p)/d hidden of a frozen head: (softmax - onehot) W, made here, only scaled in backward
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] and not head_trains else None
        chunks = ChunkLogits(weight, bias, min(chunk_rows, hidden.shape[0]), trains=head_trains)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        entropy = torch.empty(hidden.shape[0] if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            labels = targets[part]  # (C,)
            probs, logps[part] = softmax_in_place(chunks.logits(hidden[part]), labels)  # (C, V), (C,)
            if grad_hidden is not None:
                picked = torch.arange(len(labels), device=labels.device)
                kept = probs[picked, labels]  # (C,) put back after: the entropy reads the softmax
                probs[picked, labels] -= 1.0  # (C, V) softmax - onehot = d(-log p)/d logits
                grad_hidden[part] = chunks.times_weight(probs)  # (C, H)
                probs[picked, labels] = kept
            if with_entropy:
                entropy[part] = entropy_in_place(probs)
            del probs  # a fresh (C, V) output (a head with a bias) is made beside no earlier chunk's
        ctx.mark_non_differentiable(entropy)
        ctx.chunk_rows, ctx.precomputed = chunk_rows, grad_hidden is not None
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
        elif head_trains:
            ctx.save_for_backward(hidden, weight, bias, targets)
            device = hidden.device.type
            ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, grad_entropy: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's
        if ctx.precomputed:
            (grad_hidden,) = ctx.saved_tensors
            return (grad_hidden * -grad_logps[:, None]).to(grad_hidden.dtype), None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            grads = head_gradients(hidden, weight, bias, targets, grad_logps, ctx.chunk_rows, ctx.needs_input_grad)
        return grads + (None, None, None)


def head_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   grad_logps: torch.Tensor, chunk_rows: int, needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """The gradients of hidden (N, H), weight (V, H) and bias (V,) (None where not needed) from the upstream
    gradient of each token's log-prob (N,), the chunks' logits computed again: d/dz_n = -g_n (softmax_n - onehot)."""
    grad_hidden = torch.empty_like(hidden) if needs[0] else None  # (N, H)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None  # (V, H)
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None  # (V,)
    chunks = ChunkLogits(weight, bias, min(chunk_rows, hidden.shape[0]), trains=True)
    for start in range(0, hidden.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        rows, labels = hidden[part], targets[part]  # (C, H), (C,)
        probs, _ = softmax_in_place(chunks.logits(rows), labels)  # (C, V)
        probs[torch.arange(len(labels), device=labels.device), labels] -= 1.0
        grad_logits = probs.mul_(-grad_logps[part, None].float())  # (C, V) dL/dz
        if grad_hidden is not None:
            grad_hidden[part] = chunks.times_weight(grad_logits)
        if grad_weight is not None:
            grad_weight += grad_logits.T @ rows.float()
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        del probs, grad_logits  # as in the forward: no two chunks' (C, V) at once
    return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def head_token_logps(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LinearTokenLogps`` of a plain head on the (N, H) hidden rows, CHUNK_ROWS at a time: log-probs (N,) and the
    entropy (N,) or None. Without gradients (a reference or scoring pass) only those are computed."""
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():  # the forward would otherwise make a trainable head's gradient inputs
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    logps, entropy = LinearTokenLogps.apply(hidden, weight, bias, targets, CHUNK_ROWS, with_entropy)
    return logps, entropy if with_entropy else None


def logits_token_logps(logits: torch.Tensor, targets: torch.Tensor,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same from whole (N, V) logits (a head a technique wraps runs as itself, unchunked)."""
    logits = logits.float()  # (N, V)
    logps = -F.cross_entropy(logits, targets, reduction="none")  # (N,)
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        log_probs = F.log_softmax(logits.detach(), dim=-1)  # (N, V)
        return logps, -(log_probs.exp() * log_probs).sum(dim=-1)


def supervised_token_logps(model: nn.Module, batch: Batch,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (N,) of each supervised target, in the order of ``targets != IGNORE``, and with ``with_entropy``
    each of those positions' entropy (N,), without gradient (else None). A plain head runs in chunks; a head a
    technique wraps (an adapter on it) as itself, on the supervised rows only (N, V)."""
    targets = batch["targets"]  # (R, T), shifted
    keep = targets != IGNORE  # (R, T)
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  **forward_inputs(model, batch))
    head = output_head(model)
    if type(head) is not nn.Linear:
        with logits_only_where(model, keep):
            logits = model(**inputs).logits  # (N, V)
        return logits_token_logps(logits, targets[keep], with_entropy)
    with hidden_only_where(model, keep) as hidden_rows:
        model(**inputs)
    return head_token_logps(head, hidden_rows[0], targets[keep], with_entropy)


# ---------------------------------------------------------------- what the planner reads


def chunked_logps_memory(head: HeadOutput, chunk_rows: int = CHUNK_ROWS) -> tuple[int, ...]:
    """Bytes of the tensors ``LinearTokenLogps`` holds at once (``Objective.loss_memory``), C = min(chunk_rows, N)
    rows a chunk, CV = C x V cells, at the largest of its moments (the entropy, in place, adds none):

    - a chunk: its float32 logits, which become its softmax and gradient in place (4·CV), and the head's
      half-precision output or the gradient's half-precision copy (2·CV, under autocast or with a half head);
    - with a trainable head, its backward's chunk beside its weight-gradient matmul's (V, H) output and, when that
      output is half precision, its float32 copy, and the weight's half-precision copy autocast makes again there;
    and what lives through it: the selected (N, H) hidden rows and d log p / d hidden (float32 at most), the (N,)
    log-probs (and entropy), a trainable head's (V, H) float32 gradient. A head a technique wraps runs unchunked:
    the whole logits (``logits_token_logps``, as ``full_logits_memory`` counts them)."""
    cells = min(chunk_rows, head.rows) * head.columns  # CV
    half = head.element_bytes != 4
    moments = [(4 * cells,) + ((2 * cells,) if half else ())]
    kept = (4 * head.rows * head.hidden, 4 * head.rows * head.hidden, 8 * head.rows)  # rows, their gradient, (N,) x 2
    if head.trainable:
        matrix = head.columns * head.hidden  # (V, H)
        moments.append((4 * cells, head.element_bytes * matrix) + ((4 * matrix, 2 * matrix) if half else ()))
        kept += (4 * matrix,)  # the head's (V, H) float32 gradient
    return max(moments, key=sum) + kept


def logps_memory(head: HeadOutput) -> tuple[int, ...]:
    """The DPO family's loss (``Objective.loss_memory``): the policy's chunked log-probs (a live reference's pass,
    without gradients, runs the same chunks after them), or, for a head a technique wraps, the whole logits."""
    return chunked_logps_memory(head) if head.plain else full_logits_memory(head)


def scoring_memory(head: HeadOutput) -> tuple[int, ...]:
    """A pass that scores the completion tokens without gradients (a rollout's or reference's): one chunk, its
    half-precision output, the (N, H) rows and the (N,) log-probs; a head a technique wraps: ``scoring_pass_memory``."""
    if not head.plain:
        return scoring_pass_memory(head)
    cells = min(CHUNK_ROWS, head.rows) * head.columns
    return (4 * cells,) + ((2 * cells,) if head.element_bytes != 4 else ()) + (4 * head.rows * head.hidden, 4 * head.rows)
