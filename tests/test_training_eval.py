"""Evaluation inside training: the forgetting check, metrics every N steps with the best checkpoint on any
metric, the overfitting signal, run_info.json, and TensorBoard/MLflow tracking."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from support.runs import tiny_run_config

from tunelab.training import session
from tunelab.eval.training import OverfittingSignal, progress_note
from tunelab.runs import read_metrics


def _damage_after_training(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = session.run_loop

    def loop_then_damage(ctx, state):  # noqa: ANN001, ANN202 - the trainer's own context and state
        status = loop(ctx, state)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in ctx.accelerator.unwrap_model(ctx.model).parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        return status

    monkeypatch.setattr(session, "run_loop", loop_then_damage)


def test_forgetting_flags_a_damaged_model_and_passes_an_untouched_one(tiny_model_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    untouched = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "full"}, output={"dir": str(tmp_path / "same")},
                            training={"max_steps": 2, "learning_rate": 1e-12})
    check = session.train(untouched, progress=False).evaluation["forgetting"]
    assert check["flagged"] is False and abs(check["relative_change"]) < 1e-4
    assert check["tokens"] > 100 and check["threshold"] == 0.1
    _damage_after_training(monkeypatch)
    damaged = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "full"}, output={"dir": str(tmp_path / "hurt")},
                          training={"max_steps": 2, "learning_rate": 1e-12})
    with caplog.at_level(logging.WARNING, logger="tunelab.eval.before_after"):
        result = session.train(damaged, progress=False)
    check = result.evaluation["forgetting"]
    assert check["flagged"] is True and check["relative_change"] > 0.1
    assert json.loads((result.run_dir / "eval.json").read_text())["forgetting"]["flagged"] is True
    assert any("forgetting check" in r.getMessage() for r in caplog.records)
    # The threshold is configurable: past the damage, nothing is flagged.
    lenient = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "full"}, output={"dir": str(tmp_path / "lenient")},
                          training={"max_steps": 2, "learning_rate": 1e-12}, eval={"forgetting_threshold": 100.0})
    assert session.train(lenient, progress=False).evaluation["forgetting"]["flagged"] is False


def test_forgetting_can_use_your_own_text_and_can_be_switched_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n\nhello, how are you? i am fine, thank you.\n")
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 2},
                         eval={"forgetting_text": str(text), "forgetting_max_tokens": 16})
    check = session.train(config, progress=False).evaluation["forgetting"]
    assert check["text"] == str(text) and check["tokens"] <= 16
    off = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 2}, eval={"forgetting": False},
                      output={"dir": str(tmp_path / "off")})
    assert "forgetting" not in session.train(off, progress=False).evaluation


def test_metrics_every_n_steps_choose_the_best_checkpoint_on_any_metric(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={
        "max_steps": 8, "eval_every": 2, "eval_metrics": ["rouge_l", "exact_match"], "best_metric": "perplexity",
        "best_mode": "max"})  # maximising perplexity picks the worst evaluation: the rule really follows the mode
    result = session.train(config, progress=False)
    evals = [m for m in read_metrics(result.run_dir) if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]
    assert all("rouge_l" in m and "exact_match" in m and "gap" in m for m in evals)
    worst = max(evals, key=lambda m: m["perplexity"])
    assert worst["step"] != 8  # the loss falls on the toy task, so the control is meaningful
    assert result.evaluation["weights_from_step"] == worst["step"]
    assert result.evaluation["tuned"]["perplexity"] == worst["perplexity"]
    assert "rouge_l" in result.evaluation["metrics"] and "ci_low" in result.evaluation["metrics"]["rouge_l"]


def test_overfitting_signal_follows_the_gap_trend() -> None:
    signal = OverfittingSignal()
    for train, val in ((2.0, 2.1), (1.5, 2.0), (1.0, 2.0), (0.5, 2.1)):  # training falls, validation does not
        signal.observe_train(train)
        record = signal.update(val)
    assert record["gap"] == pytest.approx(1.6) and record["gap_trend"] > 0 and record["overfitting"] is True
    healthy = OverfittingSignal()
    for train, val in ((2.0, 2.1), (1.5, 1.55), (1.0, 1.02), (0.8, 0.81)):
        healthy.observe_train(train)
        record = healthy.update(val)
    assert record["gap_trend"] < 0 and record["overfitting"] is False
    note = progress_note({"loss": 2.1, "gap": 1.6, "gap_trend": 0.4, "overfitting": True, "rouge_l": 0.5}, "rouge_l")
    assert "val 2.1000" in note and "rouge_l 0.500" in note and "gap +1.600↑" in note and "overfitting?" in note


def test_run_info_records_parameters_memory_phases_and_versions(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = session.train(tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 3}), progress=False)
    info = json.loads((result.run_dir / "run_info.json").read_text())
    assert 0 < info["trainable_parameters"] < info["total_parameters"]
    assert info["peak_memory"]["rss_bytes"] > 50 * 2**20
    assert {"set-up", "base evaluation", "training", "final evaluation", "saving"} <= set(info["phases_s"])
    phases = sum(info["phases_s"].values())  # nested phases are not counted twice, and the phases cover the run
    assert 0.8 * info["wall_time_s"] <= phases <= info["wall_time_s"] + 0.01, (phases, info)
    assert info["training_tokens"] > 0 and info["tokens_per_s"] > 0
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"].startswith(torch.__version__[:4])
    assert info["hardware"]["cpu_count"] >= 1 and info["status"] == "completed" and info["step"] == 3


def test_report_to_tensorboard_and_mlflow_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 4, "eval_every": 2,
                                                             "report_to": ["tensorboard", "mlflow"]})
    run_dir = session.train(config, progress=False).run_dir
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    losses = [m["loss"] for m in read_metrics(run_dir) if m["kind"] == "train"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train.loss")] == pytest.approx(losses)
    assert run.data.params["technique.name"] == "lora" and run.info.status == "FINISHED"
    from tunelab.fs import foreign_entries

    assert foreign_entries(run_dir) == []


def test_runs_table_and_runs_show(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.runs import list_runs, smoothed_loss

    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 20, "learning_rate": 2e-3},
                         output={"dir": str(tmp_path / "runs" / "r1")})
    run_dir = session.train(config, progress=False).run_dir
    losses = [m["loss"] for m in read_metrics(run_dir) if m["kind"] == "train"]
    (summary,) = list_runs(tmp_path / "runs")
    assert summary["train_loss_smoothed"] == pytest.approx(sum(losses[-2:]) / 2)  # the last 10% of 20 steps
    assert summary["learning_rate"] == 2e-3 and summary["duration_s"] > 0 and summary["started"].startswith("20")
    assert smoothed_loss([5.0] * 900 + [1.0] * 100) == pytest.approx(1.0)  # at most 50 steps, all in the last 10%
    runner = CliRunner(env={"COLUMNS": "250"})
    listed = runner.invoke(app, ["runs", str(tmp_path / "runs")])
    assert listed.exit_code == 0, listed.output
    assert "2.0e-03" in listed.output and summary["started"][:10] in listed.output and f"{summary['train_loss_smoothed']:.4f}" in listed.output
    shown = runner.invoke(app, ["runs", "show", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    for text in ("trainable parameters", "tokens/s", "peak memory", "forgetting check", "exact_match base -> tuned",
                 "torch"):
        assert text in shown.output, text
    missing = runner.invoke(app, ["runs", "show", str(tmp_path)])
    assert missing.exit_code == 2 and "not a tunelab run folder" in missing.output
