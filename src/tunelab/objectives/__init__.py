"""The objective registry: one explicit table, checked at import time.

Adding an objective: write ``objectives/<name>.py`` with a settings class whose ``name`` is a ``Literal`` and an
``OBJECTIVE`` (see ``objectives/base.py`` for what it declares), then add it to ``_ALL`` below. The config's
``objective`` section is the union of their settings, keyed on ``name``, so an unknown name or a setting of
another objective is rejected when the config is read.

The loop calls ``objective.bind(settings, reference)``: a summed loss and its unit count per micro-batch. It
adds up the units over the accumulation window and divides every micro-batch's ``loss_sum`` by that total
before backward, whatever the units are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Union, get_args

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.data import PreparedData, prepare_data
from tunelab.data.config import DataConfig
from tunelab.data.formats import RECORD_KINDS
from tunelab.errors import ConfigError
from tunelab.objectives import classification, dpo, grpo, ipo, kto, orpo, ppo, reward, sft, simpo
from tunelab.objectives.base import Batch, LossSum, Objective, ObjectiveSpec, Reference
from tunelab.objectives.online import OnlineSettings, check_rewards as check_reward_settings
from tunelab.objectives.sft import logits_only_where  # shared with eval's loss (objectives' own helper)

_ALL: tuple[Objective, ...] = (
    sft.OBJECTIVE, dpo.OBJECTIVE, ipo.OBJECTIVE, orpo.OBJECTIVE, simpo.OBJECTIVE, kto.OBJECTIVE, reward.OBJECTIVE,
    classification.OBJECTIVE, grpo.OBJECTIVE, ppo.OBJECTIVE,
)


def _check(objectives: tuple[Objective, ...]) -> dict[str, Objective]:
    registry: dict[str, Objective] = {}
    for objective in objectives:
        if objective.name in registry:
            raise RuntimeError(f"objective {objective.name!r} is registered twice")
        literal = get_args(objective.config_class.model_fields["name"].annotation)
        if literal != (objective.name,):
            raise RuntimeError(f"objective {objective.name!r}: its settings' name must be Literal[{objective.name!r}]")
        if objective.units not in ("tokens", "pairs", "examples"):
            raise RuntimeError(f"objective {objective.name!r}: units must be tokens, pairs or examples")
        if objective.records not in RECORD_KINDS:
            raise RuntimeError(f"objective {objective.name!r}: records must be one of {', '.join(RECORD_KINDS)}")
        if objective.needs_reference and "reference" not in objective.config_class.model_fields:
            raise RuntimeError(f"objective {objective.name!r}: needs a reference, so its settings choose how (reference)")
        if objective.num_labels is not None and not objective.base_figures_uncached:
            raise RuntimeError(f"objective {objective.name!r}: a new head starts random in each run, so its base "
                               "figures cannot be cached (set base_figures_uncached)")
        registry[objective.name] = objective
    return registry


OBJECTIVES: dict[str, Objective] = _check(_ALL)
DEFAULT_OBJECTIVE = sft.OBJECTIVE.name

# The config's `objective` section: one settings class per objective, chosen by `name`.
ObjectiveConfig = Union[tuple(o.config_class for o in _ALL)]  # type: ignore[valid-type]
ObjectiveField = Annotated[ObjectiveConfig, Field(discriminator="name")] if len(_ALL) > 1 else ObjectiveConfig

LossFunction = Callable[[nn.Module, dict[str, torch.Tensor]], LossSum]  # a bound loss, as evaluation calls it


def default_objective_settings() -> Any:
    return OBJECTIVES[DEFAULT_OBJECTIVE].config_class()


def prepare_objective_data(settings: Any, data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                           cache_dir: Path | None) -> PreparedData:
    """The data as a run of ``settings``' objective reads it (``tunelab train`` and ``tunelab plan`` alike): an
    objective that reads classes may fix their order (its ``labels`` setting), else the data's, sorted; an online
    objective reads prompts, which data.format 'auto' then detects."""
    prompts = OBJECTIVES[settings.name].records == "prompt"
    return prepare_data(data, tokenizer, cache_dir, class_names_given=getattr(settings, "labels", None),
                        prompts=prompts)


def check_records(settings: Any, data: PreparedData, files: list[str]) -> None:
    """The objective trains on the kind of records the data holds (pairs for a preference objective...)."""
    wanted, found = OBJECTIVES[settings.name].records, data.records
    if wanted != found:
        raise ConfigError(f"objective.name={settings.name} trains on {RECORD_KINDS[wanted]}, but "
                          f"{', '.join(files)} holds {RECORD_KINDS[found]}; give data of that shape "
                          "(data.columns can rename its keys) or choose another objective")


def check_rewards(settings: Any, data: PreparedData) -> None:
    """An online objective's rewards can be computed on the data's prompt records: each column a reward reads is
    one of theirs, each user's function imports (``online.check_rewards``). `tunelab train` and `tunelab plan`
    both call it before reading any weight, so that plan refuses what train would, in the same words."""
    if isinstance(settings, OnlineSettings):
        columns = {name for record in data.train + data.validation for name in record.columns}
        check_reward_settings(settings, columns)


def quality_figure(name: str | None) -> tuple[str, bool] | None:
    """The validation figure a run of objective ``name`` is judged by (the runs table's delta column, compare's
    Pareto flag and learning-rate choice), with whether higher is better: its evaluation's primary metric (the first
    of ``Evaluation.metrics``, what ``tunelab eval`` ranks by), which its validation reports under the same name
    (eval.json's base and tuned figures). None for an objective that declares no evaluation (SFT: the config's task
    metrics judge it). A preference run's generated samples are one or two answers: judged by them, a DPO compare
    ranked techniques on the exact match of two samples instead of the preference accuracy of its validation pairs."""
    objective = OBJECTIVES.get(name or DEFAULT_OBJECTIVE)
    if objective is None or objective.evaluation is None:
        return None
    primary = objective.evaluation.metrics([])[0]  # the class names change no metric's name or direction
    return primary.name, primary.higher_is_better


__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "Batch", "LossFunction", "LossSum", "Objective", "ObjectiveConfig",
           "ObjectiveField", "ObjectiveSpec", "Reference", "check_records", "check_rewards", "default_objective_settings",
           "logits_only_where", "prepare_objective_data", "quality_figure"]
