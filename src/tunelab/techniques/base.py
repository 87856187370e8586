"""What every technique provides, so the registry can check it and the loop can stay technique-agnostic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    """

    name: str
    config_class: type[TechniqueSettings]
    prepare: Callable[[nn.Module, TechniqueSettings], nn.Module]
    save: Callable[[nn.Module, Path], Path]
    result_dir_name: str
    default_learning_rate: float
    summary: str


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
