"""Multi-task data: the `task` field on any format, per-task counts, the stratified split, task ids in batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.tiny import toy_chat_records, write_jsonl
from tunelab.config import DataConfig
from tunelab.data import DataError, collate, load_file, prepare_data
from tunelab.data.tokenize import NO_TASK


def _tasked(records: list[dict], task: str) -> list[dict]:
    return [{**r, "task": task} for r in records]


def _two_tasks(n_a: int, n_b: int) -> list[dict]:
    a = _tasked(toy_chat_records(n_a), "animals")
    b = [{"prompt": f"count {i}:", "completion": f" {i} {i + 1}", "task": "count"} for i in range(n_b)]
    # prompt_completion and messages cannot share a file; make task b chat too
    b = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
          "task": "count"} for r in b]
    return a + b


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "task": "greet"},
    {"instruction": "greet", "output": "hello", "task": "greet"},
    {"prompt": "hi", "completion": " hello", "task": "greet"},
    {"text": "hello there", "task": "greet"},
])
def test_task_field_on_every_format(tmp_path: Path, record: dict) -> None:
    loaded = load_file(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert loaded.examples[0].task == "greet"


def test_task_in_csv_and_bad_task_values(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion,task\nhi,hello,greet\nbye,later,\n")
    assert [e.task for e in load_file(csv).examples] == ["greet", None]  # an empty cell is "no task"
    for bad, what in ((3, "a int"), ("  ", "blank")):
        path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "task": bad}])
        with pytest.raises(DataError, match=rf"bad.jsonl:1: 'task' is {what}"):
            load_file(path)


def test_mixed_task_and_no_task_is_an_error(tiny_tokenizer, tmp_path: Path) -> None:
    records = _tasked(toy_chat_records(4), "a") + toy_chat_records(6)[4:]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d.jsonl:5: no 'task', but .*d.jsonl:1 has one \('a'\)"):
        prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tiny_tokenizer)


def test_report_counts_per_task_and_split_is_stratified(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _two_tasks(36, 12))
    for seed in range(4):  # a plain random split hits the exact proportion by chance now and then, not every time
        data = prepare_data(DataConfig(train=[str(path)], val_size=0.25, seed=seed, cache=False), tiny_tokenizer)
        assert data.tasks == ["animals", "count"]
        # 12 validation examples, in the tasks' 3:1 proportion
        assert data.report["tasks"] == {"animals": {"train": 27, "validation": 9}, "count": {"train": 9, "validation": 3}}
    assert {e.task_id for e in data.train if e.task == "count"} == {1}
    assert {e.task_id for e in data.validation if e.task == "animals"} == {0}


def test_small_task_is_measured_and_trained(tiny_tokenizer, tmp_path: Path) -> None:
    # 40 + 3 examples at 5%: proportional rounding gives the small task 0 validation examples; it gets 1, and a
    # one-example task keeps its only example for training.
    records = _two_tasks(40, 3) + [{"messages": [{"role": "user", "content": "lone"},
                                                  {"role": "assistant", "content": "one"}], "task": "solo"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = prepare_data(DataConfig(train=[str(path)], val_size=0.05, cache=False), tiny_tokenizer)
    tasks = data.report["tasks"]
    assert tasks["count"]["validation"] == 1 and tasks["count"]["train"] == 2
    assert tasks["solo"] == {"train": 1, "validation": 0}
    assert sum(t["validation"] for t in tasks.values()) == 2  # the total is still round(44 * 0.05)


def test_stratified_split_is_seeded(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _two_tasks(20, 20))

    def validation(seed: int) -> set[str]:
        data = prepare_data(DataConfig(train=[str(path)], val_size=0.2, seed=seed, cache=False), tiny_tokenizer)
        return {e.source for e in data.validation}

    assert validation(0) == validation(0) and validation(0) != validation(1)


def test_task_ids_in_batches(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _two_tasks(4, 4))
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tiny_tokenizer)
    a = next(e for e in data.train if e.task == "animals")
    b = next(e for e in data.train if e.task == "count")
    batch = collate([[a], [b], [a, b]], pad_id=0)
    assert batch["task_ids"].tolist() == [0, 1, NO_TASK]  # a packed row mixing tasks has no single task
    tokens = batch["token_task_ids"]  # (B, T)
    assert tokens.shape == batch["input_ids"].shape
    assert tokens[2, : len(a.input_ids)].eq(0).all() and tokens[2, len(a.input_ids):].eq(1).all()
    assert tokens[0, len(a.input_ids):].eq(NO_TASK).all()  # padding
    assert "task_ids" not in collate([[a.__class__(a.input_ids, a.labels, a.source)]], pad_id=0)


def test_tasks_survive_the_cache(tiny_tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _two_tasks(12, 8))
    config = DataConfig(train=[str(path)], val_size=0.25)
    first = prepare_data(config, tiny_tokenizer, tmp_path / "cache")
    again = prepare_data(config, tiny_tokenizer, tmp_path / "cache")
    assert again.from_cache
    assert [(e.task, e.task_id) for e in again.train] == [(e.task, e.task_id) for e in first.train]
    assert [e.task for e in again.validation_examples] == [e.task for e in first.validation_examples]
    assert again.tasks == first.tasks == ["animals", "count"]


def test_same_text_under_two_tasks_is_not_a_duplicate(tiny_tokenizer, tmp_path: Path) -> None:
    records = toy_chat_records(3)
    path = write_jsonl(tmp_path / "d.jsonl", _tasked(records, "x") + _tasked(records, "y") + _tasked(records[:1], "x"))
    data = prepare_data(DataConfig(train=[str(path)], val_size=0, cache=False), tiny_tokenizer)
    assert len(data.train) == 6 and data.report["duplicates_removed"] == 1
