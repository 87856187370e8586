"""`tunelab eval` end to end on tiny runs: the report files, predictions that recompute the metrics, comparison
with the base and with another run, classification by label scoring, and flat memory."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import ANIMALS, toy_chat_records, write_jsonl
from rouge_score import rouge_scorer
from test_trainer import make_config
from typer.testing import CliRunner

from tunelab import trainer
from tunelab.cli import app
from tunelab.errors import ConfigError
from tunelab.eval.runner import EvalSettings, evaluate


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small LoRA runs on the toy task (different seeds and lengths), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("eval-runs")
    data = write_jsonl(root / "train.jsonl", toy_chat_records(48))
    found = {}
    for name, steps, seed in (("a", 12, 1), ("b", 4, 2)):
        config = make_config(tiny_model_dir, root, data=data, training={"max_steps": steps, "seed": seed},
                             output={"dir": str(root / name)})
        config.data.cache = False  # a module-scoped fixture: no per-test cache folder
        found[name] = trainer.train(config, progress=False).run_dir
    found["test"] = write_jsonl(root / "test.jsonl", toy_chat_records(60)[48:])
    return found


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.remote: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href") and value and not value.startswith("#"):
                self.remote.append(value)
        if tag in ("script", "link", "img", "iframe"):
            self.remote.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_eval_against_base_and_another_run_writes_every_report(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", str(runs["a"]), "--data", str(runs["test"]), "--against", "base",
                                      "--against", str(runs["b"]), "--output", str(out), "--max-new-tokens", "6",
                                      "--resamples", "200", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    names = [s["name"] for s in report["systems"]]
    assert names[0] == "a" and names[1].startswith("base (") and names[2] == "b"
    assert {"loss", "perplexity", "exact_match", "bleu", "chrf", "rouge_1", "rouge_2", "rouge_l"} <= set(report["metrics"])
    assert [c["against"] for c in report["comparisons"]] == names[1:]
    for comparison in report["comparisons"]:
        for metric, c in comparison["metrics"].items():
            assert c["ci_low"] <= c["delta"] + 1e-9 and c["delta"] <= c["ci_high"] + 1e-9, metric
            assert c["wins"] + c["losses"] + c["ties"] == report["examples"] == 12
    # The trained run has a lower loss than the base on its own task, and says so with a clear verdict.
    vs_base = report["comparisons"][0]["metrics"]["loss"]
    assert vs_base["delta"] < 0 and vs_base["verdict"] == "better"
    # The HTML parses, holds every metric, and references nothing remote.
    html = (out / "report.html").read_text()
    parser = _Collector()
    parser.feed(html)
    assert "svg" in parser.tags and not parser.remote
    text = " ".join(parser.text)
    for metric in report["metrics"]:
        assert metric in text
    markdown = (out / "report.md").read_text()
    assert all(metric in markdown for metric in report["metrics"])
    assert "against" in result.output and "report.html" in result.output


def test_predictions_recompute_the_reported_rouge_l(runs: dict[str, Path], tmp_path: Path) -> None:
    report = evaluate(runs["a"], [runs["test"]], ["base"], output=tmp_path / "r",
                      settings=EvalSettings(metrics=["rouge_l", "exact_match"], max_new_tokens=6, resamples=50))
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["examples"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for system in report["systems"]:
        name = system["name"]
        recomputed = float(np.mean([scorer.score(r["reference"], r["outputs"][name])["rougeL"].fmeasure for r in rows]))
        assert recomputed == pytest.approx(report["metrics"]["rouge_l"]["scores"][name], rel=1e-12, abs=1e-15)
        loss = sum(r["loss"][name]["loss_sum"] for r in rows) / sum(r["loss"][name]["tokens"] for r in rows)
        assert loss == pytest.approx(report["metrics"]["loss"]["scores"][name], rel=1e-12)
    assert any(r["outputs"][report["target"]] for r in rows)  # real generations, not empty strings


def test_eval_output_folder_with_the_users_files_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not written by tunelab eval"):
        evaluate(runs["a"], [runs["test"]], output=tmp_path, settings=EvalSettings(metrics=["exact_match"]))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="has no base"):  # a plain model folder has no base to compare with
        evaluate(_plain_model(runs), [runs["test"]], ["base"], output=tmp_path / "x",
                 settings=EvalSettings(metrics=["exact_match"]))


def _plain_model(runs: dict[str, Path]) -> str:
    import yaml

    return yaml.safe_load((runs["a"] / "config.yaml").read_text())["model"]["name"]


def test_default_output_of_a_run_lives_in_the_run_and_is_tunelabs(runs: dict[str, Path]) -> None:
    from tunelab.runs import foreign_entries

    report = evaluate(runs["b"], [runs["test"]], settings=EvalSettings(metrics=["exact_match"], max_new_tokens=4,
                                                                         resamples=20))
    assert Path(report["output"]) == runs["b"] / "evals" / "test"
    assert (runs["b"] / "evals" / "test" / "report.html").is_file()
    assert foreign_entries(runs["b"]) == []  # the run folder still counts as tunelab's own
