"""benchmarks/ab_step.py variants: PEFT's LoRA forward, base(x) + B(A(dropout(x))) * s, against a fused one that
scales on the rank-r side and folds the add into the second matmul, addmm(base(x), s * A(dropout(x)), B^T). The
fused one rounds differently in bfloat16 (the sum is rounded once), so it would need benchmarks/bf16_quality.py
before it could ship; this file only measures whether it is worth that."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear

VARIANTS = ["peft", "fused"]


class FusedLoraLinear(LoraLinear):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(names) != 1 \
                or names[0] in self.lora_variant or names[0] not in self.lora_A:
            return super().forward(x, *args, **kwargs)
        name = names[0]
        rank = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]  # (B, T, r)
        base = self.base_layer(x)  # (B, T, out)
        out = torch.addmm(base.reshape(-1, base.shape[-1]), rank.reshape(-1, rank.shape[-1]),
                          self.lora_B[name].weight.t())  # (B*T, out)
        return out.view(base.shape)


def use(name: str, model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.__class__ = FusedLoraLinear if name == "fused" else LoraLinear
