"""Run folders are read defensively: a damaged file in one run never hides the others or blocks a resume."""

from __future__ import annotations

import json
from pathlib import Path

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
