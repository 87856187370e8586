"""Task metrics as *sufficient statistics*: each example yields a short vector of numbers, and a metric's score is
a function of the sum of those vectors over any set of examples.

That one shape serves three needs at once:
- streaming: an evaluation keeps a few numbers per example (never texts or logits), whatever the set's size;
- corpus-level metrics computed exactly as their libraries do: BLEU and chrF sum n-gram counts over the corpus
  before taking ratios (sacrebleu's own statistics are used, so the scores equal ``sacrebleu.corpus_bleu``);
- the paired bootstrap: a resample is a re-weighted sum of the same vectors, so any metric gets a confidence
  interval by recomputing ``score`` on resampled sums.

Generation metrics follow their libraries' scales: BLEU and chrF 0-100 (sacrebleu), ROUGE F-measures 0-1
(rouge-score), exact match 0-1.
"""

from __future__ import annotations

import importlib
import math
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from tunelab.errors import ConfigError


@dataclass
class Metric:
    """``example_stats(prediction, reference)`` -> a vector; ``score(summed vector)`` -> the metric."""

    name: str
    example_stats: Callable[[str, str], Sequence[float]]
    score: Callable[[np.ndarray], float]
    higher_is_better: bool = True


# ---------------------------------------------------------------- exact match


@dataclass(frozen=True)
class Normalization:
    """How predictions and references are normalised before exact match (all on by default, as in SQuAD)."""

    lowercase: bool = True
    strip_punctuation: bool = True
    collapse_whitespace: bool = True
    strip_articles: bool = False  # English 'a', 'an', 'the' (SQuAD's rule); off by default: not language-neutral

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = "".join(ch for ch in text if ch not in _PUNCTUATION)
        if self.strip_articles:
            text = re.sub(r"\b(a|an|the)\b", " ", text)
        if self.collapse_whitespace:
            text = " ".join(text.split())
        return text


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(normalization: Normalization = Normalization()) -> Metric:
    return Metric("exact_match", lambda p, r: (float(normalization(p) == normalization(r)), 1.0), _mean)


def _mean(total: np.ndarray) -> float:
    return float(total[0] / total[1]) if total[1] else 0.0


# ---------------------------------------------------------------- sacrebleu and rouge-score


def bleu() -> Metric:
    from sacrebleu.metrics import BLEU

    scorer = BLEU()
    # Per-example statistics are sacrebleu's own (lengths, n-gram matches and totals); the corpus score is
    # computed by sacrebleu from their sum, which is exactly what corpus_bleu does.
    return Metric("bleu", lambda p, r: scorer._extract_corpus_statistics([p], [[r]])[0],
                  lambda total: float(scorer._compute_score_from_stats([int(x) for x in total]).score))


def chrf() -> Metric:
    from sacrebleu.metrics import CHRF

    scorer = CHRF()
    return Metric("chrf", lambda p, r: scorer._extract_corpus_statistics([p], [[r]])[0],
                  lambda total: float(scorer._compute_score_from_stats([int(x) for x in total]).score))


def rouge(kind: str) -> Metric:
    """ROUGE-1, ROUGE-2 or ROUGE-L F-measure of each example (rouge-score, with stemming), averaged."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    name = {"rouge1": "rouge_1", "rouge2": "rouge_2", "rougeL": "rouge_l"}[kind]
    # rouge_scorer.score(target, prediction): the reference comes first.
    return Metric(name, lambda p, r: (scorer.score(r, p)[kind].fmeasure, 1.0), _mean)


# ---------------------------------------------------------------- loss (from per-example sums)


def loss_metrics() -> list[Metric]:
    """Token-weighted loss and perplexity: stats are (summed token loss, supervised tokens) per example."""
    return [Metric("loss", _no_text, _mean, higher_is_better=False),
            Metric("perplexity", _no_text, lambda total: math.exp(min(_mean(total), 50.0)), higher_is_better=False)]


def _no_text(prediction: str, reference: str) -> Sequence[float]:
    raise TypeError("loss statistics come from the model's forward pass, not from texts")


# ---------------------------------------------------------------- a model's per-unit figure (from its forward pass)


def unit_mean(name: str, higher_is_better: bool = True) -> Metric:
    """The mean of a figure a model gives each unit (a pair's ranking, its margin): stats are (value, 1) per unit,
    computed by the objective's evaluation, not from texts."""
    return Metric(name, _from_the_model, _mean, higher_is_better=higher_is_better)


def _from_the_model(prediction: str, reference: str) -> Sequence[float]:
    raise TypeError("this metric's statistics come from the model's forward pass (the objective's evaluation)")


# ---------------------------------------------------------------- classification (from predicted label indices)


@dataclass
class Classification:
    """Accuracy, macro-F1 and the confusion matrix over fixed labels. Stats: the one-hot (true, predicted) cell,
    so the summed vector is the confusion matrix itself."""

    labels: list[str]
    metrics: list[Metric] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.labels)
        self.metrics = [Metric("accuracy", self._no_text, lambda t: accuracy(t.reshape(n, n))),
                        Metric("macro_f1", self._no_text, lambda t: macro_f1(t.reshape(n, n)))]

    def cell(self, true: int, predicted: int) -> np.ndarray:
        stats = np.zeros(len(self.labels) ** 2)
        stats[true * len(self.labels) + predicted] = 1.0
        return stats

    @staticmethod
    def _no_text(prediction: str, reference: str) -> Sequence[float]:
        raise TypeError("classification statistics come from label scoring")


def accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def macro_f1(confusion: np.ndarray) -> float:
    """Mean over labels of F1 = 2TP / (2TP + FP + FN); a label absent from both truth and predictions is skipped
    (its F1 is undefined), as scikit-learn does with ``labels`` limited to those present."""
    scores = []
    for k in range(confusion.shape[0]):
        tp = confusion[k, k]
        fp = confusion[:, k].sum() - tp
        fn = confusion[k, :].sum() - tp
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


# ---------------------------------------------------------------- the registry and user metrics

GENERATION_METRICS: dict[str, Callable[[], Metric]] = {
    "exact_match": exact_match, "bleu": bleu, "chrf": chrf,
    "rouge_1": lambda: rouge("rouge1"), "rouge_2": lambda: rouge("rouge2"), "rouge_l": lambda: rouge("rougeL"),
}
DEFAULT_GENERATION_METRICS = ["exact_match", "rouge_l"]


def user_metric(path: str) -> Metric:
    """A metric given as 'module:function'. The function takes (prediction, reference) and returns a number (the
    example's score; the metric is their mean) or a dict with 'score' and optionally 'higher_is_better'."""
    module_name, _, function_name = path.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"metric {path!r}: expected a built-in name ({', '.join(GENERATION_METRICS)}) or "
                          "'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except ImportError as exc:
        raise ConfigError(f"metric {path!r}: cannot import module {module_name!r} ({exc})") from None
    except AttributeError:
        raise ConfigError(f"metric {path!r}: module {module_name!r} has no function {function_name!r}") from None
    if not callable(function):
        raise ConfigError(f"metric {path!r}: {function_name!r} is not a function")

    def stats(prediction: str, reference: str) -> Sequence[float]:
        value = function(prediction, reference)
        value = value["score"] if isinstance(value, dict) else value
        try:
            return (float(value), 1.0)
        except (TypeError, ValueError):
            raise ConfigError(f"metric {path!r} returned {value!r}; expected a number") from None

    return Metric(path, stats, _mean, higher_is_better=bool(getattr(function, "higher_is_better", True)))


def resolve_metrics(names: Sequence[str], normalization: Normalization = Normalization()) -> list[Metric]:
    """Built-in generation metrics by name, user metrics by 'module:function'."""
    resolved = []
    for name in names:
        if name == "exact_match":
            resolved.append(exact_match(normalization))
        elif name in GENERATION_METRICS:
            resolved.append(GENERATION_METRICS[name]())
        elif ":" in name:
            resolved.append(user_metric(name))
        else:
            raise ConfigError(f"unknown metric {name!r}: expected one of {', '.join(GENERATION_METRICS)}, or a "
                              "user metric as 'module:function'")
    return resolved


def score_all(metric: Metric, stats: np.ndarray) -> float:
    """The metric over every example: ``stats`` is (examples, k)."""
    return metric.score(stats.sum(axis=0))


def example_scores(metric: Metric, stats: np.ndarray) -> np.ndarray:
    """Each example's own score, for wins/losses and the biggest changes: (examples,)."""
    return np.array([metric.score(row) for row in stats])


def as_row(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)
