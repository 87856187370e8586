"""What ``tunelab techniques [--model M]`` shows: every technique's summary and, for a model, how many parameters
its default settings would train, counted on a weightless (meta-device) skeleton: no weights are read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ValidationError

from tunelab.errors import TechniqueError
from tunelab.models import ModelConfig, load_model_config, model_skeleton
from tunelab.techniques import TECHNIQUES, count_parameters
from tunelab.techniques.base import RunContext


@dataclass
class Entry:
    name: str
    summary: str
    trainable: int | None  # None when the technique does not fit the model (see `problem`)
    total: int | None
    merges: str | None  # None: merges; else the reason it does not
    packs: str | None  # None: packs; else the reason it does not
    problem: str | None = None


def catalog(model_name: str) -> list[Entry]:
    model_config = load_model_config(ModelConfig(name=model_name))
    entries = []
    for name, technique in TECHNIQUES.items():
        trainable = total = None
        problem = None
        try:
            settings = technique.config_class()
        except ValidationError as exc:  # no usable default settings (e.g. adapter_routing names its adapters)
            entries.append(Entry(name, technique.summary, None, None, technique.refusal("merge"),
                                 technique.refusal("packing"), "needs settings: " + _first_error(exc)[:160]))
            continue
        try:
            base_load = technique.base_load(settings, torch.device("cpu"))
            skeleton = model_skeleton(model_config, base_load)
            trainable, total = count_parameters(technique.apply(skeleton, settings, RunContext()))
        except (TechniqueError, ValueError, TypeError, RuntimeError) as exc:
            problem = str(exc).splitlines()[0][:160]
        entries.append(Entry(name, technique.summary, trainable, total, technique.refusal("merge"),
                             technique.refusal("packing"), problem))
    return entries


def _first_error(exc: ValidationError) -> str:
    """pydantic's first message, as config errors print it: 'technique: <what is wrong>'."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in ("technique", *error["loc"]))
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"
