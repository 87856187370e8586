"""The output head run ``CHUNK_ROWS`` supervised rows at a time: what SFT's loss (``sft.LinearCrossEntropySum``) and
the per-token log-probs of the preference and policy objectives (``logps.LinearTokenLogps``) share.

A (N, V) logits tensor is the largest activation of a small LM (V ~ 50k-150k): each chunk's (C, V) logits are made,
turned into their softmax in float32 in place, used, and overwritten by the next chunk's.
Not a library's job on this stack: liger-kernel's fused linear cross-entropy is Triton (GPU only), and a CPU run
needs the reused buffers below to keep its peak RSS where the planner puts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of the (N, V) logits computed at once: 256 x 49k float32 is ~48 MiB, small next to the model, and large enough
# that each chunk's two matmuls stay efficient.
CHUNK_ROWS = 256


class ChunkLogits:
    """Each chunk's (C, V) float32 logits, written into tensors every chunk reuses: a head whose product needs no
    cast (its weight, the rows and its output of one dtype, no bias: a frozen head, or any float32 one without
    autocast) computes every chunk into the first chunk's output, and a half-precision output is copied into one
    float32 buffer. The same products bit for bit as a fresh tensor per chunk, which fell under glibc's dynamic mmap
    threshold or above it depending on what the heap had freed before: a fresh (C, V) float32 chunk (48 MiB on
    SmolLM2) faulted its pages in at every chunk (30 ms against 3.6 ms for the copy into reused memory), and a run's
    peak RSS moved by ~100 MiB with the order of earlier allocations (Python's hash seed moved it between two runs of
    one config; docs/choosing.md)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, trains: bool = False) -> None:
        device = weight.device.type
        if not trains and weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
            # A frozen float32 head under autocast (QLoRA's, upcast by PEFT) would be cast to the autocast dtype at
            # every chunk's product (autocast caches only the casts of weights that train): 28M values on SmolLM2.
            # Cast once, as autocast casts it, so every chunk reads one copy and its product is reused.
            low = torch.get_autocast_dtype(device)
            weight, bias = weight.to(low), None if bias is None else bias.to(low)
        self.weight, self.bias, self.rows = weight, bias, rows  # rows: the largest chunk
        self.product: torch.Tensor | None = None  # (C, V) in the head's dtype, reused by every chunk
        self.buffer: torch.Tensor | None = None  # (C, V) float32, when the product is half precision

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """(C, H) hidden rows -> their (C, V) float32 logits (in a tensor the next chunk overwrites)."""
        if self.product is not None:
            logits = torch.mm(rows, self.weight.t(), out=self.product[: len(rows)])  # (C, V), as F.linear computes it
        else:
            logits = F.linear(rows, self.weight, self.bias)  # (C, V)
            if rows.dtype == self.weight.dtype == logits.dtype and self.bias is None:
                self.product = logits
        if logits.dtype == torch.float32:
            return logits
        if self.buffer is None:
            self.buffer = torch.empty((self.rows, logits.shape[1]), dtype=torch.float32, device=logits.device)
        return self.buffer[: len(rows)].copy_(logits)  # (C, V) float32; a fresh half output is freed here

    def times_weight(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """(C, V) float32 gradient of the logits -> (C, H) gradient of the hidden rows, in the head's matmul dtype
        (a half-precision copy of the gradient goes into the reused product, whose logits are spent by now)."""
        half = self.product is not None and self.product.dtype != torch.float32
        cast = self.product[: len(grad_logits)].copy_(grad_logits) if half else grad_logits.to(self.weight.dtype)
        return cast @ self.weight


def softmax_in_place(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) float32 logits -> their softmax (C, V), in place, and the labels' log-probs (C,), in float32 (a
    bfloat16 logsumexp over 49k logits loses the small differences a loss or a log-ratio is made of). One exp pass,
    in place: log Z = peak + log sum exp(logits - peak), whose exps are also the softmax's numerators (logsumexp and
    then exp(logits - log Z) took two exp passes and two fresh (C, V) tensors, the largest non-matmul cost of a CPU
    step after the dropout masks)."""
    target = logits.gather(1, labels[:, None]).squeeze(1)  # (C,)
    peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    exps = logits.sub_(peak).exp_()  # (C, V) exp(logits - peak), in place of the logits
    total = exps.sum(dim=-1, keepdim=True)  # (C, 1)
    logps = -(peak.squeeze(1) + total.log().squeeze(1) - target)  # (C,) -(log Z - z_y): SFT's loss terms, negated
    return exps.div_(total), logps
