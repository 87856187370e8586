"""Dropout that draws the positions it drops, not a mask, on a CPU.

torch's CPU ``nn.Dropout`` draws one 32-bit number from its Mersenne Twister per element (``bernoulli_``). An
adapter's input dropout drops few elements (LoRA's default p is 0.05), and a LoRA step of SmolLM2 on 4 x 256 tokens
draws 120 masks of 590k elements: in a profile the draws were the largest part of the 13-15% of a step that the
dropout cost (docs/performance.md).

The dropped positions of independent Bernoulli(p) draws, in order, are the running sums of independent geometric
gaps, P(gap = k) = (1 - p)^(k - 1) p for k >= 1. So the layer draws about n p gaps instead of n elements:

    gap = 1 + floor(log(u) / log(1 - p)),   u = (r + 1) / 2^53 uniform on (0, 1], r from 53 random bits

(P(gap > k) = P(u <= (1 - p)^k) = (1 - p)^k), and each element is dropped independently with probability exactly p,
up to u's resolution of 2^-53. The output is x / (1 - p) with those positions set to 0 (one multiplication,
rounded once, then ``index_fill_``), and the gradient is the same. It saves the positions: int64, 8 p bytes per
element (0.4 at p = 0.05) against ``nn.Dropout``'s one-byte mask; the memory plan's probe of a CPU run swaps it in
too and counts n p of them (``plan/planner.py``). At p = 0.05 on (4, 256, 576) bfloat16 at one thread the gaps take
about 0.25 ms, where the mask of four elements per 64-bit draw that this module used before took 0.85 ms.

The draws come from torch's default generator, whose state every checkpoint saves, so a resumed run drops the same
positions as an uninterrupted one. No library draws a sparse dropout mask on a CPU; on other devices (CUDA's fused
dropout is already cheap) the module is plain ``nn.Dropout``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

UNIFORM_BITS = 53  # the bits of u: a float64 holds r + 1 <= 2^53 exactly
LOW_BITS = (1 << UNIFORM_BITS) - 1


def drop_positions(count: int, p: float) -> torch.Tensor:
    """The sorted flat indices in [0, count) that independent Bernoulli(p) draws drop (int64; see the module doc)."""
    per_log = -1.0 / math.log1p(-p)  # gap - 1 = floor(log(u) * (1 / log(1 - p))), written with a positive factor
    offset = UNIFORM_BITS * math.log(2.0) * per_log  # log(u) = log(r + 1) - 53 log 2
    parts: list[torch.Tensor] = []
    start = 0  # the first position the next gaps count from
    while True:
        drawn = gaps_to_draw(count - start, p)
        bits = torch.empty(drawn, dtype=torch.int64).random_().bitwise_and_(LOW_BITS).add_(1)  # r + 1: (drawn,)
        # log(u) / log(1 - p) >= 0, so the cast's truncation is the floor
        gaps = torch.log(bits.to(torch.float64)).mul_(-per_log).add_(offset).to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(start - 1)  # (drawn,), increasing
        inside = int(torch.searchsorted(positions, count))
        parts.append(positions[:inside])
        if inside < drawn:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        start = int(positions[-1]) + 1


def gaps_to_draw(left: int, p: float) -> int:
    """How many gaps to draw for ``left`` more elements: enough to pass the end but for an 8-sigma shortfall, which
    ``drop_positions`` then covers with another round. It depends only on (left, p), so the generator moves the same
    way in a resumed run."""
    return math.ceil(left * p + 8 * math.sqrt(left * p) + 16)


def scaled_without(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """x * scale (rounded once, in float32 for a half-precision x), contiguous, with the flat ``positions`` set to 0."""
    out = (x * scale).contiguous()
    out.view(-1).index_fill_(0, positions, 0)
    return out


class _DropAt(torch.autograd.Function):
    """x * keep / (1 - p) with keep 0 at ``positions``; the gradient the same. Only the positions are saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return scaled_without(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        (positions,) = ctx.saved_tensors
        return scaled_without(grad, positions, ctx.scale), None, None


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` that draws the positions it drops on a CPU (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type not in ("cpu", "meta") or self.inplace:
            return super().forward(x)  # p = 1: nn.Dropout's zeros
        if x.is_meta:  # the memory plan's probe: no draws on meta tensors; the expected number of positions
            positions = torch.empty(round(x.numel() * self.p), dtype=torch.int64, device="meta")
        else:
            positions = drop_positions(x.numel(), self.p)
        return _DropAt.apply(x, positions, 1.0 / (1.0 - self.p))


def use_cpu_dropout(model: nn.Module) -> int:
    """Turn every ``nn.Dropout`` of ``model`` into a ``CpuDropout`` in place (the class is swapped, so the modules
    PEFT's layers hold stay the same objects). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = CpuDropout
            switched += 1
    return switched
