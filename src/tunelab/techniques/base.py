"""What every technique provides, so the registry can check it and the loop can stay technique-agnostic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pydantic import BaseModel, ConfigDict
from torch import nn


class TechniqueSettings(BaseModel):
    """Base class of each technique's config section; `name` is the registry key (a Literal)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Technique:
    """One technique family.

    - ``prepare(model, settings)`` freezes what must not train and injects any new modules. It returns the
      model to train; trainable parameters are exactly those with ``requires_grad``.
    - ``save(model, run_dir)`` writes the result in its standard format and returns the folder.
    - ``result_dir_name`` is 'adapter' (a standard PEFT adapter) or 'model' (a plain transformers model).
    - ``load_result(config, folder, device)`` rebuilds the trained model from that folder (``tunelab.load_run``
      calls it); the default opens a plain transformers model or the configured base with a PEFT adapter.
    """

    name: str
    config_class: type[TechniqueSettings]
    prepare: Callable[[nn.Module, TechniqueSettings], nn.Module]
    save: Callable[[nn.Module, Path], Path]
    result_dir_name: str
    default_learning_rate: float
    summary: str
    load_result: Callable[[Any, Path, torch.device], nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.load_result is None:
            loader = load_full_model if self.result_dir_name == "model" else load_peft_adapter
            object.__setattr__(self, "load_result", loader)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def save_full_model(model: nn.Module, run_dir: Path) -> Path:
    """Save every weight as safetensors in ``run_dir/model`` so plain transformers can load it."""
    out = run_dir / "model"
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_full_model(config: Any, folder: Path, device: torch.device) -> nn.Module:
    """A ``model/`` result: a plain transformers model folder."""
    from transformers import AutoModelForCausalLM

    from tunelab.models import resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(config.model.dtype, device))
    return model.to(device)


def load_peft_adapter(config: Any, folder: Path, device: torch.device) -> nn.Module:
    """An ``adapter/`` result: the run's base model (as configured) with the saved PEFT adapter attached."""
    from peft import PeftModel

    from tunelab.models import load_model

    base = load_model(config.model, device)
    return PeftModel.from_pretrained(base, folder).to(device)
