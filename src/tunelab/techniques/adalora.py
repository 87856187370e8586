"""AdaLoRA: LoRA whose rank budget moves to where it matters during training (Zhang et al. 2023, "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2303.10512).

Each adapted weight gets an SVD-shaped update
    ΔW = P Λ Q        P: (d_out, r), Λ = diag(λ) (r,), Q: (r, d_in)
and every optimizer step scores each singular triplet (|λ_i ∂L/∂λ_i|-style sensitivity, smoothed with EMAs
beta1/beta2). Between steps `tinit` and `total - tfinal` the total rank budget shrinks on a cubic schedule from
init_r to target_r per layer, and the lowest-scoring triplets are masked (λ_i = 0); the last `tfinal` steps keep
the final allocation. That reallocation is this technique's per-step hook (PEFT's ``update_and_allocate``).

P and Q are kept near-orthogonal by a penalty added to the loss (the paper's eq. 4):
    R(P, Q) = mean over the adapted layers' A and B of ||PᵀP − I||_F and ||QQᵀ − I||_F,   L + orth_reg_weight · R
PEFT adds it inside its forward only when the model computes its own loss from labels; tunelab computes the
loss itself, so the penalty is this technique's ``penalty`` hook, added once per optimizer step.
The allocator's statistics (two EMAs per adapter tensor) and the allocation so far live outside the weights;
this technique's ``state`` puts them in each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tunelab.techniques.base import (NOT_QUANTIZED, RunContext, Technique, TechniqueState, peft_disabled_view,
                                      peft_task_type, save_peft_adapter)
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
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty on P and Q (0: off).")

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
        orth_reg_weight=settings.orth_reg_weight, total_step=total, task_type=peft_task_type(context), **settings.peft_targets(),
    )
    return wrap_checked(model, settings, config)


def reallocate(model: nn.Module, settings: AdaloraSettings, step: int) -> None:
    """Score every singular triplet from this step's gradients and mask the weakest (after the optimizer update,
    before the gradients are cleared, as PEFT requires)."""
    allocator = model.base_model.rankallocator
    if not allocator.exp_avg_ipt:
        # PEFT scores the triplets only on steps before the final allocation, so a run whose first step is that
        # allocation (max_steps 1) would rank triplets it never scored (a KeyError inside PEFT): score this step first.
        allocator.update_ipt(model.base_model.model)  # named as PEFT names them (inside its wrapper)
    model.base_model.update_and_allocate(step)


def orthogonality_penalty(model: nn.Module, settings: AdaloraSettings) -> torch.Tensor | None:
    """orth_reg_weight · R(P, Q) (see the module docstring), with the same terms and averaging as PEFT's forward
    (a test pins the two together). None when the weight is 0."""
    if settings.orth_reg_weight == 0:
        return None
    terms = []
    for name, param in model.named_parameters():
        if not param.requires_grad or not (".lora_A." in name or ".lora_B." in name):
            continue
        gram = param @ param.T if ".lora_A." in name else param.T @ param  # (r, r): Q Qᵀ for A, Pᵀ P for B
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)))
    return settings.orth_reg_weight * torch.stack(terms).mean() if terms else None


STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the allocator's per-tensor scores and their two EMAs


def save_allocator(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The rank allocator's statistics (tensors named ``<statistic>/<parameter>``) and the allocation so far."""
    base = model.base_model
    allocator = base.rankallocator
    tensors = {f"{stat}/{name}": value.detach().clone()
               for stat in STATISTICS for name, value in getattr(allocator, stat).items()}
    pattern = base.peft_config[base.trainable_adapter_name].rank_pattern
    return tensors, {"rank_pattern": {k: [bool(x) for x in v] for k, v in (pattern or {}).items()}}


def load_allocator(model: nn.Module, tensors: dict[str, torch.Tensor], extras: dict) -> None:
    base = model.base_model
    allocator = base.rankallocator
    allocator.reset_ipt()
    for key, value in tensors.items():
        stat, name = key.split("/", 1)
        getattr(allocator, stat)[name] = value
    base.peft_config[base.trainable_adapter_name].rank_pattern = extras.get("rank_pattern") or None


TECHNIQUE = Technique(
    name="adalora",
    config_class=AdaloraSettings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("ADALORA",),  # PEFT's peft_type
    default_learning_rate=5e-4,
    summary="LoRA with its rank budget reallocated to the layers that need it (per-step hook, mergeable)",
    refuses={"quantized_base": NOT_QUANTIZED,
             "fsdp": "its rank allocation scores whole adapter matrices and their gradients on each process, which "
                     "fsdp splits into shards; use training.distributed: ddp"},
    on_step=reallocate,
    penalty=orthogonality_penalty,
    state=TechniqueState(save_allocator, load_allocator),
)
