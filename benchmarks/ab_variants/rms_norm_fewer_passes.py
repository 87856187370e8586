"""benchmarks/ab_step.py variants: transformers' Llama RMSNorm (a float32 island, autograd's backward) against
``norms.py``'s function of the same values in fewer passes (what a CPU run uses)."""

from __future__ import annotations

import torch

from tunelab.norms import _FewerPasses, use_cpu_rms_norm

VARIANTS = ["transformers", "fewer_passes"]


def use(name: str, model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _FewerPasses):  # back to transformers' class (the swapped one's other base)
            module.__class__ = type(module).__mro__[2]
    if name == "fewer_passes":
        use_cpu_rms_norm(model)
