"""``tunelab eval`` of a run whose objective declares its own evaluation (``objectives.base.Evaluation``): reward
models and policies trained on preference pairs rank held-out pairs, classifiers predict held-out classes.

The records are tokenized as the run tokenized its training data, every system (the run, ``--against`` models, the
base: for a score head, the same base with a new untrained head) is scored one unit at a time by the objective's
``unit_stats`` (an online policy: by the run's rewards of its greedy answers, ``eval.online``), and a baseline that needs no model (chance, the majority class) joins the systems, so the report
compares the run with both, each metric with its paired bootstrap interval. Nothing here names an objective: the
metrics, the scoring, the baseline and the confusion matrix all come from the declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tunelab.data.formats import Example
from tunelab.data.labels import with_label_ids
from tunelab.data.prepare import tokenize_records
from tunelab.data.tokenize import pad_token_id
from tunelab.errors import ConfigError, DataError
from tunelab.eval.online import rewarded_answers
from tunelab.eval.online import unit_stats as online_unit_stats
from tunelab.fs import read_json
from tunelab.models import adapter_num_labels
from tunelab.objectives import OBJECTIVES, Objective
from tunelab.objectives.base import Evaluation
from tunelab.result import find_result
from tunelab.rewards import Reward


@dataclass
class ObjectiveRun:
    """What a run's evaluation needs from its config: the objective and the data section it tokenized with."""

    objective: Objective
    evaluation: Evaluation
    data_config: Any  # the run's DataConfig
    seed: int  # the run's seed: the base's untrained head is drawn with it
    classes: list[str]  # the class names in label-id order, as the run's data report records them; [] without
    settings: Any = None  # the run's objective settings (an online policy's rewards and answer length)


def objective_run(target: str | Path, adapter: str | Path | None) -> ObjectiveRun | None:
    """The objective evaluation of TARGET when it is a run (or its result folder) whose objective declares one;
    None otherwise (an SFT run, a model, an adapter folder on its own: evaluated by loss and generations)."""
    if adapter is not None or not Path(target).is_dir():
        refuse_score_head_alone(adapter)
        return None
    try:
        found = find_result(target)
    except ConfigError:
        return None  # not a run: open_model says what it is (or refuses it) later
    if found.config is None:
        refuse_score_head_alone(found.result_dir)
        return None
    objective = OBJECTIVES[found.config.objective.name]
    if objective.evaluation is None:
        return None
    report = found.run_dir / "data_report.json"
    names = ((read_json(report) if report.is_file() else {}).get("classes") or {}).get("names") or []
    return ObjectiveRun(objective, objective.evaluation, found.config.data, found.config.training.seed, list(names),
                        found.config.objective)


def refuse_score_head_alone(folder: str | Path | None) -> None:
    """Refuse an adapter folder that saves a score head when it comes without its run: only the run's config says
    which objective scores it (classes or rewards) and how its records read; as a language model it has no head."""
    if folder is None or not (Path(folder) / "adapter_config.json").is_file():
        return
    outputs = adapter_num_labels(Path(folder))
    if outputs is not None:
        raise ConfigError(f"{folder}: an adapter with a score head of {outputs} outputs, given without its run: the "
                          "objective that trained it decides how it is scored, and only its run says which; give "
                          "the run folder (the one holding this adapter and config.yaml) as TARGET")


def head_classes(model: nn.Module, run: ObjectiveRun) -> list[str]:
    """The class names of the model's head in label-id order when the evaluation reads classes (else none): the
    run's own list (a run saved before adapter folders carried head_config.json reloads with LABEL_k names),
    else the model's config.id2label."""
    if run.evaluation.confusion is None:
        return []
    if run.classes:
        return run.classes
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


def prepare_records(examples: list[Example], tokenizer: Any, run: ObjectiveRun, classes: list[str]) -> tuple[list[Any], list[Example], int]:
    """The records as the run tokenized its training data (its labels mapped to the head's class ids); the
    examples they came from; how many were dropped as overlong (the run's data.overlong: drop)."""
    records, kept, dropped = tokenize_records(examples, tokenizer, run.data_config, run.evaluation.records)
    if classes:
        records = with_label_ids(records, classes)  # a label the head does not know: an error at its line
    if not records:
        raise DataError(f"{examples[0].source}: no record left to evaluate ({dropped} longer than the run's "
                        "data.max_length, dropped as its data.overlong says)")
    return records, kept, dropped


@torch.no_grad()
def score_records(model: nn.Module, records: list[Any], evaluation: Evaluation, pad_id: int, batch_size: int,
                  device: torch.device, on_chunk: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """metric name -> (units, k) statistics of every record, in order, one batch at a time (no gradients)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = {k: v.to(device) for k, v in evaluation.collate([[r] for r in chunk], pad_id).items()}
        for name, value in evaluation.unit_stats(model, batch).items():
            parts.setdefault(name, []).append(value.double().cpu().numpy())
        if on_chunk:
            on_chunk(len(chunk))
    model.train(was_training)
    return {name: np.concatenate(values) for name, values in parts.items()}


def answer_stats(model: nn.Module, tokenizer: Any, records: list[Any], rewards: list[Reward], run: ObjectiveRun,
                 batch_size: int, on_chunk: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """An online policy's statistics (``Evaluation.rewarded_answers``): its greedy answer to every prompt record
    rewarded by the run's rewards, the total and each term as (value, 1) per record; and the answers."""
    scored, texts = rewarded_answers(model, tokenizer, records, rewards, run.settings.max_completion_length,
                                     batch_size, on_chunk=on_chunk)
    return online_unit_stats(scored), texts


def baseline_stats(records: list[Any], evaluation: Evaluation, pad_id: int,
                   classes: list[str]) -> tuple[str, dict[str, np.ndarray]] | None:
    """The evaluation's baseline over every record (its name and statistics); None when it declares none."""
    if evaluation.baseline is None:
        return None
    name, stats = evaluation.baseline(evaluation.collate([[r] for r in records], pad_id), classes)
    return name, {key: value.double().cpu().numpy() for key, value in stats.items()}


def prepare_model(model: nn.Module, tokenizer: Any) -> int:
    """The pad id batches are padded with; a score head reads the last token that is not padding, so its config
    must hold that id (a run saved it; a base with a new head gets it here)."""
    pad_id = pad_token_id(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    return pad_id


def prompt_and_reference(example: Example) -> tuple[str, str]:
    """How a record reads in reports: its prompt (or text) and what the data says is right (the chosen answer
    over the rejected one, or the label)."""
    prompt = example.prompt or "\n".join(f"{role}: {content}" for role, content in example.messages)
    if example.rejected or example.chosen:
        return prompt, f"chosen: {example.chosen}\nrejected: {example.rejected}"
    if example.columns:  # a prompt record: the reference columns its rewards read
        return prompt, "\n".join(f"{name}: {value}" for name, value in example.columns)
    return prompt, "" if example.label is None else str(example.label)
