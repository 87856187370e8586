"""benchmarks/ab_step.py variants: the CPU dropout with the bool mask it used before (``torch.where`` and a scalar
multiply, forward and backward) against the shipped one (the same bool mask viewed as uint8 0/1, applied with one
``addcmul``). Same draws, same outputs bit for bit: only the time differs."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.training import dropout

VARIANTS = ["bool-mask", "uint8-mask"]
SHIPPED = (dropout.keep_mask, dropout._KeepScaled)


def bool_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    count = shape.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_()
    fields = draws.view(torch.int16)[:count].view(shape)
    return (fields & (dropout.FIELD_VALUES - 1)) >= dropout.dropped_fields(p)


class BoolKeepScaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def use(name: str, model: torch.nn.Module) -> None:
    # CpuDropout looks both up in its module at every call
    dropout.keep_mask, dropout._KeepScaled = (bool_keep_mask, BoolKeepScaled) if name == "bool-mask" else SHIPPED
