"""Metrics equal their libraries on fixed inputs; the paired bootstrap interval covers the true delta at about
its stated rate; classification metrics and user metrics behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunelab.errors import ConfigError
from tunelab.eval.bootstrap import paired_interval, resample_indices, wins_losses_ties
from tunelab.metrics import (Classification, Metric, Normalization, accuracy, macro_f1, resolve_metrics,
                                  score_all, _mean)

PREDICTIONS = ["The cat sat on the mat.", "a quick brown fox", "json.dumps returns a string", "", "Hello, World!"]
REFERENCES = ["the cat is on the mat", "the quick brown fox jumps", "json.dumps serialises obj to a JSON str",
              "nothing", "hello world"]


def _stats(metric: Metric) -> np.ndarray:
    return np.array([metric.example_stats(p, r) for p, r in zip(PREDICTIONS, REFERENCES)], dtype=float)


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores() -> None:
    bleu, chrf = resolve_metrics(["bleu", "chrf"])
    assert score_all(bleu, _stats(bleu)) == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert score_all(chrf, _stats(chrf)) == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert score_all(bleu, _stats(bleu)) > 0  # the inputs share n-grams: not a trivial zero


def test_rouge_equals_rouge_score_means() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    for name, kind in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        (metric,) = resolve_metrics([name])
        assert score_all(metric, _stats(metric)) == pytest.approx(np.mean([d[kind].fmeasure for d in direct]), abs=1e-12)


def test_exact_match_normalisation_is_configurable() -> None:
    (default,) = resolve_metrics(["exact_match"])
    assert default.example_stats("Hello,  World!", "hello world")[0] == 1.0
    (strict,) = resolve_metrics(["exact_match"], Normalization(lowercase=False, strip_punctuation=False))
    assert strict.example_stats("Hello,  World!", "hello world")[0] == 0.0
    assert strict.example_stats("Hello  World", "Hello World")[0] == 1.0  # whitespace still collapsed
    assert Normalization(strip_articles=True)("The answer") == "answer"


def test_classification_metrics_from_the_confusion_matrix() -> None:
    confusion = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 3]])
    assert accuracy(confusion) == pytest.approx(8 / 10)
    f1 = [2 * 3 / (6 + 1 + 1), 2 * 2 / (4 + 1 + 0), 2 * 3 / (6 + 0 + 1)]
    assert macro_f1(confusion) == pytest.approx(np.mean(f1))
    cls = Classification(["a", "b"])
    assert cls.cell(1, 0).tolist() == [0, 0, 1, 0]


def test_user_metric_by_module_and_function(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_metrics.py").write_text("def length_ratio(prediction, reference):\n"
                                            "    return len(prediction) / max(len(reference), 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (metric,) = resolve_metrics(["my_metrics:length_ratio"])
    assert score_all(metric, _stats(metric)) == pytest.approx(np.mean([len(p) / len(r) for p, r in zip(PREDICTIONS, REFERENCES)]))
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        resolve_metrics(["my_metrics:nope"])
    with pytest.raises(ConfigError, match="cannot import module"):
        resolve_metrics(["no_such_module_xyz:f"])
    with pytest.raises(ConfigError, match="unknown metric 'rouge'"):
        resolve_metrics(["rouge"])


MEAN = Metric("mean", lambda p, r: (0.0, 1.0), _mean)


def test_paired_interval_covers_the_true_delta_at_about_the_stated_rate() -> None:
    """Synthetic paired scores with a known true delta of 0.1: over 200 independent data sets, the 95%
    interval contains 0.1 in about 95% of them (a binomial band around 0.95 for 200 trials)."""
    rng = np.random.default_rng(1)
    true_delta, trials, n, covered = 0.1, 200, 60, 0
    for trial in range(trials):
        difficulty = rng.normal(0.5, 0.2, n)  # shared by both systems: what pairing removes
        a = difficulty + true_delta + rng.normal(0, 0.1, n)
        b = difficulty + rng.normal(0, 0.1, n)
        ones = np.ones(n)
        interval = paired_interval(MEAN, np.c_[a, ones], np.c_[b, ones], resample_indices(n, 500, trial))
        covered += interval.low <= true_delta <= interval.high
    assert 0.89 <= covered / trials <= 0.99, covered / trials


def test_paired_interval_is_narrower_than_the_spread_of_scores() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.5, 0.3, 100)
    a, b, ones = difficulty + 0.05, difficulty, np.ones(100)
    interval = paired_interval(MEAN, np.c_[a, ones], np.c_[b, ones], resample_indices(100, 300, 0))
    assert interval.delta == pytest.approx(0.05)
    assert interval.high - interval.low < 1e-9  # every example gains exactly 0.05: no uncertainty left


def test_wins_losses_ties_respect_the_metric_direction() -> None:
    a, b = np.array([1.0, 0.5, 0.2, 0.2]), np.array([0.5, 1.0, 0.2, 0.1])
    assert wins_losses_ties(a, b, higher_is_better=True) == {"wins": 2, "losses": 1, "ties": 1}
    assert wins_losses_ties(a, b, higher_is_better=False) == {"wins": 1, "losses": 2, "ties": 1}
