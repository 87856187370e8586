"""LoHa: low-rank Hadamard product adapters (Hyeon-Woo et al. 2022, "FedPara", https://arxiv.org/abs/2108.06098;
as used in LyCORIS, https://arxiv.org/abs/2309.14859).

For a frozen weight W0 (d_out, d_in), LoHa learns two low-rank pairs and multiplies them element-wise:
    ΔW = (alpha / r) * (B1 A1) ⊙ (B2 A2)      B_i: (d_out, r), A_i: (r, d_in)
so its rank can reach r^2 for 2 r (d_in + d_out) parameters per layer. One pair starts at zero, so training starts
from the base model; ΔW folds into W0, so the merge is exact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.techniques.base import (NOT_QUANTIZED, RunContext, Technique, peft_disabled_view, peft_task_type,
                                      save_peft_adapter)
from tunelab.techniques.lora import LayeredTargets
from tunelab.techniques.peft_adapters import wrap_checked


class LohaSettings(LayeredTargets):
    name: Literal["loha"] = Field("loha", description="Low-rank Hadamard product adapters (PEFT LoHa).")
    r: int = Field(8, gt=0, description="Rank of each of the two factor pairs.")
    alpha: float = Field(8, gt=0, description="Scale numerator: ΔW is multiplied by alpha / r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the rank dimension during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a whole adapted layer in a step.")


def prepare(model: nn.Module, settings: LohaSettings, context: RunContext | None = None) -> nn.Module:
    from peft import LoHaConfig

    config = LoHaConfig(r=settings.r, alpha=settings.alpha, rank_dropout=settings.rank_dropout,
                        module_dropout=settings.module_dropout, task_type=peft_task_type(context), **settings.peft_targets())
    return wrap_checked(model, settings, config)


TECHNIQUE = Technique(
    name="loha",
    config_class=LohaSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("LOHA",),  # PEFT's peft_type
    default_learning_rate=2e-4,
    summary="Hadamard product of two low-rank updates (higher rank per parameter, mergeable)",
    refuses={"quantized_base": NOT_QUANTIZED},
)
