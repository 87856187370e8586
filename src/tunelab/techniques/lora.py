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

from pydantic import Field
from torch import nn

from tunelab.techniques.base import Technique, TechniqueSettings


class LoraSettings(TechniqueSettings):
    name: Literal["lora"] = Field("lora", description="Low-rank adapters on frozen linear layers (PEFT LoRA).")
    r: int = Field(16, gt=0, description="Rank of the update B A. 8-64 is typical; higher adds capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear layers to adapt: 'all-linear' (every linear layer except the output head) or module "
        "names such as ['q_proj', 'v_proj'].",
    )


def prepare(model: nn.Module, settings: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # PEFT names the missing modules; add where to look
        raise ValueError(f"technique.target_modules: {exc}") from exc


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
