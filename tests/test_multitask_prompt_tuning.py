"""Multitask prompt tuning: each example's task picks its prompt (the loss passes the batch's task ids to the
model), a task's own factors learn only from that task's examples, the task names travel with the adapter, and
data without tasks is refused with what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from transformers import AutoModelForCausalLM

from tunelab.config import build_config
from tunelab.data import TokenizedExample, collate
from tunelab.errors import TechniqueError
from tunelab.objectives import OBJECTIVES
from tunelab.techniques import TECHNIQUES, RunContext

MPT = TECHNIQUES["multitask_prompt_tuning"]


def settings(**extra):  # noqa: ANN003, ANN201
    return build_config({"technique": {"name": "multitask_prompt_tuning", "num_virtual_tokens": 3, **extra}}).technique


def batch_of(task_id: int) -> dict[str, torch.Tensor]:
    example = TokenizedExample(list(range(5, 15)), list(range(5, 15)), "x", task="t", task_id=task_id)
    return collate([[example], [example]], 0)


def test_each_task_has_its_own_prompt_and_learns_only_from_its_examples(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    model = MPT.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings(), RunContext(tasks=("a", "b")))
    loss_a = OBJECTIVES["sft"].loss_sum(model, batch_of(0)).loss_sum
    loss_as_b = OBJECTIVES["sft"].loss_sum(model, batch_of(1)).loss_sum
    assert not torch.isclose(loss_a, loss_as_b)  # the task id reaches the prompt
    loss_a.backward()
    encoder = model.prompt_encoder["default"]
    assert encoder.prefix_task_cols.grad[0].abs().sum() > 0 and encoder.prefix_task_rows.grad[0].abs().sum() > 0
    assert torch.equal(encoder.prefix_task_cols.grad[1], torch.zeros_like(encoder.prefix_task_cols.grad[1]))
    assert encoder.embedding.weight.grad.abs().sum() > 0  # the shared prompt learns from every task


def test_without_tasks_in_the_data_it_is_refused_with_what_to_do(tiny_model_dir: Path) -> None:
    with pytest.raises(TechniqueError, match="'task' field"):
        MPT.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings(), RunContext())


def test_an_unknown_generation_task_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(TechniqueError, match="not a task of the data"):
        MPT.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings(generation_task="c"),
                  RunContext(tasks=("a", "b")))


def test_trains_on_multitask_data_and_reloads_with_its_task_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.result import load_run
    from tunelab.training import train

    records = toy_chat_records(16)
    for i, record in enumerate(records):
        record["task"] = ["animals", "echo"][i % 2]
    config = tiny_config(
        tiny_model_dir, technique={"name": "multitask_prompt_tuning", "num_virtual_tokens": 3},
        data={"train": [str(write_jsonl(tmp_path / "t.jsonl", records))], "val_size": 4, "max_length": 64},
        training={"max_steps": 2, "micro_batch_size": 2}, eval={"num_samples": 1, "max_new_tokens": 4},
        output={"dir": str(tmp_path / "run")},
    )
    assert config.data.packing is False  # turned off for a prompt-learning method
    result = train(config, progress=False)
    assert result.status == "completed"
    saved = json.loads((result.run_dir / "adapter" / "tunelab_tasks.json").read_text())
    assert saved["tasks"] == ["animals", "echo"]
    assert json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())["num_tasks"] == 2
    loaded = load_run(result.run_dir, device="cpu")
    assert loaded.model.tunelab_tasks == ["animals", "echo"]
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        free = loaded.model(input_ids=ids).logits  # no task id: the generation task's prompt (the first task)
        first = loaded.model(input_ids=ids, task_ids=torch.tensor([0])).logits
        second = loaded.model(input_ids=ids, task_ids=torch.tensor([1])).logits
    assert torch.equal(free, first) and not torch.equal(first, second)


def test_a_run_without_tasks_fails_before_the_base_evaluation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.training import train

    config = tiny_config(
        tiny_model_dir, technique={"name": "multitask_prompt_tuning"},
        data={"train": [str(write_jsonl(tmp_path / "t.jsonl", toy_chat_records(8)))], "val_size": 2},
        training={"max_steps": 1}, output={"dir": str(tmp_path / "run")},
    )
    with pytest.raises(TechniqueError, match="needs multi-task data"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "base_eval.json").exists()  # refused in seconds, on the weightless skeleton
