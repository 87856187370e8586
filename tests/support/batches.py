"""A collated toy batch and its loss, for tests that drive a technique's model without the training loop."""

from __future__ import annotations

from typing import Any

import torch

from support.tiny import toy_chat_records
from tunelab.data import TokenizedExample, collate
from tunelab.data.tokenize import IGNORE
from tunelab.objectives import OBJECTIVES

TASKS = ("animals", "echo")


def toy_batch(tokenizer: Any, n: int = 6) -> dict[str, torch.Tensor]:
    rows = []
    for record in toy_chat_records(n):
        prompt = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        p_ids, ids = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
        task = TASKS[len(rows) % len(TASKS)]  # multi-task data: only multitask prompt tuning reads it
        rows.append([TokenizedExample(ids, [IGNORE] * len(p_ids) + ids[len(p_ids):], "toy", task=task,
                                      task_id=TASKS.index(task))])
    return collate(rows, tokenizer.pad_token_id)


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        result = OBJECTIVES["sft"].loss_sum(model, batch)
    return float(result.loss_sum) / result.num_units
