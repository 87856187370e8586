"""Sequence classification: a head with one output per class on the last token that is not padding, trained
with (optionally class-weighted) cross-entropy on {text, label} (or {messages, label}) records.

    L = - (1 / N) * sum_i w_{y_i} * log softmax(z_i)[y_i]

where z_i (k,) are the head's logits for sequence i, y_i its class, w the class weights (1 without them) and N
the number of sequences in the whole optimizer step (the unit is the sequence; the loop divides the summed loss
by the step's total count, so gradient accumulation equals the big batch). The model is transformers'
AutoModelForSequenceClassification with the class names in ``config.id2label``; with an adapter technique PEFT
trains the new head too and saves it with the adapter (task type SEQ_CLS, the head in modules_to_save), so the
result opens in plain transformers/PEFT.

Logged per sequence (training and validation): ``accuracy``, and the confusion matrix as
``confusion_<true>_<predicted>`` shares, from which macro-F1 follows (``macro_f1``).
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from pydantic import Field, field_validator
from torch import nn

from tunelab.data.labels import TokenizedLabeled
from tunelab.errors import ConfigError
from tunelab.metrics import Classification, Metric
from tunelab.objectives.base import PER_CLASS, Batch, Evaluation, LossSum, Objective, NEW_HEAD
from tunelab.settings import Settings
from tunelab.techniques.base import forward_inputs

PACKING = "a sequence's class is read at its own last token; packed rows would mix sequences"


class ClassificationSettings(Settings):
    name: Literal["classification"] = Field("classification", description="Training objective (see the section's "
                                            "description).")
    labels: list[str] | None = Field(None, description="The class names in label-id order (config.id2label). "
                                     "When unset: the labels the data holds, sorted (integers numerically).")
    class_weights: dict[str, float] | None = Field(None, description="Weight of each class's sequences in the loss, "
                                                   "by class name (e.g. {rare: 5.0}); classes not named weigh 1. For "
                                                   "unbalanced data; the data report shows the balance.")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and (len(set(labels)) != len(labels) or len(labels) < 2):
            raise ValueError(f"expected at least two distinct class names, got {labels}")
        return labels

    @field_validator("class_weights")
    @classmethod
    def _positive(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        bad = {name: w for name, w in (weights or {}).items() if not w > 0}
        if bad:
            raise ValueError(f"class weights must be above 0, got {bad}")
        return weights


def collate_labeled(rows: list[list[TokenizedLabeled]], pad_id: int) -> Batch:
    """Rows of one labeled record each -> input_ids, position_ids (B, T), right-padded, and class ids (B,).

    Padding is its own position segment (positions restart), as in ``data.collate``: it attends only to itself,
    and the head reads each row's last token that is not padding."""
    records = [record for row in rows for record in row]
    width = max(len(r.input_ids) for r in records)
    ids = [r.input_ids + [pad_id] * (width - len(r.input_ids)) for r in records]
    positions = [list(range(len(r.input_ids))) + list(range(width - len(r.input_ids))) for r in records]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "position_ids": torch.tensor(positions, dtype=torch.long),
            "class_ids": torch.tensor([r.label_id for r in records], dtype=torch.long)}


def count_sequences(batch: Batch) -> int:
    return int(batch["class_ids"].numel())


def class_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, k) logits of the classification head, pooled by the model at each row's last non-padding token."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                 **forward_inputs(model, batch)).logits.float()


def class_weight_vector(model: nn.Module, weights: dict[str, float] | None, device: torch.device) -> torch.Tensor | None:
    """The weights in label-id order, read against the model's own id2label (the class list it was built with)."""
    if not weights:
        return None
    id2label = extract_model_from_parallel(model).config.id2label
    names = [id2label[i] for i in range(len(id2label))]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"objective.class_weights names {', '.join(unknown)}, which are not classes of the data "
                          f"({', '.join(names)})")
    return torch.tensor([weights.get(name, 1.0) for name in names], dtype=torch.float32, device=device)


def confusion_stats(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """Counts of each (true, predicted) cell, summed over the batch (the loop logs them as shares)."""
    cells = torch.bincount(truth * classes + predicted, minlength=classes * classes).float()  # (k * k,)
    return {f"confusion_{t}_{p}": cells[t * classes + p] for t in range(classes) for p in range(classes)}


def classification_loss_sum(model: nn.Module, batch: Batch, settings: ClassificationSettings) -> LossSum:
    logits = class_logits(model, batch)  # (B, k)
    truth = batch["class_ids"]  # (B,)
    weight = class_weight_vector(model, settings.class_weights, logits.device)
    loss_sum = F.cross_entropy(logits, truth, weight=weight, reduction="none").sum()
    predicted = logits.detach().argmax(-1)
    stats = {"accuracy": (predicted == truth).float().sum(), **confusion_stats(predicted, truth, logits.shape[-1])}
    return LossSum(loss_sum, len(truth), stats)


def macro_f1(figures: Mapping[str, float]) -> dict[str, float]:
    """Macro-F1 from the confusion shares (F1 = 2TP / (2TP + FP + FN) does not change with the scale); a class
    that is neither present nor predicted is left out of the mean."""
    classes = math.isqrt(sum(name.startswith("confusion_") for name in figures))
    scores = []
    for c in range(classes):
        tp = figures.get(f"confusion_{c}_{c}", 0.0)
        fp = sum(figures.get(f"confusion_{t}_{c}", 0.0) for t in range(classes) if t != c)
        fn = sum(figures.get(f"confusion_{c}_{p}", 0.0) for p in range(classes) if p != c)
        if tp + fp + fn > 0:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return {"macro_f1": round(sum(scores) / len(scores), 6) if scores else 0.0}


def _class_metrics(classes: list[str]) -> list[Metric]:
    return Classification(classes).metrics  # accuracy, macro-F1: both from the one-hot (true, predicted) cells


def confusion_cells(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> torch.Tensor:
    """(B,) predicted and true class ids -> (B, k * k): each sequence's one-hot (true, predicted) cell, whose sum
    over sequences is the confusion matrix (row-major: true class, then predicted)."""
    cells = torch.zeros(len(truth), classes * classes, dtype=torch.float64, device=truth.device)
    return cells.scatter_(1, (truth * classes + predicted)[:, None], 1.0)


@torch.no_grad()
def classify(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Each sequence's confusion cell (accuracy and macro-F1 are both read from it), from the head's top class."""
    logits = class_logits(model, batch)  # (B, k)
    cells = confusion_cells(logits.argmax(-1), batch["class_ids"], logits.shape[-1])
    return {"accuracy": cells, "macro_f1": cells}


def majority_class(batch: Batch, classes: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """The baseline that answers the evaluated data's most frequent class every time (the best any constant
    answer scores on this data; ties go to the first class)."""
    truth = batch["class_ids"]  # (N,) every evaluated sequence
    majority = int(torch.bincount(truth, minlength=len(classes)).argmax())
    cells = confusion_cells(torch.full_like(truth, majority), truth, len(classes))
    return f"majority class ({classes[majority]})", {"accuracy": cells, "macro_f1": cells}


def _describe(stats: Mapping[str, list[float]], classes: list[str]) -> str:
    cell = max(range(len(stats["accuracy"])), key=lambda i: stats["accuracy"][i])  # the one-hot cell's index
    return classes[cell % len(classes)]  # row-major (true, predicted): the predicted class


# `tunelab eval` of a classifier: accuracy, macro-F1 and the confusion matrix, against the base (the same base
# with an untrained head) and the majority class
CLASS_PREDICTIONS = Evaluation(
    records="labeled", collate=collate_labeled, metrics=_class_metrics, unit_stats=classify,
    baseline=majority_class, describe=_describe, confusion="accuracy",
)

OBJECTIVE = Objective(
    name="classification", config_class=ClassificationSettings, loss_sum=classification_loss_sum,
    count_units=count_sequences, units="examples", records="labeled", num_labels=PER_CLASS,
    summary="sequence classification: cross-entropy of a k-class head on {text, label} records",
    collate=collate_labeled, metrics=("accuracy", "macro_f1"), derive=macro_f1, refuses={"packing": PACKING},
    base_figures_uncached=NEW_HEAD,
    evaluation=CLASS_PREDICTIONS,
)
