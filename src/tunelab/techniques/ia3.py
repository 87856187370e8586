"""IA3: learned rescaling of activations (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning", https://arxiv.org/abs/2205.05638).

For a frozen linear layer W0 (d_out, d_in), IA3 learns a vector l:
    attention keys/values:   h = l ⊙ (W0 x)           l: (d_out,)
    feed-forward (down_proj): h = W0 (l ⊙ x)           l: (d_in,)
l starts at ones, so training starts from the base model. Only the vectors train (about 0.01-0.1% of the
model), and l ⊙ W0 folds into the weight, so the merge is exact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from tunelab.techniques.base import (NOT_QUANTIZED, RunContext, Technique, peft_disabled_view, peft_task_type,
                                      save_peft_adapter)
from tunelab.techniques.lora import AdapterTargets
from tunelab.techniques.peft_adapters import wrap_checked


class Ia3Settings(AdapterTargets):
    name: Literal["ia3"] = Field("ia3", description="Learned per-channel scaling vectors (PEFT IA3).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="Linear layers to rescale (the paper's keys, values and feed-forward output by default).",
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Those of target_modules that are feed-forward layers: their input is scaled, not their output.",
    )

    @model_validator(mode="after")
    def _feedforward_is_a_target(self) -> "Ia3Settings":
        if self.target_modules != "all-linear":
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"feedforward_modules {extra} must also be in target_modules")
        return self


def prepare(model: nn.Module, settings: Ia3Settings, context: RunContext | None = None) -> nn.Module:
    from peft import IA3Config

    config = IA3Config(feedforward_modules=settings.feedforward_modules, task_type=peft_task_type(context), **settings.peft_targets())
    return wrap_checked(model, settings, config)


TECHNIQUE = Technique(
    name="ia3",
    config_class=Ia3Settings,
    prepare=prepare,
    save=save_peft_adapter,
    disabled_view=peft_disabled_view,
    result_dir_name="adapter",
    adapter_types=("IA3",),  # PEFT's peft_type
    default_learning_rate=3e-3,
    summary="learned scaling vectors on keys, values and feed-forward (tiny, mergeable)",
    refuses={"quantized_base": NOT_QUANTIZED},
)
