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


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_a_technique_the_config_lets_train_a_score_head_runs_its_forward(technique: str, tiny_model_dir) -> None:
    """Every combination that does not work is refused when the config is read: a technique the config accepts
    with a score-head objective (reward) wraps a sequence classifier whose forward runs. Prefix tuning did not
    declare it: PEFT passes its prefixes to a classifier as past_key_values, which transformers' classifiers no
    longer take, and `tunelab plan`/`train` ended in PEFT's ValueError traceback."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        config = TunelabConfig.model_validate({"technique": {"name": technique}, "objective": {"name": "reward"}})
    except ValidationError as exc:
        assert "cannot train with objective 'reward'" in str(exc) or "technique." in str(exc), str(exc)
        return  # refused up front with its reason (or its defaults need settings: adapter_routing's adapters)
    spec = TECHNIQUES[technique]
    if spec.base_load(config.technique, torch.device("cpu")).quantization_config is not None:
        pytest.skip("a quantized base loads through bitsandbytes (tests/test_qlora.py covers its head)")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = 0
    tasks = ("a", "b") if technique == "multitask_prompt_tuning" else ()  # it needs multi-task data, ids per row
    wrapped = spec.apply(model, config.technique, RunContext(tasks=tasks, task_type="SEQ_CLS"))
    task_ids = {"task_ids": torch.tensor([0, 1])} if tasks else {}
    scores = wrapped(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long),
                     **task_ids).logits
    assert scores.shape == (2, 1)
