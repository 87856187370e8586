"""Dropout with a cheaper mask on a CPU.

A profile of a bf16 LoRA step on a CPU (SmolLM2, 4 x 256 tokens, ``benchmarks/profile_step.py``) put 11% of its
time in ``aten::bernoulli_``: the masks of the adapters' input dropout. torch's CPU ``bernoulli_`` draws one 32-bit
number from its Mersenne Twister per element and converts it to a float before comparing; the draws, not the
arithmetic, are the cost. Here one 64-bit draw makes the mask of four elements: it is cut into four 16-bit fields and
the low 15 bits of each are compared with the threshold. So the drop probability is ``p`` rounded to a multiple of
1/32768 (0.05 -> 0.0499878), and the kept elements are scaled by 1/(1 - that rounded p), so the layer's expected
output is its input, as with ``nn.Dropout``. The draws come from torch's default generator, whose state every
checkpoint saves, so a resumed run draws the same masks as an uninterrupted one.

The mask is applied as uint8 0s and 1s (the bool mask's own bytes, viewed as uint8), with one ``addcmul``: on a
CPU an elementwise op with a bool operand (``torch.where``, ``masked_fill``, ``mul``) took 0.6-1.1 ms per
(4, 256, 576) bfloat16 tensor at one thread, and ``addcmul`` with the uint8 view 0.25 ms (0.16 ms with a bfloat16
mask, which would double the saved mask's memory, and which the memory plan would not count: it probes with
``nn.Dropout``'s one-byte mask). The output and the gradient are bit for bit what ``torch.where(keep, x, 0) * scale``
gives (x * 1 and x * 0 are exact, and the scale is applied once, in float32, as before).

No library offers this on a CPU; on other devices (CUDA's fused dropout is already cheap) the module is plain
``nn.Dropout``.
"""

from __future__ import annotations

import torch
from torch import nn

FIELD_VALUES = 1 << 15  # the values a 15-bit field takes: the resolution of the drop probability


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A uint8 mask of ``shape``: 1 with probability 1 - round(p * 32768) / 32768, else 0, four elements per 64-bit
    draw."""
    count = shape.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_()  # (ceil(n / 4),), 63 random bits each
    fields = draws.view(torch.int16)[:count].view(shape)  # four 16-bit fields per draw; the top one has 15 random bits
    # the bool result's bytes are 0 and 1: viewed as uint8 (no copy) it is an operand elementwise ops take fast
    return ((fields & (FIELD_VALUES - 1)) >= dropped_fields(p)).view(torch.uint8)


def dropped_fields(p: float) -> int:
    """How many of the 32768 field values drop an element."""
    return round(p * FIELD_VALUES)


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale in one pass (``keep``: the 0/1 uint8 mask of x's shape), in x's dtype. addcmul computes
    0 + scale * x * keep in float32 and rounds once, so a kept element is round(x * scale), as before."""
    return torch.addcmul(torch.zeros((), dtype=x.dtype), x, keep, value=scale)


class _KeepScaled(torch.autograd.Function):
    """x * keep / (1 - p), with the same product for the gradient; only the mask is saved (as nn.Dropout does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        (keep,) = ctx.saved_tensors
        return masked_scale(grad, keep, ctx.scale), None, None


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn four elements per 64-bit number on a CPU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        dropped = dropped_fields(self.p)
        if dropped >= FIELD_VALUES:
            return torch.zeros_like(x)
        scale = FIELD_VALUES / (FIELD_VALUES - dropped)  # 1 / (1 - the rounded p)
        return _KeepScaled.apply(x, keep_mask(x.shape, self.p), scale)


def use_cpu_dropout(model: nn.Module) -> int:
    """Turn every ``nn.Dropout`` of ``model`` into a ``CpuDropout`` in place (the class is swapped, so the modules
    PEFT's layers hold stay the same objects). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = CpuDropout
            switched += 1
    return switched
