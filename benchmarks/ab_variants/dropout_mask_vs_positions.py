"""benchmarks/ab_step.py variants: the CPU dropout as it was before (a uint8 mask of every element, four elements per
64-bit draw, p rounded to a multiple of 1/32768, applied with one ``addcmul``) against the shipped one (the dropped
positions as geometric gaps, ``dropout.py``). Different draws, the same distribution up to the old rounding: only
the time is compared."""

from __future__ import annotations

from typing import Any

import torch

from tunelab import dropout

VARIANTS = ["mask", "positions"]
SHIPPED = dropout.CpuDropout.forward
FIELD_VALUES = 1 << 15


class _MaskScaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(torch.zeros((), dtype=x.dtype), x, keep, value=scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.addcmul(torch.zeros((), dtype=grad.dtype), grad, keep, value=ctx.scale), None, None


def masked_forward(self: dropout.CpuDropout, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.p == 0:
        return x
    count = x.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_()  # four 16-bit fields per draw
    fields = draws.view(torch.int16)[:count].view(x.shape)
    dropped = round(self.p * FIELD_VALUES)
    keep = ((fields & (FIELD_VALUES - 1)) >= dropped).view(torch.uint8)
    return _MaskScaled.apply(x, keep, FIELD_VALUES / (FIELD_VALUES - dropped))


def use(name: str, model: torch.nn.Module) -> None:
    dropout.CpuDropout.forward = masked_forward if name == "mask" else SHIPPED
