"""Configs the planner's tests plan (tests/test_plan*.py): the tiny model on toy data, two steps, no evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support.online import toy_prompts_file
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl


def config_for(tiny_model_dir: Path, tmp_path: Path, technique: str | dict[str, Any], dtype: str = "float32",  # noqa: ANN201
               **training):  # noqa: ANN003
    """An SFT run of ``technique`` (a name, or its settings) on 24 toy chats, micro-batch 2 (plus any ``training``
    settings)."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    return tiny_config(tiny_model_dir, {"dtype": dtype}, data={"train": [str(data)], "val_size": 0, "max_length": 64},
                       technique={"name": technique} if isinstance(technique, str) else technique,
                       training={"max_steps": 2, "micro_batch_size": 2, **training},
                       eval={"before_after": False, "forgetting": False, "num_samples": 0},
                       output={"dir": str(tmp_path / "run")})


def online_config(tiny_model_dir: Path, tmp_path: Path, objective: str, **settings):  # noqa: ANN201, ANN003
    """A LoRA run of the online ``objective`` on 24 toy prompts, rewarded by length (plus any objective ``settings``)."""
    return tiny_config(tiny_model_dir, {"dtype": "float32"},
                       data={"train": [str(toy_prompts_file(tmp_path, 24))], "val_size": 0, "max_length": 64},
                       technique={"name": "lora"},
                       objective={"name": objective, "rewards": [{"function": "length", "max_words": 4}],
                                  "max_completion_length": 8, **settings},
                       training={"max_steps": 2, "micro_batch_size": 2},
                       eval={"before_after": False, "forgetting": False, "num_samples": 0},
                       output={"dir": str(tmp_path / "run")})


def cpu_activations_with_and_without(config, swap: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:  # noqa: ANN001
    """The activations a CPU plan counts at 2 x 32 tokens, with the planner's module swap ``swap`` (its name in
    tunelab.plan.planner, e.g. use_cpu_rms_norm) and with that swap switched off."""
    from tunelab.plan import Shape, plan_memory, planner

    shape = Shape(micro_batch_size=2, length=32)
    swapped = plan_memory(config, "cpu", shape, runtime=0).components["activations"]
    monkeypatch.setattr(planner, swap, lambda model: 0)
    return swapped, plan_memory(config, "cpu", shape, runtime=0).components["activations"]
