"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

One pair of frozen random matrices A (r, d_in), B (d_out, r) is shared by every adapted layer; each layer learns
only two scaling vectors:
    ΔW = Λ_b B Λ_d A        Λ_d = diag(d) (r,), Λ_b = diag(b) (d_out,)
b starts at zero, so training starts from the base model. Trainable parameters per layer: r + d_out, far fewer
than LoRA's r (d_in + d_out), so VeRA affords a large r (256 is common). ΔW folds into W0: the merge is exact.
The shared random matrices are saved with the adapter (``save_projection``), so reloading does not depend on
regenerating them from a seed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from tunelab.techniques.base import (NOT_QUANTIZED, RunContext, Technique, peft_disabled_view, peft_task_type,
                                      save_peft_adapter)
from tunelab.techniques.lora import LayeredTargets
from tunelab.techniques.peft_adapters import wrap_checked


class VeraSettings(LayeredTargets):
    name: Literal["vera"] = Field("vera", description="Shared frozen random projections with learned scaling vectors (PEFT VeRA).")
    r: int = Field(256, gt=0, description="Rank of the shared random projections; large ranks cost few parameters.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the vector d.")
    projection_seed: int = Field(0, description="Seed of the shared random projections.")


def prepare(model: nn.Module, settings: VeraSettings, context: RunContext | None = None) -> nn.Module:
    from peft import VeraConfig

    config = VeraConfig(r=settings.r, vera_dropout=settings.dropout, d_initial=settings.d_initial,
                        projection_prng_key=settings.projection_seed, save_projection=True, task_type=peft_task_type(context),
                        **settings.peft_targets())
    return wrap_checked(model, settings, config)


TECHNIQUE = Technique(
    name="vera",
    config_class=VeraSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("VERA",),  # PEFT's peft_type
    default_learning_rate=4e-3,
    summary="shared random projections, per-layer scaling vectors (fewest parameters of the LoRA family, mergeable)",
    refuses={"quantized_base": NOT_QUANTIZED},
)
