"""`tunelab eval RUN --data FILE --against base` for runs whose objective declares its own evaluation, on the tiny
model: a DPO policy and a reward model rank held-out pairs (against the base and chance), a classifier predicts
held-out classes (against the base's untrained head and the majority class), each metric with paired bootstrap
intervals in the same report files as SFT evaluations. Negative control: swapping chosen and rejected flips every
system's ranking. The base's ranking is recomputed independently with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.preference import toy_pair_texts
from support.runs import tiny_run_config
from support.tiny import write_jsonl
from support.labeled import classification_config, toy_labeled
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.config import ConfigError, DataConfig
from tunelab.data import IGNORE
from tunelab.data.formats import DataError, load_file
from tunelab.data.prepare import tokenized_sides
from tunelab.eval.runner import EvalSettings, evaluate
from tunelab.runs import read_metrics
from tunelab.training import train

SETTINGS = EvalSettings(resamples=200)
_RUNS: dict[str, Path] = {}


def _pairs(path: Path, start: int, n: int, swap: bool = False) -> Path:
    rows = [{"prompt": p, "chosen": r if swap else c, "rejected": c if swap else r} for p, c, r in toy_pair_texts(start, n)]
    return write_jsonl(path, rows)


def _run(name: str, tiny_model_dir: Path, root: Path) -> Path:
    """The tiny runs, trained once per session: a DPO policy, a reward model, a classifier."""
    if name not in _RUNS:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        quiet = {"num_samples": 0, "forgetting": False, "before_after": False}
        if name == "classifier":
            config = classification_config(tiny_model_dir, folder, name, training={"max_steps": 40, "learning_rate": 1e-2})
        else:
            objective = {"name": "dpo", "beta": 0.5} if name == "policy" else {"name": "reward"}
            config = tiny_run_config(tiny_model_dir, folder, _pairs(folder / "pairs.jsonl", 0, 40),
                                     objective=objective, technique={"name": "lora", "r": 4, "dropout": 0.0},
                                     training={"max_steps": 30, "learning_rate": 1e-2 if name == "policy" else 3e-3},
                                     eval=quiet, output={"dir": str(folder / name)})
        _RUNS[name] = train(config, progress=False).run_dir
    return _RUNS[name]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("objective-runs")


def _scores(report: dict[str, Any], metric: str) -> dict[str, float]:
    return report["metrics"][metric]["scores"]


def _comparison(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(c for c in report["comparisons"] if c["against"].startswith(prefix))


def test_a_dpo_policy_ranks_held_out_pairs_better_than_its_base(tiny_model_dir: Path, runs_root: Path,
                                                                tmp_path: Path) -> None:
    run = _run("policy", tiny_model_dir, runs_root)
    report = evaluate(run, [_pairs(tmp_path / "heldout.jsonl", 100, 24)], ["base"], output=tmp_path / "out",
                      settings=SETTINGS)
    names = [s["name"] for s in report["systems"]]
    assert names[0] == "policy" and names[1].startswith("base (") and names[2] == "chance"
    assert report["primary_metric"] == "preference_accuracy" and report["objective"]["baseline"] == "chance"
    accuracy, margin = _scores(report, "preference_accuracy"), _scores(report, "logp_margin")
    assert accuracy["chance"] == 0.5 and margin["chance"] == 0.0
    assert accuracy["policy"] > accuracy[names[1]] and margin["policy"] > margin[names[1]] + 1.0
    against_base = _comparison(report, "base")["metrics"]["logp_margin"]
    assert against_base["ci_low"] > 0 and against_base["verdict"] == "better"
    assert {"preference_accuracy", "logp_margin"} == set(_comparison(report, "chance")["metrics"])
    # The same report files as an SFT evaluation, one prediction line per pair with each system's verdict.
    out = tmp_path / "out"
    assert {"eval.json", "report.md", "report.html", "predictions.jsonl"} <= {p.name for p in out.iterdir()}
    assert "preference_accuracy" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["outputs"]["policy"].split()[0] in ("chosen", "rejected")


def test_swapping_chosen_and_rejected_flips_every_ranking(tiny_model_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    """The negative control: the same pairs with their sides swapped give 1 - accuracy and minus the margin."""
    run = _run("policy", tiny_model_dir, runs_root)
    straight = evaluate(run, [_pairs(tmp_path / "a.jsonl", 100, 24)], ["base"], output=tmp_path / "a", settings=SETTINGS)
    swapped = evaluate(run, [_pairs(tmp_path / "b.jsonl", 100, 24, swap=True)], ["base"], output=tmp_path / "b",
                       settings=SETTINGS)
    for system in [s["name"] for s in straight["systems"]][:2]:
        assert _scores(swapped, "preference_accuracy")[system] == pytest.approx(1 - _scores(straight, "preference_accuracy")[system])
        assert _scores(swapped, "logp_margin")[system] == pytest.approx(-_scores(straight, "logp_margin")[system], abs=1e-4)
    assert _scores(straight, "preference_accuracy")["policy"] > 0.5 > _scores(swapped, "preference_accuracy")["policy"]


def test_the_base_ranking_equals_plain_transformers(tiny_model_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    """Each pair's base margin is log p(chosen | prompt) - log p(rejected | prompt), summed over the answer's tokens,
    recomputed here with a plain causal LM on the pairs as training tokenizes them."""
    run = _run("policy", tiny_model_dir, runs_root)
    data = _pairs(tmp_path / "heldout.jsonl", 100, 6)
    report = evaluate(run, [data], ["base"], output=tmp_path / "out", settings=SETTINGS)
    base_name = report["systems"][1]["name"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row, example in zip(rows, load_file(data).examples):
        sides = dict(tokenized_sides(example, tokenizer, DataConfig(train=[str(data)], max_length=64)))
        logps = [_answer_logp(model, sides[name]) for name in ("chosen", "rejected")]
        assert row["stats"][base_name]["logp_margin"][0] == pytest.approx(logps[0] - logps[1], abs=1e-3)
        assert row["stats"][base_name]["preference_accuracy"][0] == float(logps[0] > logps[1])


def _answer_logp(model: Any, side: Any) -> float:
    ids = torch.tensor([side.input_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    labels = torch.tensor(side.labels)
    keep = labels[1:] != IGNORE  # position t predicts token t + 1
    return logps[:-1][keep].gather(1, labels[1:][keep][:, None]).sum().item()


def test_a_reward_model_ranks_held_out_pairs_better_than_chance(tiny_model_dir: Path, runs_root: Path,
                                                                tmp_path: Path) -> None:
    run = _run("reward", tiny_model_dir, runs_root)
    report = evaluate(run, [_pairs(tmp_path / "heldout.jsonl", 100, 30)], ["base"], output=tmp_path / "out",
                      settings=SETTINGS)
    assert report["primary_metric"] == "pairwise_accuracy"
    accuracy = _scores(report, "pairwise_accuracy")
    assert accuracy["reward"] > 0.9 and accuracy["chance"] == 0.5
    against_chance = _comparison(report, "chance")["metrics"]["pairwise_accuracy"]
    assert against_chance["ci_low"] > 0 and against_chance["delta"] == pytest.approx(accuracy["reward"] - 0.5)
    swapped = evaluate(run, [_pairs(tmp_path / "swapped.jsonl", 100, 30, swap=True)], ["base"],
                       output=tmp_path / "swapped", settings=SETTINGS)
    for system in [s["name"] for s in report["systems"]][:2]:  # the base's untrained head is drawn the same way
        assert _scores(swapped, "pairwise_accuracy")[system] == pytest.approx(1 - accuracy[system])


def test_a_classifier_is_compared_with_its_base_and_the_majority_class(tiny_model_dir: Path, runs_root: Path,
                                                                      tmp_path: Path) -> None:
    run = _run("classifier", tiny_model_dir, runs_root)
    held_out = [r for r in toy_labeled(96)[48:] if r["label"] != "fox"][:20] + toy_labeled(96)[48:][-4:]
    data = write_jsonl(tmp_path / "heldout.jsonl", held_out)
    report = evaluate(run, [data], ["base"], output=tmp_path / "out", settings=SETTINGS)
    truth = [r["label"] for r in held_out]
    majority = max(["cat", "dog", "fox"], key=truth.count)
    names = [s["name"] for s in report["systems"]]
    assert names[-1] == f"majority class ({majority})" and report["objective"]["baseline"] == names[-1]
    accuracy = _scores(report, "accuracy")
    assert accuracy["classifier"] == 1.0 and _scores(report, "macro_f1")["classifier"] == 1.0
    assert accuracy[names[-1]] == pytest.approx(truth.count(majority) / len(truth))
    labels = report["classification"]["labels"]
    assert labels == ["cat", "dog", "fox"]
    # Confusion rows are the true class, columns the predicted one: the majority rule fills one column.
    baseline = report["classification"]["confusion"][names[-1]]
    assert [row[labels.index(majority)] for row in baseline] == [truth.count(label) for label in labels]
    assert report["classification"]["confusion"]["classifier"] == [[truth.count(label) * (i == j) for j in range(3)]
                                                                    for i, label in enumerate(labels)]
    assert _comparison(report, "majority")["metrics"]["accuracy"]["ci_low"] > 0
    assert "macro_f1" in _comparison(report, "base")["metrics"]


def test_data_the_evaluation_cannot_read_is_refused_at_its_line(tiny_model_dir: Path, runs_root: Path,
                                                              tmp_path: Path) -> None:
    policy, classifier = _run("policy", tiny_model_dir, runs_root), _run("classifier", tiny_model_dir, runs_root)
    pairs = _pairs(tmp_path / "pairs.jsonl", 100, 4)
    labeled = write_jsonl(tmp_path / "labeled.jsonl", [{"text": "the cat", "label": "cat"}, {"text": "an owl", "label": "owl"}])
    with pytest.raises(DataError, match=r"labeled\.jsonl:2: label 'owl' is not one of the classes"):
        evaluate(classifier, [labeled], output=tmp_path / "a", settings=SETTINGS)
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: a preference record, but this evaluation reads labeled"):
        evaluate(classifier, [pairs], output=tmp_path / "b", settings=SETTINGS)
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: a preference record, but this target is evaluated on SFT"):
        evaluate(tiny_model_dir, [pairs], output=tmp_path / "c", settings=SETTINGS)
    with pytest.raises(ConfigError, match=r"--labels: a dpo run is scored by its objective's own metrics"):
        evaluate(policy, [pairs], output=tmp_path / "d", settings=EvalSettings(labels=["a", "b"]))


def test_an_objective_figure_chooses_the_best_checkpoint_and_stops_early(tiny_model_dir: Path, tmp_path: Path) -> None:
    """training.best_metric may be a figure the objective logs (macro-F1 here): maximised under best_mode auto, it
    picks the evaluation with the highest macro-F1 and stops once it no longer rises."""
    config = classification_config(tiny_model_dir, tmp_path, training={
        "max_steps": 40, "eval_every": 4, "learning_rate": 1e-2, "best_metric": "macro_f1",
        "early_stopping_patience": 2})
    result = train(config, progress=False)
    evals = [m for m in read_metrics(result.run_dir) if m["kind"] == "eval"]
    scores = [m["macro_f1"] for m in evals]
    best = evals[scores.index(max(scores))]  # the first evaluation with the highest macro-F1
    assert min(scores) < max(scores)  # a control: the evaluations differ, so the direction is tested
    assert result.evaluation["weights_from_step"] == best["step"]
    assert result.status == "early_stopped" and evals[-1]["step"] == best["step"] + 8


def test_best_metric_must_be_computed_by_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl", 0, 8)
    config = tiny_run_config(tiny_model_dir, tmp_path, pairs, objective={"name": "dpo"},
                             training={"best_metric": "preference_accuracy"})
    assert config.training.best_metric == "preference_accuracy"
    with pytest.raises(Exception, match=r"training.best_metric 'preference_accuracy' is not computed: use one of "
                                        r"loss, perplexity"):
        tiny_run_config(tiny_model_dir, tmp_path, training={"best_metric": "preference_accuracy"})  # an SFT run


def test_the_command_prints_the_classifier_against_its_base_and_the_majority_class(tiny_model_dir: Path,
                                                                                  runs_root: Path, tmp_path: Path) -> None:
    from support.cli import invoke

    run = _run("classifier", tiny_model_dir, runs_root)
    data = write_jsonl(tmp_path / "heldout.jsonl", toy_labeled(60)[48:])
    result = invoke("eval", run, "--data", data, "--against", "base", "--no-progress", "--resamples", "50",
                    "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "classifier - base (" in result.clean and "classifier - majority class (" in result.clean
    assert "macro_f1" in result.clean and "Confusion matrix of classifier" in (tmp_path / "out" / "report.md").read_text()
    refused = invoke("eval", run, "--data", data, "--labels", "cat,dog", "--output", tmp_path / "other")
    assert refused.exit_code == 2 and "--labels: a classification run is scored by its objective" in refused.clean


def test_a_classifier_saved_before_its_adapter_carried_its_classes_is_read_with_the_run_s_list(
        tiny_model_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    """A run saved before adapter folders carried head_config.json: its held-out labels are still read against the
    run's own class list (data_report.json), not the LABEL_k names PEFT's reload gives."""
    import shutil

    old = tmp_path / "classifier"
    shutil.copytree(_run("classifier", tiny_model_dir, runs_root), old)
    (head_config := next(old.rglob("head_config.json"))).unlink()
    assert not head_config.exists()
    held_out = write_jsonl(tmp_path / "heldout.jsonl", toy_labeled(96)[48:60])
    report = evaluate(old, [held_out], output=tmp_path / "out", settings=SETTINGS)
    assert report["classification"]["labels"] == ["cat", "dog", "fox"] and _scores(report, "accuracy")["classifier"] == 1.0


def test_an_adapter_with_a_score_head_given_alone_is_refused_with_its_run_folder_named(
        tiny_model_dir: Path, runs_root: Path, tmp_path: Path) -> None:
    """A classifier's adapter folder copied out of its run holds a score head but not the objective that scores
    it: it is refused, naming the run folder to give instead, rather than evaluated as a language model."""
    import shutil

    alone = tmp_path / "adapter-alone"
    shutil.copytree(_run("classifier", tiny_model_dir, runs_root) / "adapter", alone)
    held_out = write_jsonl(tmp_path / "heldout.jsonl", toy_labeled(60)[48:])
    for target, adapter in ((alone, None), (tiny_model_dir, alone)):
        with pytest.raises(ConfigError, match=r"score head of 3 outputs.*give the run folder"):
            evaluate(target, [held_out], output=tmp_path / "out", settings=SETTINGS, adapter=adapter)
    assert not (tmp_path / "out").exists()


def test_a_ranking_is_described_as_it_is_and_chance_ranks_neither_answer_first() -> None:
    """The per-pair cell of `tunelab eval`'s improved/worsened tables: chance (0.5 a pair, no margin) and an exact
    tie rank neither answer first; chance used to read 'chosen ranked first (log-prob margin +0.000)'."""
    from tunelab.objectives.preference import chance, describe_ranking

    describe = describe_ranking("preference_accuracy", "logp_margin", "log-prob")
    _, baseline = chance("preference_accuracy", "logp_margin")({"input_ids": torch.zeros(2, 3)}, [])
    per_pair = {name: values[0].tolist() for name, values in baseline.items()}  # one pair's (value, weight)
    assert describe(per_pair, []) == "neither ranked first (log-prob margin +0.000)"
    assert describe({"preference_accuracy": [1.0], "logp_margin": [2.5]}, []) == "chosen ranked first (log-prob margin +2.500)"
    assert describe({"preference_accuracy": [0.0], "logp_margin": [-1.0]}, []) == "rejected ranked first (log-prob margin -1.000)"
