"""The objective registry: checked at import, keyed on `name` in the config, and asked by techniques for the head."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from pydantic import ValidationError

from tunelab.config import TunelabConfig
from tunelab.objectives import OBJECTIVES, _check
from tunelab.settings import Settings
from tunelab.techniques import TECHNIQUES, RunContext


def test_a_misnamed_objective_is_refused_at_import() -> None:
    class Other(Settings):
        name: Literal["other"] = "other"

    with pytest.raises(RuntimeError, match="Literal\\['sft'\\]"):
        _check((dataclasses.replace(OBJECTIVES["sft"], config_class=Other),))
    with pytest.raises(RuntimeError, match="registered twice"):
        _check((OBJECTIVES["sft"], OBJECTIVES["sft"]))


def test_the_objective_section_is_keyed_on_name() -> None:
    assert TunelabConfig().objective.name == "sft"
    assert TunelabConfig.model_validate({"objective": {}}).objective.name == "sft"
    with pytest.raises(ValidationError, match="objective"):
        TunelabConfig.model_validate({"objective": {"name": "nope"}})


def test_a_peft_technique_wraps_the_head_the_objective_asks_for(tiny_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    wrapped = TECHNIQUES["lora"].apply(model, TECHNIQUES["lora"].config_class(), RunContext(task_type="SEQ_CLS"))
    assert wrapped.peft_config["default"].task_type == "SEQ_CLS"
    trained = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert any(".score." in name for name in trained)  # PEFT trains (and saves) the new score head
