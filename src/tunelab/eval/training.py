"""Evaluation inside the training loop: task metrics every N steps, the best-checkpoint rule on any metric,
and the overfitting signal (the trend of the gap between validation and training loss)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tunelab.eval.bootstrap import paired_interval, resample_indices, wins_losses_ties
from tunelab.metrics import Metric, example_scores, resolve_metrics

LOSS_METRICS = {"loss": False, "perplexity": False}  # name -> higher is better


def metric_direction(name: str, mode: str, objective_metrics: tuple[str, ...] = ()) -> bool:
    """True when higher is better for ``name`` under ``mode`` ('auto' asks the metric itself; a figure the
    objective logs, ``objective_metrics``, is maximised: accuracy, macro-F1, preference accuracy...)."""
    if mode != "auto":
        return mode == "max"
    if name in LOSS_METRICS:
        return LOSS_METRICS[name]
    if name in objective_metrics:
        return True
    (metric,) = resolve_metrics([name])
    return metric.higher_is_better


def is_better(result: dict[str, Any], best: dict[str, Any] | None, name: str, higher_is_better: bool) -> bool:
    if best is None or best.get(name) is None:
        return True
    return result[name] > best[name] if higher_is_better else result[name] < best[name]


def sample_scores(names: list[str], outputs: list[str], references: list[str]) -> dict[str, float]:
    """Generation metrics of ``outputs`` against ``references`` (the eval samples)."""
    scores = {}
    for metric in resolve_metrics(names):
        stats = np.array([metric.example_stats(o, r) for o, r in zip(outputs, references)], dtype=float)
        scores[metric.name] = round(metric.score(stats.sum(0)), 6) if len(stats) else None
    return scores


def compare_samples(names: list[str], base: list[str], tuned: list[str], references: list[str],
                    resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each generation metric for base and tuned, the delta with its paired bootstrap 95% interval, and
    wins/losses/ties: the before/after table's task metrics."""
    if not references:
        return {}
    indices = resample_indices(len(references), resamples, seed)
    result = {}
    for metric in resolve_metrics(names):
        a = _stats(metric, tuned, references)
        b = _stats(metric, base, references)
        interval = paired_interval(metric, a, b, indices)
        result[metric.name] = {"base": metric.score(b.sum(0)), "tuned": metric.score(a.sum(0)), **interval.as_dict(),
                               **wins_losses_ties(example_scores(metric, a), example_scores(metric, b),
                                                  metric.higher_is_better),
                               "higher_is_better": metric.higher_is_better, "examples": len(references)}
    return result


def _stats(metric: Metric, outputs: list[str], references: list[str]) -> np.ndarray:
    return np.array([metric.example_stats(o, r) for o, r in zip(outputs, references)], dtype=float)


class OverfittingSignal:
    """gap = validation loss - mean training loss since the previous evaluation. A gap that keeps widening
    while the training loss falls is the classic sign of overfitting; ``trend`` is the least-squares slope of
    the last ``window`` gaps (loss per evaluation), so one noisy evaluation does not raise the alarm."""

    def __init__(self, gaps: list[float] | None = None, window: int = 4,
                 train_losses: list[float] | None = None) -> None:
        self.gaps = list(gaps or [])
        self.window = window
        self._train_losses: list[float] = list(train_losses or [])

    @property
    def pending(self) -> list[float]:
        """The training losses since the last evaluation (a checkpoint keeps them: a run resumed between two
        evaluations then measures the same window as the uninterrupted one)."""
        return list(self._train_losses)

    def observe_train(self, loss: float) -> None:
        self._train_losses.append(loss)

    def update(self, validation_loss: float) -> dict[str, Any]:
        if not self._train_losses:
            return {}
        train = float(np.mean(self._train_losses))
        self._train_losses = []
        self.gaps.append(round(validation_loss - train, 6))
        recent = self.gaps[-self.window:]
        trend = float(np.polyfit(np.arange(len(recent)), recent, 1)[0]) if len(recent) >= 3 else None
        return {"train_loss_window": round(train, 6), "gap": self.gaps[-1],
                "gap_trend": None if trend is None else round(trend, 6),
                "overfitting": bool(trend is not None and trend > 0 and self.gaps[-1] > 0)}


def progress_note(record: dict[str, Any], best_metric: str) -> str:
    """The progress bar's evaluation column: validation loss, the chosen metric, and the gap with its trend."""
    parts = [f"val {record['loss']:.4f}"]
    if best_metric not in ("loss", "perplexity") and record.get(best_metric) is not None:
        parts.append(f"{best_metric} {record[best_metric]:.3f}")
    if "gap" in record:
        arrow = "" if record.get("gap_trend") is None else ("↑" if record["gap_trend"] > 0 else "↓")
        parts.append(f"gap {record['gap']:+.3f}{arrow}")
        if record.get("overfitting"):
            parts.append("overfitting?")
    return "  ".join(parts)
