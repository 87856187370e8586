"""The technique registry: one explicit table, checked at import time.

Adding a technique: write ``techniques/<name>.py`` with a settings class whose ``name`` is a ``Literal`` and a
``TECHNIQUE`` object, then add it to ``_ALL`` below. The config schema's ``technique`` section is built from
this table, so an unknown name is rejected when the config is read.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Union, get_args

import yaml

from tunelab.techniques import (adalora, adapter, adapter_routing, freeze, full, ia3, loha, lokr, lora,
                                 multitask_prompt_tuning, p_tuning, prefix_tuning, prompt_tuning, qlora, vera)
from tunelab.errors import TechniqueError
from tunelab.techniques.bottleneck import read_config  # reads and checks the JSON, with the file's name in errors
from tunelab.techniques.base import ADAPTER_CONFIG, ADAPTER_DIR, RESULT_DIRS, BaseLoad, FigureTable, MergeResult, RunContext, Technique, count_parameters
from tunelab.techniques.base import virtual_tokens  # the positions a prepared model adds before every row

_ALL: tuple[Technique, ...] = (
    full.TECHNIQUE, freeze.TECHNIQUE, lora.TECHNIQUE, qlora.TECHNIQUE, adalora.TECHNIQUE, ia3.TECHNIQUE, loha.TECHNIQUE,
    lokr.TECHNIQUE, vera.TECHNIQUE, prompt_tuning.TECHNIQUE, multitask_prompt_tuning.TECHNIQUE,
    prefix_tuning.TECHNIQUE, p_tuning.TECHNIQUE, adapter.TECHNIQUE, adapter_routing.TECHNIQUE,
)


def _check(techniques: tuple[Technique, ...]) -> dict[str, Technique]:
    registry: dict[str, Technique] = {}
    for technique in techniques:
        if technique.name in registry:
            raise RuntimeError(f"technique {technique.name!r} is registered twice")
        literal = get_args(technique.config_class.model_fields["name"].annotation)
        if literal != (technique.name,):
            raise RuntimeError(f"technique {technique.name!r}: its settings' name must be Literal[{technique.name!r}]")
        if technique.merge is None and "merge" not in technique.refuses:
            raise RuntimeError(f"technique {technique.name!r}: merge needs a merge function or a refusal reason")
        if technique.result_dir_name not in RESULT_DIRS:
            raise RuntimeError(f"technique {technique.name!r}: result_dir_name must be one of {RESULT_DIRS}")
        if (technique.result_dir_name == ADAPTER_DIR) != bool(technique.adapter_types):
            raise RuntimeError(f"technique {technique.name!r}: an adapter result declares its adapter_types (the "
                               f"type its {ADAPTER_CONFIG} carries), a model result none")
        registry[technique.name] = technique
    return registry


TECHNIQUES: dict[str, Technique] = _check(_ALL)

# What a config trains when its technique section, or the section's `name`, is left out.
DEFAULT_TECHNIQUE: str = lora.TECHNIQUE.name


def technique_name_hint(name: Any) -> str | None:
    """Did-you-mean for a ``technique.name`` that is not registered: a variant's name ('dora' -> lora with
    use_dora: true, as the technique declares it) or a near spelling of a registered name."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower().replace("-", "_")
    for technique in _ALL:
        settings = technique.variant_names.get(key)
        if settings is not None:
            chosen = {"name": technique.name, **settings}
            options = ", ".join(f"{key}: {_yaml_scalar(value)}" for key, value in settings.items())
            sets = " ".join(f"--set technique.{key}={_yaml_scalar(value)}" for key, value in chosen.items())
            section = ", ".join(f"{key}: {_yaml_scalar(value)}" for key, value in chosen.items())
            return (f"'{name}' is technique '{technique.name}'{' with ' + options if options else ''}: write "
                    f"technique: {{{section}}} (on the command line: {sets})")
    close = difflib.get_close_matches(key, list(TECHNIQUES), n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'?" if close else None


def _yaml_scalar(value: Any) -> str:
    """A value as the user would write it in YAML: true, 16, pissa."""
    return yaml.safe_dump(value).removesuffix("...\n").strip()


def technique_variant(section: Mapping[str, Any]) -> str | None:
    """The variant a run's technique section chooses ('dora'), as its technique labels it; None when plain, or when
    the section no longer validates (an older run)."""
    technique = TECHNIQUES.get(section.get("name", DEFAULT_TECHNIQUE))
    if technique is None or technique.variant_label is None:
        return None
    try:
        settings = technique.config_class.model_validate(section)
    except ValueError:  # pydantic's ValidationError: a config from another tunelab version
        return None
    return technique.variant_label(settings)


def adapter_type(config: dict[str, Any]) -> str | None:
    """The type an adapter_config.json declares: tunelab's own ``type``, or PEFT's ``peft_type``."""
    kind = config.get("type") or config.get("peft_type")
    return str(kind) if kind is not None else None


def technique_for_adapter(folder: Path) -> Technique:
    """The technique that opens the adapter folder ``folder``: the first registered one that declares the type
    its adapter_config.json carries (so a plain LORA folder opens as 'lora', not as 'qlora')."""
    kind = adapter_type(read_config(folder))
    technique = declaring_adapter_type(kind)
    if technique is not None:
        return technique
    known = sorted({t for technique in _ALL for t in technique.adapter_types})
    raise TechniqueError(f"{Path(folder) / ADAPTER_CONFIG}: unknown adapter type {kind!r}; tunelab opens {', '.join(known)}")


def generation_view(model: Any) -> AbstractContextManager[Any]:
    """The context in which ``generate`` on ``model`` computes what its forward computes: the ``generation_view``
    of the technique that declares the type of its active PEFT adapter (``adapter_types``), else nothing to do
    (a plain model, or a technique whose adapter ``generate`` already applies)."""
    configs, active = getattr(model, "peft_config", None), getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    kind = getattr(getattr(config, "peft_type", None), "value", None)  # PEFT's PeftType is a str enum
    technique = declaring_adapter_type(kind)
    if technique is None or technique.generation_view is None:
        return nullcontext()
    return technique.generation_view(model)


def declaring_adapter_type(kind: str | None) -> Technique | None:
    """The first registered technique that declares the PEFT adapter type ``kind`` (``adapter_types``), or None."""
    for technique in _ALL:
        if kind is not None and kind in technique.adapter_types:
            return technique
    return None


def figure_tables(figures: dict[str, Any]) -> list[FigureTable]:
    """The console tables of a technique's own eval figures (``{"technique": name, ...}``), as it declares them."""
    technique = TECHNIQUES.get(figures.get("technique", ""))
    if technique is None or technique.figure_tables is None:
        return []
    return technique.figure_tables(figures)


# The union the config schema discriminates on `name`.
TechniqueConfig = Union[tuple(t.config_class for t in _ALL)]  # type: ignore[valid-type]

__all__ = ["DEFAULT_TECHNIQUE", "TECHNIQUES", "BaseLoad", "MergeResult", "RunContext", "Technique", "TechniqueConfig",
           "TechniqueError", "adapter_type", "count_parameters", "figure_tables", "generation_view", "technique_for_adapter",
           "technique_name_hint", "technique_variant"]
