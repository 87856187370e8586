"""A run's technique's own figures on the evaluation data (``Technique.evaluate``), for ``tunelab eval``.

Training puts these figures in the run's eval.json from its validation split; here the same function reads the
data given to ``tunelab eval`` instead (an adapter_routing run, for example, reports how its router split each
task of that data between its adapters). Nothing here names a technique: the registry's ``evaluate`` does it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tunelab.config import read_run_config
from tunelab.data.prepare import PreparedData
from tunelab.data.tokenize import apply_length_policy, pad_token_id, tokenize_example
from tunelab.techniques import TECHNIQUES


def run_technique(target: str | Path) -> Any | None:
    """The registry entry of the run folder ``target``'s technique (None: not a run folder)."""
    if not (Path(target) / "config.yaml").is_file():
        return None
    name = (read_run_config(Path(target)).get("technique") or {}).get("name")
    return TECHNIQUES.get(name)


def technique_figures(target: str | Path, opened: Any, examples: list[Any], max_length: int, device: Any) -> dict[str, Any] | None:
    """``{"technique": name, ...its figures}`` on ``examples`` for a run whose technique has ``evaluate``, or None.
    Examples carrying a ``task`` are grouped by it (task ids index the sorted task names, as in training)."""
    technique = run_technique(target)
    if technique is None or technique.evaluate is None:
        return None
    tokenizer = opened.tokenizer
    tasks = sorted({e.task for e in examples if e.task is not None})
    index = {task: i for i, task in enumerate(tasks)}
    tokenized = []
    for example in examples:
        one = apply_length_policy(tokenize_example(tokenizer, example), max_length, "truncate")
        tokenized.append(replace(one, task_id=index[example.task]) if example.task in index else one)
    counts = {task: sum(e.task == task for e in examples) for task in tasks}
    data = PreparedData(train=[], validation=tokenized, validation_examples=examples,
                        report={"tasks": counts, "evaluated": "the evaluation data"})
    pad_id = pad_token_id(tokenizer)
    figures = technique.evaluate(opened.model, data, pad_id, device, None)
    return {"technique": technique.name, **figures} if figures else None
