"""`tunelab eval` end to end on tiny runs: the report files, predictions that recompute the metrics, comparison
with the base and with another run, classification by label scoring, and flat memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer
from support.runs import tiny_run_config
from support.tiny import ANIMALS, toy_chat_records, write_jsonl
from typer.testing import CliRunner

from tunelab.training import session
from tunelab.cli import app
from tunelab.data.formats import load_file
from tunelab.data.tokenize import prompt_for_generation
from tunelab.errors import ConfigError
from tunelab.eval.runner import EvalSettings, evaluate
from tunelab.generation import Sampling, generate_texts
from tunelab.metrics import Normalization
from tunelab.result import open_model


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small LoRA runs on the toy task (different seeds and lengths), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("eval-runs")
    data = write_jsonl(root / "train.jsonl", toy_chat_records(48))
    found = {}
    for name, steps, seed in (("a", 12, 1), ("b", 4, 2)):
        config = tiny_run_config(tiny_model_dir, root, data=data, training={"max_steps": steps, "seed": seed},
                             output={"dir": str(root / name)})
        config.data.cache = False  # a module-scoped fixture: no per-test cache folder
        found[name] = session.train(config, progress=False).run_dir
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
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["eval", str(runs["a"]), "--data", str(runs["test"]), "--against", "base",
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
    assert "paired bootstrap 95% interval" in result.output and f"{out}/report.html" in result.output


def test_predictions_recompute_the_reported_rouge_l(runs: dict[str, Path], tmp_path: Path) -> None:
    """predictions.jsonl holds each system's exact output: its metrics and loss recompute to the report's figures.
    The references are the target's own greedy outputs, generated here outside eval's pipeline (open_model and
    generate_texts on the same prompts), so the target's ROUGE-L is well above 0 and a changed prediction changes
    the recomputed score. Against the toy task's references the tiny model scores 0, and any change to the
    predictions kept that 0."""
    opened = open_model(runs["a"], device="cpu")
    examples = load_file(runs["test"]).examples
    prompts = [prompt_for_generation(opened.tokenizer, e)[0] for e in examples]
    if opened.tokenizer.pad_token_id is None:
        opened.tokenizer.pad_token = opened.tokenizer.eos_token  # as eval batches
    offline = generate_texts(opened.model, opened.tokenizer, prompts, Sampling(max_new_tokens=6), 8)
    assert all(re.search(r"[a-z0-9]", text) for text in offline), offline  # ROUGE scores words: each has some
    records = toy_chat_records(60)[48:]
    for record, text in zip(records, offline):
        record["messages"][1]["content"] = text
    own = write_jsonl(tmp_path / "own.jsonl", records)
    report = evaluate(runs["a"], [own], ["base"], output=tmp_path / "r",
                      settings=EvalSettings(metrics=["rouge_l", "exact_match"], max_new_tokens=6, resamples=50))
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["examples"] == len(offline)
    assert [r["outputs"][report["target"]] for r in rows] == offline
    assert report["metrics"]["rouge_l"]["scores"][report["target"]] == pytest.approx(1.0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for system in report["systems"]:
        name = system["name"]
        recomputed = float(np.mean([scorer.score(r["reference"], r["outputs"][name])["rougeL"].fmeasure for r in rows]))
        assert recomputed == pytest.approx(report["metrics"]["rouge_l"]["scores"][name], rel=1e-12, abs=1e-15)
        same = Normalization()  # exact match's default normalisation
        exact = float(np.mean([same(r["outputs"][name]) == same(r["reference"]) for r in rows]))
        assert exact == pytest.approx(report["metrics"]["exact_match"]["scores"][name], rel=1e-12, abs=1e-15)
        loss = sum(r["loss"][name]["loss_sum"] for r in rows) / sum(r["loss"][name]["tokens"] for r in rows)
        assert loss == pytest.approx(report["metrics"]["loss"]["scores"][name], rel=1e-12)


def test_eval_output_folder_with_the_users_files_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not written by tunelab eval"):
        evaluate(runs["a"], [runs["test"]], output=tmp_path, settings=EvalSettings(metrics=["exact_match"]))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="has no base"):  # a plain model folder has no base to compare with
        evaluate(_plain_model(runs), [runs["test"]], ["base"], output=tmp_path / "x",
                 settings=EvalSettings(metrics=["exact_match"]))


def test_a_training_run_folder_is_refused_as_output_even_with_overwrite(runs: dict[str, Path]) -> None:
    """`--output RUN` once took --overwrite (as its refusal advised) and replaced the run's eval.json, its own
    before/after figures, with the report: a run folder is refused either way, and a subfolder is offered."""
    before = {p.name: p.read_bytes() for p in runs["b"].iterdir() if p.is_file()}
    for extra in ([], ["--overwrite"]):
        result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [
            "eval", str(runs["a"]), "--data", str(runs["test"]), "--output", str(runs["b"]), "--metric", "exact_match",
            "--max-new-tokens", "4", "--resamples", "20", "--no-progress", *extra])
        assert result.exit_code != 0
        flat = " ".join(result.output.split())
        assert "is a training run's folder" in flat and str(runs["b"] / "evals" / "test") in flat, flat
        assert "--overwrite" not in flat  # the advice that destroyed the run's figures
    assert {p.name: p.read_bytes() for p in runs["b"].iterdir() if p.is_file()} == before


@pytest.mark.parametrize("marker", ["record", "legacy"])
def test_a_run_folder_known_by_its_ownership_record_is_refused_as_output(tmp_path: Path, marker: str) -> None:
    """A run folder without its config.yaml is still a run: its ownership record says tunelab train wrote it
    (or an older tunelab's run record marks it). Refused before any model is opened."""
    from tunelab import fs
    from tunelab.runs import WRITER

    run_dir = tmp_path / "run"
    if marker == "record":
        fs.claim(run_dir, WRITER)
        fs.write_entry_json(run_dir, "eval.json", {"base": {"loss": 2.0}, "tuned": {"loss": 1.5}})
    else:
        run_dir.mkdir()
        (run_dir / fs.LEGACY_RUN_RECORD).write_text(json.dumps({"entries": []}))
    with pytest.raises(ConfigError, match="training run's folder") as refused:
        evaluate("no-such-model", [tmp_path / "test.jsonl"], output=run_dir, overwrite=True)
    assert f"a subfolder such as {run_dir / 'evals' / 'test'}," in str(refused.value)


@pytest.mark.parametrize("marker", ["plan", "record"])
def test_a_compare_folder_is_refused_as_output_even_with_overwrite(tmp_path: Path, marker: str) -> None:
    """`--output COMPARE_DIR` (a `tunelab compare --out` folder) replaced the comparison's report.md and report.html:
    its ownership record lists them, so eval's writes looked like tunelab replacing its own files. A compare folder
    (known by its plan, or by its record alone) is refused either way, naming the folder and what it is."""
    from tunelab import fs
    from tunelab.runs import COMPARE_PLAN, COMPARE_WRITER

    compare = tmp_path / "cmp"
    fs.claim(compare, COMPARE_WRITER)
    if marker == "plan":
        fs.write_entry_json(compare, COMPARE_PLAN, {"runs": []})
    fs.write_entry_text(compare, "report.md", "# the comparison")
    fs.write_entry_text(compare, "report.html", "<p>the comparison</p>")
    before = {p.name: p.read_bytes() for p in compare.iterdir()}
    test = write_jsonl(tmp_path / "test.jsonl", toy_chat_records(4))
    for extra in ([], ["--overwrite"]):
        result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [
            "eval", "no-such-model", "--data", str(test), "--output", str(compare), "--no-progress", *extra])
        assert result.exit_code != 0
        flat = " ".join(result.output.split())
        assert f"--output {compare} is a tunelab compare folder" in flat, flat
        assert "report.md and report.html" in flat and "--overwrite" not in flat, flat
    assert {p.name: p.read_bytes() for p in compare.iterdir()} == before


def _plain_model(runs: dict[str, Path]) -> str:
    import yaml

    return yaml.safe_load((runs["a"] / "config.yaml").read_text())["model"]["name"]


def test_default_output_of_a_run_lives_in_the_run_and_is_tunelabs(runs: dict[str, Path]) -> None:
    from tunelab.fs import foreign_entries

    report = evaluate(runs["b"], [runs["test"]], settings=EvalSettings(metrics=["exact_match"], max_new_tokens=4,
                                                                         resamples=20))
    assert Path(report["output"]) == runs["b"] / "evals" / "test"
    assert (runs["b"] / "evals" / "test" / "report.html").is_file()
    assert foreign_entries(runs["b"]) == []  # the run folder still counts as tunelab's own


def _label_records(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"say {ANIMALS[i % len(ANIMALS)]} {i + offset}"},
                          {"role": "assistant", "content": ANIMALS[i % len(ANIMALS)]}]} for i in range(n)]


def test_classification_by_label_scoring_reaches_every_label(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A toy model trained to answer with its label is scored 100% by label log-likelihood; the untrained base
    is not (the control that shows the test can fail)."""
    data = write_jsonl(tmp_path / "train.jsonl", _label_records(96))
    config = tiny_run_config(tiny_model_dir, tmp_path, data=data, technique={"name": "full"},
                         training={"max_steps": 150, "grad_accum": 1, "learning_rate": 3e-3, "warmup_ratio": 0.0})
    run = session.train(config, progress=False).run_dir
    test = write_jsonl(tmp_path / "test.jsonl", _label_records(30, offset=500))
    report = evaluate(run, [test], ["base"], output=tmp_path / "report",
                      settings=EvalSettings(labels=ANIMALS, resamples=100))
    assert report["metrics"]["accuracy"]["scores"][report["target"]] == 1.0
    assert report["metrics"]["macro_f1"]["scores"][report["target"]] == 1.0
    base = report["systems"][1]["name"]
    assert report["metrics"]["accuracy"]["scores"][base] < 0.5
    confusion = report["classification"]["confusion"][report["target"]]
    assert np.trace(confusion) == 30 and np.sum(confusion) == 30
    rows = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["predicted_label"][report["target"]] == r["reference"] for r in rows)
    assert "exact_match" not in report["metrics"]  # labels are scored, not generated and parsed


def test_classification_refuses_a_reference_outside_the_labels(runs: dict[str, Path], tmp_path: Path) -> None:
    from tunelab.errors import DataError

    with pytest.raises(DataError, match=r"test.jsonl:1: the reference answer .* is not one of the labels"):
        evaluate(runs["a"], [runs["test"]], output=tmp_path / "r", settings=EvalSettings(labels=["yes", "no"]))


_MEASURE = """
import json, resource, sys
sys.path.insert(0, {tests!r})
from support.tiny import toy_chat_records, write_jsonl
from pathlib import Path
from tunelab.eval.runner import EvalSettings, evaluate
data = write_jsonl(Path({tmp!r}) / "data-{n}.jsonl", toy_chat_records({n}))
evaluate({model!r}, [data], output=Path({tmp!r}) / "out-{n}",
         settings=EvalSettings(metrics=["rouge_l", "bleu"], max_new_tokens=2, batch_size=16, resamples=10), device="cpu")
print(json.dumps({{"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def test_peak_memory_does_not_grow_with_the_eval_set(tmp_path: Path) -> None:
    """Peak RSS of a whole evaluation (a fresh process each) at 100 and at 1,000 examples, on a tiny model with
    an 8,192-token output head. Keeping each example's logits, even at supervised positions only, would add
    1,000 x ~5 tokens x 8,192 x 4 bytes = ~160 MB; the per-example statistics and texts that are kept add a
    few MB."""
    from support.tiny import build_model, build_tokenizer

    model_dir = tmp_path / "wide-head"
    build_tokenizer(model_dir)
    build_model(model_dir, vocab_size=8192)
    peaks = {}
    for n in (100, 1000):
        script = _MEASURE.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), n=n, model=str(model_dir))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[n] = json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
        assert sum(1 for _ in open(tmp_path / f"out-{n}" / "predictions.jsonl")) == n
    assert peaks[1000] - peaks[100] < 40, peaks


def test_target_as_run_adapter_folder_or_model_plus_adapter_gives_the_same_scores(runs: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    settings = dict(metrics=["rouge_l"], max_new_tokens=4, resamples=20)
    as_run = evaluate(runs["a"], [runs["test"]], output=tmp_path / "run", settings=EvalSettings(**settings))
    as_adapter = evaluate(runs["a"] / "adapter", [runs["test"]], output=tmp_path / "adapter",
                          settings=EvalSettings(**settings))
    plus = evaluate(_plain_model(runs), [runs["test"]], adapter=runs["a"] / "adapter", output=tmp_path / "plus",
                    settings=EvalSettings(**settings))
    scores = [r["metrics"]["loss"]["scores"][r["target"]] for r in (as_run, as_adapter, plus)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6) and scores[0] == pytest.approx(scores[2], rel=1e-6)
    plain = evaluate(_plain_model(runs), [runs["test"]], output=tmp_path / "plain", settings=EvalSettings(**settings))
    assert plain["metrics"]["loss"]["scores"][plain["target"]] != pytest.approx(scores[0], rel=1e-3)


def test_a_missing_run_folder_is_named_not_sent_to_the_hub(runs: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`tunelab eval runs/x` with `runs/` here but no `x` says so (with the runs there), instead of a download hint."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "support-lora").symlink_to(runs["a"], target_is_directory=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    cases = {"runs/support-lor": "no such run, adapter or model folder; did you mean runs/support-lora?",
             "runs/other": "no such run, adapter or model folder; runs in runs: support-lora",
             "empty": "empty: this folder is not a tunelab run (no config.yaml)"}
    for target, expected in cases.items():
        result = CliRunner().invoke(app, ["eval", target, "--data", str(runs["test"])])
        assert result.exit_code != 0, result.output
        flat = " ".join(result.output.split())
        assert expected in flat, flat
        assert "hf download" not in flat


def test_eval_refuses_a_zero_budget_before_it_loads_anything(runs: dict[str, Path]) -> None:
    """--max-new-tokens 0 (or --batch-size 0) is a usage error at once, not a traceback after the model loads."""
    for option in ("--max-new-tokens", "--batch-size", "--max-examples"):
        result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["eval", str(runs["a"]), "--data", str(runs["test"]),
                                                                option, "0"])
        assert result.exit_code == 2 and option in result.output and "greater than or equal to 1" in result.output, result.output


QUICK = dict(metrics=["exact_match"], max_new_tokens=4, resamples=20)


def test_each_comparison_keeps_its_report_and_a_different_one_is_not_replaced(runs: dict[str, Path]) -> None:
    """`--against base` and `--against RUN` on one file keep both reports; a smaller re-run does not silently
    replace the report of a bigger one, and --overwrite does."""
    vs_base = evaluate(runs["a"], [runs["test"]], ["base"], settings=EvalSettings(**QUICK))
    vs_b = evaluate(runs["a"], [runs["test"]], [str(runs["b"])], settings=EvalSettings(**QUICK))
    assert Path(vs_base["output"]) == runs["a"] / "evals" / "test-vs-base"
    assert Path(vs_b["output"]) == runs["a"] / "evals" / "test-vs-b"
    for report in (vs_base, vs_b):
        assert json.loads((Path(report["output"]) / "eval.json").read_text())["systems"] == report["systems"]
    again = evaluate(runs["a"], [runs["test"]], ["base"], settings=EvalSettings(**QUICK))  # the same: replaced
    assert again["output"] == vs_base["output"]
    kept = (Path(vs_base["output"]) / "eval.json").read_text()
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [
        "eval", str(runs["a"]), "--data", str(runs["test"]), "--against", "base", "--metric", "exact_match",
        "--max-new-tokens", "4", "--resamples", "20", "--max-examples", "3", "--no-progress"])
    assert result.exit_code != 0
    flat = " ".join(result.output.split())
    assert "holds the report of another evaluation" in flat and "max_examples None -> 3" in flat, flat
    assert "--overwrite" in flat
    assert (Path(vs_base["output"]) / "eval.json").read_text() == kept
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [
        "eval", str(runs["a"]), "--data", str(runs["test"]), "--against", "base", "--metric", "exact_match",
        "--max-new-tokens", "4", "--resamples", "20", "--max-examples", "3", "--no-progress", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((Path(vs_base["output"]) / "eval.json").read_text())["examples"] == 3
    assert f"report: {vs_base['output']}/report.html" in " ".join(result.output.split())  # says where it went


def test_a_bad_against_is_refused_before_any_evaluation(runs: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.eval import runner

    scored: list[str] = []
    monkeypatch.setattr(runner, "score_system", lambda opened, *a, **k: scored.append(opened.name))
    for bad in (str(runs["a"].parent / "no-such-run"), str(tmp_path)):
        with pytest.raises(ConfigError, match="no such run|not a tunelab run"):
            evaluate(runs["a"], [runs["test"]], ["base", bad], output=tmp_path / "out", settings=EvalSettings(**QUICK))
    assert scored == [], "the target must not be evaluated before every system is checked"


def test_a_failed_evaluation_leaves_no_temporary_file(runs: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.eval import runner

    real = runner.score_system

    def failing_second(opened: object, examples: list, prompts: list, plain_text: bool, metrics: list, settings: EvalSettings,
                       out_path: Path, *rest: object) -> runner.SystemScores:
        if out_path.name == ".system-1.jsonl.tmp":
            out_path.write_text("half\n")
            raise RuntimeError("out of memory")
        return real(opened, examples, prompts, plain_text, metrics, settings, out_path, *rest)

    monkeypatch.setattr(runner, "score_system", failing_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(runs["a"], [runs["test"]], ["base"], output=tmp_path / "out", settings=EvalSettings(**QUICK))
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".system-*"))


def test_the_overall_verdict_names_the_primary_winner_and_the_metrics_that_disagree() -> None:
    from tunelab.eval.runner import overall_verdict
    from tunelab.metrics import Normalization, loss_metrics, resolve_metrics

    metrics = [*loss_metrics(), *resolve_metrics(["chrf", "rouge_l"], Normalization())]
    primary = next(m for m in metrics if m.name == "rouge_l")
    compared = {"loss": {"delta": -0.3, "verdict": "better"}, "perplexity": {"delta": -1.2, "verdict": "better"},
                "chrf": {"delta": -2.0, "verdict": "worse"}, "rouge_l": {"delta": -0.05, "verdict": "no clear difference"}}
    assert overall_verdict("a", "b", primary, compared, metrics) == (
        "b wins on the primary metric rouge_l (-0.0500, not clear: its interval includes 0); the metrics disagree: "
        "a is better on loss, perplexity and worse on chrf, rouge_l than b")
    agreeing = {**compared, "chrf": {"delta": 1.0, "verdict": "better"}, "rouge_l": {"delta": 0.1, "verdict": "better"}}
    assert overall_verdict("a", "b", primary, agreeing, metrics) == (
        "a wins on the primary metric rouge_l (+0.1000, clear); every metric that moved agrees")


def test_the_overall_verdict_is_printed_and_in_the_reports(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [
        "eval", str(runs["a"]), "--data", str(runs["test"]), "--against", "base", "--metric", "rouge_l",
        "--metric", "chrf", "--max-new-tokens", "4", "--resamples", "20", "--output", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    overall = json.loads((out / "eval.json").read_text())["comparisons"][0]["overall"]
    assert "on the primary metric rouge_l" in overall
    assert f"verdict: {overall}" in result.output
    assert "**Verdict:**" in (out / "report.md").read_text() and "Verdict:" in (out / "report.html").read_text()


@pytest.mark.parametrize("prompt", [
    "Use `x | y` in <b>bash</b>", "``double`` and ` single", "`starts and ends`", " padded ", "a|b|c",
    "line one with `tick`\n| a table? |\n<script>\n```\nfenced inside",
])
def test_report_md_quotes_user_text_verbatim(prompt: str) -> None:
    """report.md showed backticks as U+02BC; each quoted text must render back to exactly what the user wrote."""
    from markdown_it import MarkdownIt

    from tunelab.eval.report import markdown

    example = {"index": 0, "source": "t.jsonl:1", "prompt": prompt, "reference": "r `|` <i>", "target": "o", "other": "p"}
    report = {"target": "a", "systems": [{"name": "a"}, {"name": "b"}], "examples": 1, "data": ["t.jsonl"],
              "settings": {"resamples": 10}, "primary_metric": "rouge_l",
              "metrics": {"rouge_l": {"higher_is_better": True, "scores": {"a": 0.5, "b": 0.4}}},
              "comparisons": [{"against": "b", "improved": [example], "worsened": [],
                               "metrics": {"rouge_l": {"delta": 0.1, "ci_low": 0.0, "ci_high": 0.2, "confidence": 0.95,
                                                       "verdict": "better", "wins": 1, "losses": 0, "ties": 0}}}]}
    tokens = MarkdownIt("commonmark").parse(markdown(report))
    quoted = [t.content for t in tokens if t.type == "fence"]
    quoted += [c.content for t in tokens if t.type == "inline" for c in (t.children or []) if c.type == "code_inline"]
    assert prompt in quoted or prompt + "\n" in quoted, quoted
    assert "r `|` <i>" in quoted
    assert "ʼ" not in markdown(report)
