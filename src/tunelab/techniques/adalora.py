"""AdaLoRA: LoRA whose rank budget moves to where it matters during training (Zhang et al. 2023, "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2303.10512).

Each adapted weight gets an SVD-shaped update
    ΔW = P Λ Q        P: (d_out, r), Λ = diag(λ) (r,), Q: (r, d_in)
and every optimizer step scores each singular triplet (|λ_i ∂L/∂λ_i|-style sensitivity, smoothed with EMAs
beta1/beta2). Between steps `tinit` and `total - tfinal` the total rank budget shrinks on a cubic schedule from
init_r to target_r per layer, and the lowest-scoring triplets are masked (λ_i = 0); the last `tfinal` steps keep
the final allocation. That reallocation is this technique's per-step hook (PEFT's ``update_and_allocate``).
Pitfall: PEFT adds AdaLoRA's orthogonality regulariser only when the model computes its own loss from labels;
tunelab computes the loss itself, so the regulariser is not applied (orth_reg_weight is not offered).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from tunelab.techniques.base import NOT_QUANTIZED, RunContext, Technique, save_peft_adapter
from tunelab.techniques.lora import LayeredTargets
from tunelab.techniques.peft_adapters import wrap_checked

SKELETON_STEPS = 1000  # a stand-in step count when there is no run (the fit check, parameter counts)


class AdaloraSettings(LayeredTargets):
    name: Literal["adalora"] = Field("adalora", description="LoRA with a rank budget reallocated during training (PEFT AdaLoRA).")
    init_r: int = Field(12, gt=0, description="Starting rank of every adapted layer.")
    target_r: int = Field(8, gt=0, description="Average rank per layer at the end of the budget schedule.")
    alpha: float = Field(32, gt=0, description="Scale numerator of the update.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps before any rank is pruned (tinit).")
    final_ratio: float = Field(0.2, ge=0, lt=1, description="Share of the last steps that keep the final ranks (tfinal).")
    reallocate_every: int = Field(1, gt=0, description="Steps between two budget reallocations (deltaT).")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity scores.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the score uncertainty.")

    @model_validator(mode="after")
    def _budget_shrinks(self) -> "AdaloraSettings":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): the budget only shrinks")
        if self.warmup_ratio + self.final_ratio >= 1:
            raise ValueError("warmup_ratio + final_ratio must be below 1: no steps would be left to reallocate")
        return self


def schedule(settings: AdaloraSettings, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps; PEFT needs tinit < total - tfinal."""
    tinit, tfinal = int(settings.warmup_ratio * total_steps), int(settings.final_ratio * total_steps)
    if tinit >= total_steps - tfinal:
        tinit, tfinal = 0, 0
    return tinit, tfinal


def prepare(model: nn.Module, settings: AdaloraSettings, context: RunContext | None = None) -> nn.Module:
    from peft import AdaLoraConfig

    total = (context.total_steps if context else None) or SKELETON_STEPS
    tinit, tfinal = schedule(settings, total)
    config = AdaLoraConfig(
        init_r=settings.init_r, target_r=settings.target_r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        tinit=tinit, tfinal=tfinal, deltaT=settings.reallocate_every, beta1=settings.beta1, beta2=settings.beta2,
        total_step=total, task_type="CAUSAL_LM", **settings.peft_targets(),
    )
    return wrap_checked(model, settings, config)


def reallocate(model: nn.Module, settings: AdaloraSettings, step: int) -> None:
    """Score every singular triplet from this step's gradients and mask the weakest (after the optimizer update,
    before the gradients are cleared, as PEFT requires)."""
    model.base_model.update_and_allocate(step)


TECHNIQUE = Technique(
    name="adalora",
    config_class=AdaloraSettings,
    prepare=prepare,
    save=save_peft_adapter,
    result_dir_name="adapter",
    default_learning_rate=5e-4,
    summary="LoRA with its rank budget reallocated to the layers that need it (per-step hook, mergeable)",
    refuses={"quantized_base": NOT_QUANTIZED},
    on_step=reallocate,
)
