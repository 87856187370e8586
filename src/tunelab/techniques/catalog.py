"""What ``tunelab techniques [--model M]`` shows: every technique's summary and, for a model, how many parameters
its default settings would train, counted on a weightless (meta-device) skeleton: no weights are read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.errors import ConfigError, TechniqueError
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
    from tunelab.config import ModelConfig, build_config
    from tunelab.models import load_model_config, model_skeleton
    from tunelab.techniques import TECHNIQUES

    model_config = load_model_config(ModelConfig(name=model_name))
    entries = []
    for name, technique in TECHNIQUES.items():
        trainable = total = None
        problem = None
        try:
            settings = build_config({"technique": {"name": name}, "data": {"packing": False}}).technique
            base_load = technique.base_load(settings, torch.device("cpu"))
            skeleton = model_skeleton(model_config, base_load)
            from tunelab.techniques import count_parameters

            trainable, total = count_parameters(technique.apply(skeleton, settings, RunContext()))
        except ConfigError as exc:  # no usable default settings (e.g. adapter_routing names its adapters)
            problem = "needs settings: " + str(exc).splitlines()[-1].strip()[:160]
        except (TechniqueError, ValueError, TypeError, RuntimeError) as exc:
            problem = str(exc).splitlines()[0][:160]
        entries.append(Entry(name, technique.summary, trainable, total, technique.refusal("merge"),
                             technique.refusal("packing"), problem))
    return entries
