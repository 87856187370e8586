"""Paired bootstrap confidence intervals for the difference of a metric between two systems on the same examples.

Koehn (2004), "Statistical Significance Tests for Machine Translation Evaluation": draw B resamples of the
example indices with replacement; on each, score both systems on the *same* resampled examples and take the
difference. The 2.5th and 97.5th percentiles of those B differences are the 95% interval (percentile method).
Pairing matters: the examples' difficulty is shared by both systems, so the interval is far narrower than one
built from two independent intervals.

Hand-written rather than taken from sacrebleu's paired_bs: that one works on BLEU/chrF/TER systems only, and
tunelab needs the same interval for loss, ROUGE, exact match, accuracy and user metrics alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.metrics import Metric


@dataclass(frozen=True)
class Interval:
    delta: float  # metric(a) - metric(b) on all examples
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence}


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) example indices; the same draw serves every metric, so their intervals agree."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_interval(metric: Metric, stats_a: np.ndarray, stats_b: np.ndarray, indices: np.ndarray,
                    confidence: float = 0.95) -> Interval:
    """Interval of metric(a) - metric(b). ``stats_*``: (n, k) per-example statistics, row i the same example."""
    if stats_a.shape != stats_b.shape:
        raise ValueError(f"paired statistics must align: {stats_a.shape} vs {stats_b.shape}")
    delta = metric.score(stats_a.sum(0)) - metric.score(stats_b.sum(0))
    sums_a = stats_a[indices].sum(axis=1)  # (B, k): each resample's summed statistics
    sums_b = stats_b[indices].sum(axis=1)
    deltas = np.array([metric.score(a) - metric.score(b) for a, b in zip(sums_a, sums_b)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Interval(float(delta), float(low), float(high), confidence)


def wins_losses_ties(scores_a: np.ndarray, scores_b: np.ndarray, higher_is_better: bool,
                     tolerance: float = 1e-9) -> dict[str, int]:
    """Per example: does system a beat b on this metric? (a tie within ``tolerance``)."""
    diff = (scores_a - scores_b) * (1 if higher_is_better else -1)
    return {"wins": int((diff > tolerance).sum()), "losses": int((diff < -tolerance).sum()),
            "ties": int((np.abs(diff) <= tolerance).sum())}
