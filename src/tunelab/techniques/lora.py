"""LoRA: low-rank adapters on frozen linear layers, through PEFT.

For a frozen weight W0 (d_out, d_in), LoRA learns B (d_out, r) and A (r, d_in) with r << min(d_in, d_out):
    h = W0 x + (alpha / r) * B A x          (B starts at zero, so training starts from the base model)
Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
Trainable parameters per adapted layer: r * (d_in + d_out). Gradients and AdamW state exist only for A and B,
so memory is close to inference memory plus activations. The result is a standard PEFT adapter
(adapter_config.json + adapter_model.safetensors) that loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from typing import Any

from pydantic import Field, field_validator
from torch import nn

from tunelab.errors import TechniqueError
from tunelab.techniques.base import Technique, TechniqueSettings


class LoraSettings(TechniqueSettings):
    name: Literal["lora"] = Field("lora", description="Low-rank adapters on frozen linear layers (PEFT LoRA).")
    r: int = Field(16, gt=0, description="Rank of the update B A. 8-64 is typical; higher adds capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear layers to adapt: 'all-linear' (every linear layer except the output head) or module "
        "names such as ['q_proj', 'v_proj'] (a single name is a list of one). Every name must match a module.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        # PEFT reads a plain string as a regex; here `--set technique.target_modules=q_proj` means that one module.
        return [value] if isinstance(value, str) and value != "all-linear" else value


def check_target_modules(model: nn.Module, names: list[str]) -> None:
    """Every listed name must match some module (PEFT only fails when *none* does, so a typo would go unseen)."""
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in names if not any(m == t or m.endswith("." + t) for m in module_names)]
    if missing:
        linear = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, nn.Linear)})
        raise TechniqueError(f"technique.target_modules: {missing} match no module of this model; its linear "
                             f"layers are named {linear} (or use 'all-linear')")


def prepare(model: nn.Module, settings: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if settings.target_modules != "all-linear":
        check_target_modules(model, settings.target_modules)
    peft_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # e.g. a module type PEFT cannot adapt
        raise TechniqueError(f"technique: {exc}") from exc


def save(model: nn.Module, run_dir: Path) -> Path:
    out = run_dir / "adapter"
    model.save_pretrained(out, safe_serialization=True)
    return out


TECHNIQUE = Technique(
    name="lora",
    config_class=LoraSettings,
    prepare=prepare,
    save=save,
    result_dir_name="adapter",
    default_learning_rate=2e-4,
    summary="low-rank adapters on frozen weights (small, fast, mergeable)",
)
