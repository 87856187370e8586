"""LoKr: Kronecker product adapters (Edalati et al. 2022, "KronA", https://arxiv.org/abs/2212.10650; as used in
LyCORIS, https://arxiv.org/abs/2309.14859).

For a frozen weight W0 (d_out, d_in) with d_out = p q and d_in = s t, LoKr learns
    ΔW = (alpha / r) * C ⊗ (B A)       C: (p, s), B: (q, r), A: (r, t)
a full-rank-capable update from very few parameters. One factor starts at zero, so training starts from the base
model; ΔW folds into W0, so the merge is exact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.techniques.base import (NOT_QUANTIZED, RunContext, Technique, peft_disabled_view, peft_task_type,
                                      save_peft_adapter)
from tunelab.techniques.lora import LayeredTargets
from tunelab.techniques.peft_adapters import wrap_checked


class LokrSettings(LayeredTargets):
    name: Literal["lokr"] = Field("lokr", description="Kronecker product adapters (PEFT LoKr).")
    r: int = Field(8, gt=0, description="Rank of the low-rank factor B A.")
    alpha: float = Field(8, gt=0, description="Scale numerator: ΔW is multiplied by alpha / r.")
    decompose_factor: int = Field(-1, description="Size of the Kronecker factor C; -1 picks the most balanced split.")
    decompose_both: bool = Field(False, description="Also make C low-rank (fewer parameters on large layers).")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the rank dimension during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a whole adapted layer in a step.")


def prepare(model: nn.Module, settings: LokrSettings, context: RunContext | None = None) -> nn.Module:
    from peft import LoKrConfig

    config = LoKrConfig(r=settings.r, alpha=settings.alpha, decompose_factor=settings.decompose_factor,
                        decompose_both=settings.decompose_both, rank_dropout=settings.rank_dropout,
                        module_dropout=settings.module_dropout, task_type=peft_task_type(context), **settings.peft_targets())
    return wrap_checked(model, settings, config)


TECHNIQUE = Technique(
    name="lokr",
    config_class=LokrSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("LOKR",),  # PEFT's peft_type
    default_learning_rate=2e-4,
    summary="Kronecker product adapters (very few parameters, mergeable)",
    refuses={"quantized_base": NOT_QUANTIZED},
)
