"""Run folders are read defensively: a damaged file in one run never hides the others or blocks a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.runs import list_runs, read_metrics
from tunelab.training.resume import truncate_metrics


def _run(root: Path, name: str, status: str = '{"status": "completed", "step": 2}') -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {name: m}\ntechnique: {name: lora}\n")
    (run_dir / "status.json").write_text(status)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "step": 2, "loss": 1.5}\n')
    return run_dir


def test_a_line_cut_short_by_a_kill_is_skipped_and_resume_drops_it(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "a")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # killed mid-write
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    truncate_metrics(run_dir, 1)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_one_damaged_run_does_not_hide_the_others(tmp_path: Path) -> None:
    _run(tmp_path, "good")
    _run(tmp_path, "bad", status='{"status": "compl')
    runs = {Path(r["run"]).name: r for r in list_runs(tmp_path)}
    assert runs["good"]["status"] == "completed" and runs["good"]["train_loss"] == 1.5
    assert runs["bad"]["status"].startswith("unreadable")


def test_runs_on_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["runs", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such folder" in result.output
    (tmp_path / "notes.txt").write_text("mine")  # a file is named as one (it was 'no such folder' too)
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["runs", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _compared_run(root: Path, name: str, technique: str, rank: int, tuned: float) -> Path:
    """A finished run folder with the files the comparison columns read (written here, so each column can be
    checked against the value it came from)."""
    run_dir = _run(root, name)
    (run_dir / "config.yaml").write_text(f"model: {{name: m}}\ntechnique: {{name: {technique}, r: {rank}, use_dora: "
                                         f"{'true' if name == 'dora' else 'false'}}}\ntraining: {{learning_rate: 0.001}}\n")
    (run_dir / "run_info.json").write_text(json.dumps({
        "trainable_parameters": 1000 * rank, "total_parameters": 1_000_000, "tokens_per_s": 321.5,
        "peak_memory": {"rss_bytes": 3 * 2**30, "rss_gib": 3.0}}))
    (run_dir / "eval.json").write_text(json.dumps({
        "base": {"loss": 2.0}, "tuned": {"loss": 1.5},
        "metrics": {"rouge_l": {"base": 0.25, "tuned": tuned, "delta": tuned - 0.25, "ci_low": 0.01, "ci_high": 0.2,
                                "higher_is_better": True}}}))
    return run_dir


def test_runs_table_has_the_comparison_columns_and_show_puts_runs_side_by_side(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    _compared_run(tmp_path, "dora", "lora", 8, 0.375)
    _compared_run(tmp_path, "lora", "lora", 16, 0.125)
    plain = _run(tmp_path, "plain")  # no eval.json, no run_info.json: the columns say '-'
    runs = {Path(r["run"]).name: r for r in list_runs(tmp_path)}
    dora = runs["dora"]
    assert (dora["variant"], dora["trainable_parameters"], dora["peak_memory_bytes"]) == ("dora", 8000, 3 * 2**30)
    assert dora["primary_metric"] == {"name": "rouge_l", "base": 0.25, "tuned": 0.375, "delta": 0.125,
                                      "higher_is_better": True}
    assert runs["plain"]["primary_metric"] is None and runs["plain"]["peak_memory_bytes"] is None
    # without task metrics the validation loss is the primary metric, lower being better
    (tmp_path / "lora" / "eval.json").write_text(json.dumps({"base": {"loss": 2.0}, "tuned": {"loss": 1.5}}))
    assert list_runs(tmp_path)[1]["primary_metric"] == {"name": "val_loss", "base": 2.0, "tuned": 1.5, "delta": -0.5,
                                                        "higher_is_better": False}
    runner = CliRunner(env={"COLUMNS": "300", "NO_COLOR": "1"})
    listed = runner.invoke(app, ["runs", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    for text in ("lora (dora)", "8.0k (0.8%)", "3.00 GiB", "322", "rouge_l 0.2500 -> 0.3750 (+0.1250)",
                 "val_loss 2.0000 -> 1.5000 (-0.5000)"):
        assert text in listed.output, text
    shown = runner.invoke(app, ["runs", "show", str(tmp_path / "dora"), str(tmp_path / "lora"), str(plain)])
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "config: technique.r" in line)
    assert [cell.strip() for cell in row.split("│")[2:5]] == ["8", "16", "-"], row
    assert "config: model.name" not in shown.output  # the same in every run: not a difference
    assert "0.2500 -> 0.3750 (+0.1250" in shown.output and "16.0k (1.6%)" in shown.output
    both = json.loads(runner.invoke(app, ["runs", "show", str(tmp_path / "dora"), str(tmp_path / "lora"), "--json"]).stdout)
    assert [d["summary"]["trainable_parameters"] for d in both] == [8000, 16000]


def test_a_preference_run_is_judged_by_its_objectives_own_figure_not_its_few_samples(tmp_path: Path) -> None:
    """A DPO run's primary figure is its validation pairs' preference accuracy (its evaluation's primary metric),
    not the exact match of its one or two generated samples; an objective without one (KTO's validation reports no
    preference accuracy) keeps the task metrics, and SFT is judged as before."""
    run_dir = _compared_run(tmp_path, "dpo", "lora", 8, 0.5)
    (run_dir / "config.yaml").write_text("model: {name: m}\ntechnique: {name: lora}\nobjective: {name: dpo}\n")
    (run_dir / "eval.json").write_text(json.dumps({
        "base": {"loss": 0.693, "preference_accuracy": 0.25}, "tuned": {"loss": 0.64, "preference_accuracy": 0.75},
        "metrics": {"exact_match": {"base": 0.0, "tuned": 0.5, "higher_is_better": True}}}))
    assert list_runs(tmp_path)[0]["primary_metric"] == {"name": "preference_accuracy", "base": 0.25, "tuned": 0.75,
                                                        "delta": 0.5, "higher_is_better": True}
    (run_dir / "config.yaml").write_text("model: {name: m}\ntechnique: {name: lora}\nobjective: {name: kto}\n")
    (run_dir / "eval.json").write_text(json.dumps({
        "base": {"loss": 0.7, "kl": 0.0}, "tuned": {"loss": 0.5, "kl": 0.1},
        "metrics": {"exact_match": {"base": 0.0, "tuned": 0.5, "higher_is_better": True}}}))
    assert list_runs(tmp_path)[0]["primary_metric"]["name"] == "exact_match"


def test_show_draws_a_policy_s_reward_curve_from_its_metrics(tmp_path: Path) -> None:
    """A policy's loss stays near 0 whatever it learns: `runs show` (and the UI, from the same run_details) also
    draw its reward, sampled at every step and greedy at every evaluation, point for point from metrics.jsonl."""
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.console import sparkline
    from tunelab.runs import run_details

    run_dir = _run(tmp_path, "policy")
    lines = [{"kind": "train", "step": s, "loss": 0.01 * s, "reward": r} for s, r in enumerate([0.2, 0.1, 0.5, 0.9], 1)]
    lines += [{"kind": "eval", "step": 4, "loss": -0.7, "mean_reward": 0.7}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = run_details(run_dir)["curves"]
    assert curves["reward"] == [[1, 0.2], [2, 0.1], [3, 0.5], [4, 0.9]] and curves["validation_reward"] == [[4, 0.7]]
    assert sparkline(curves["reward"]).startswith("▂▁▅█  steps 1-4, 0.2 -> 0.9 (range 0.1..0.9)")
    shown = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["runs", "show", str(run_dir)])
    assert shown.exit_code == 0 and "reward by step" in shown.output and "▂▁▅█" in shown.output
    assert "reward" not in run_details(_run(tmp_path, "sft"))["curves"]  # control: an SFT run has no reward curve


def test_show_says_why_a_run_failed(tmp_path: Path) -> None:
    """`runs show` of a failed run gives the error status.json recorded, next to its status; it said only
    'failed at step 0'."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    failed = _run(tmp_path, "failed", '{"status": "failed", "step": 0, "error": "Model does not support past key values"}')
    shown = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["runs", "show", str(failed)])
    assert shown.exit_code == 0 and "failed at step 0" in shown.output
    assert "Model does not support past key values" in shown.output


def test_show_gives_the_objectives_own_figures_base_and_tuned(tmp_path: Path) -> None:
    """A classifier's eval.json holds accuracy and macro F1 beside the loss: `runs show` prints them base -> tuned
    (not the confusion matrix's cells, not the token count)."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    run_dir = _run(tmp_path, "cls")
    (run_dir / "eval.json").write_text(json.dumps({
        "base": {"loss": 1.2, "tokens": 4, "accuracy": 0.5, "confusion_0_1": 0.5, "macro_f1": 0.3333},
        "tuned": {"loss": 1.1, "tokens": 4, "accuracy": 0.75, "confusion_0_1": 0.25, "macro_f1": 0.7}}))
    shown = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["runs", "show", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    assert "accuracy base -> tuned" in shown.output and "0.5000 -> 0.7500 (+0.2500)" in shown.output
    assert "macro_f1 base -> tuned" in shown.output and "0.3333 -> 0.7000 (+0.3667)" in shown.output
    assert "confusion" not in shown.output and "tokens base" not in shown.output


def test_show_names_what_an_eval_json_without_before_after_figures_lacks(tmp_path: Path) -> None:
    """A run whose eval.json is a `tunelab eval` report (an older `eval --output RUN --overwrite` wrote it there)
    is still shown, alone and side by side, and says what it lacks; it failed with KeyError: 'base'."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    damaged = _run(tmp_path, "damaged")
    (damaged / "eval.json").write_text(json.dumps({
        "target": "a", "comparisons": [],
        "metrics": {"rouge_l": {"higher_is_better": True, "scores": {"a": 0.5}}}}))
    good = _compared_run(tmp_path, "good", "lora", 8, 0.375)
    runner = CliRunner(env={"COLUMNS": "300", "NO_COLOR": "1"})
    shown = runner.invoke(app, ["runs", "show", str(damaged)])
    assert shown.exit_code == 0, shown.output
    flat = " ".join(shown.output.split())
    assert "lacks 'base' and 'tuned'" in flat and "no before/after figures for rouge_l" in flat, flat
    side = runner.invoke(app, ["runs", "show", str(damaged), str(good)])
    assert side.exit_code == 0, side.output
    row = next(line for line in side.output.splitlines() if "rouge_l base -> tuned" in line)
    assert "lacks its before/after figures" in row and "0.2500 -> 0.3750" in row, row


def test_damaged_run_files_are_errors_naming_the_file_not_tracebacks(tmp_path: Path) -> None:
    """`tunelab runs show` on a run whose run_info.json was cut short printed a JSONDecodeError traceback (a JSON
    list: AttributeError); `tunelab runs` crashed in the table on a status.json whose status was not text. Now show
    names the file and what was expected, and the list says it in the run's row and lists the others."""
    from support.cli import invoke

    cut = _run(tmp_path, "cut")
    (cut / "run_info.json").write_text('{"peak_memory": {"rss')
    listed_json = _run(tmp_path, "listed")
    (listed_json / "eval.json").write_text("[1, 2]")
    numbered = _run(tmp_path, "numbered", status='{"status": 3, "step": 2}')
    nested = _run(tmp_path, "nested")
    (nested / "run_info.json").write_text('{"peak_memory": 5, "wall_time_s": "x"}')
    shown = invoke("runs", "show", cut)
    assert shown.exit_code == 2 and "Traceback" not in shown.clean, shown.clean
    assert f"error: {cut / 'run_info.json'}: not readable as JSON (" in " ".join(shown.clean.split())
    shown = invoke("runs", "show", listed_json)
    assert f"error: {listed_json / 'eval.json'}: expected a JSON object, found a JSON list" in " ".join(shown.clean.split())
    shown = invoke("runs", "show", nested)
    assert shown.exit_code == 2 and "Traceback" not in shown.clean and str(nested) in shown.clean, shown.clean
    listed = invoke("runs", tmp_path)
    assert listed.exit_code == 0 and "Traceback" not in listed.clean, listed.clean
    rows = {Path(r["run"]).name: r for r in json.loads(invoke("runs", tmp_path, "--json").stdout)}
    assert rows["cut"]["status"].startswith("unreadable: run_info.json: not readable as JSON (")
    assert rows["listed"]["status"] == "unreadable: eval.json: expected a JSON object, found a JSON list"
    assert rows["numbered"]["status"] == "3" and rows["nested"]["status"] == "completed"


def test_runs_lists_the_runs_of_a_compare_folder_in_it(tmp_path: Path) -> None:
    """`tunelab compare` writes to runs/compare by default; `tunelab runs` (runs/) then said 'no runs in runs'.
    The runs of each compare folder under FOLDER are listed with the others."""
    from support.cli import invoke

    compared = tmp_path / "compare"
    _run(compared, "lora-seed42")
    _run(compared, "ia3-seed42")
    (compared / "compare_plan.json").write_text("{}")
    listed = invoke("runs", tmp_path)
    assert listed.exit_code == 0 and "no runs" not in listed.clean, listed.clean
    assert str(compared / "lora-seed42") in listed.clean and str(compared / "ia3-seed42") in listed.clean
    found = json.loads(invoke("runs", tmp_path, "--json").stdout)
    assert sorted((Path(r["run"]).name, r["group"]) for r in found) == [("ia3-seed42", "compare"), ("lora-seed42", "compare")]


def test_runs_show_says_what_is_missing_or_what_the_folder_is(tmp_path: Path) -> None:
    """`tunelab runs show` without a run said 'show: no such folder'; a missing path and a compare folder were
    'not a tunelab run folder (no config.yaml)'."""
    from support.cli import invoke

    alone = invoke("runs", "show")
    assert alone.exit_code == 2 and "tunelab runs show needs the run folder(s) to describe" in alone.clean, alone.clean
    missing = invoke("runs", "show", tmp_path / "nowhere")
    assert missing.exit_code == 2 and f"{tmp_path / 'nowhere'}: no such run folder" in missing.clean, missing.clean
    compared = tmp_path / "cmp"
    _run(compared, "lora-seed42")
    (compared / "compare_plan.json").write_text("{}")
    shown = " ".join(invoke("runs", "show", compared).clean.split())
    assert f"{compared}: a compare folder, not a run: `tunelab runs {compared}` lists its runs" in shown, shown


def test_a_generation_metric_on_too_few_generations_does_not_judge_a_run(tmp_path: Path) -> None:
    """`tunelab runs` showed a compare's runs by their exact match over 2 generations (0 -> 0) where the compare
    judged them by the validation loss: the same rule now, a generation metric from 20 generations up."""
    from tunelab.runs import MIN_QUALITY_SAMPLES

    run_dir = _compared_run(tmp_path, "few", "lora", 8, 0.5)
    figures = {"base": {"loss": 2.0}, "tuned": {"loss": 1.5},
               "metrics": {"exact_match": {"base": 0.0, "tuned": 0.0, "higher_is_better": True, "examples": 2}}}
    (run_dir / "eval.json").write_text(json.dumps(figures))
    assert list_runs(tmp_path)[0]["primary_metric"]["name"] == "val_loss"
    figures["metrics"]["exact_match"]["examples"] = MIN_QUALITY_SAMPLES
    (run_dir / "eval.json").write_text(json.dumps(figures))
    assert list_runs(tmp_path)[0]["primary_metric"]["name"] == "exact_match"


def _trained_on(run_dir: Path, config: Any, single_hash: bool = False) -> None:
    """A run folder whose data_report.json records ``config``'s files as they are now (``single_hash``: only the
    one hash over them all, as a run of an older tunelab saved)."""
    from tunelab.data.prepare import data_file_hashes, fingerprint_of

    hashes = data_file_hashes(config)
    report = {"data_fingerprint": fingerprint_of(hashes), **({} if single_hash else {"data_file_hashes": hashes})}
    run_dir.mkdir(parents=True)
    (run_dir / "data_report.json").write_text(json.dumps(report))


def test_changed_data_names_only_the_files_that_changed_and_all_of_them_for_an_older_run(tmp_path: Path) -> None:
    """The refusals of `train --resume` and `compare` named every data file, whichever changed: the run saved one
    hash over all of them. Each file's hash is saved now, and only the changed ones are named; a run folder of an
    older tunelab (its one hash) is still checked, naming all files."""
    from tunelab.config import DataConfig
    from tunelab.data.prepare import data_file_hashes, fingerprint_of
    from tunelab.runs import changed_data

    paths = [tmp_path / name for name in ("a.jsonl", "b.jsonl", "val.jsonl")]
    for path in paths:
        path.write_text(f'{{"text": "{path.stem}"}}\n')
    config = DataConfig(train=[str(paths[0]), str(paths[1])], validation=[str(paths[2])])
    _trained_on(tmp_path / "new", config)
    _trained_on(tmp_path / "old", config, single_hash=True)
    hashes = data_file_hashes(config)
    assert changed_data(tmp_path / "new", fingerprint_of(hashes), hashes) is None
    assert changed_data(tmp_path / "old", fingerprint_of(hashes), hashes) is None  # the same hash as before
    paths[1].write_text('{"text": "b, rewritten"}\n')
    hashes = data_file_hashes(config)
    change = changed_data(tmp_path / "new", fingerprint_of(hashes), hashes)
    assert change is not None and change.files == [str(paths[1])]
    old = changed_data(tmp_path / "old", fingerprint_of(hashes), hashes)
    assert old is not None and old.files == [str(p) for p in paths] and old.saved == change.saved
