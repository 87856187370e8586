"""Real tier for GRPO: two steps on the embedded SmolLM2-135M-Instruct through the CLI, with a verifiable reward
(ROUGE-L against the pydoc answers plus a length target), generation timed apart from training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app

pytestmark = pytest.mark.real

EXAMPLE = Path(__file__).parents[1] / "examples" / "intermediate" / "grpo-lora.yaml"
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def test_grpo_trains_two_steps_on_smollm2_through_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "grpo"
    result = runner.invoke(app, [
        "train", str(EXAMPLE), "--no-progress", "--set=training.max_steps=2", "--set=training.grad_accum=1",
        "--set=training.micro_batch_size=1", "--set=objective.num_generations=2", "--set=objective.max_completion_length=8",
        "--set=data.val_size=2", "--set=eval.max_examples=2", "--set=eval.before_after=false", "--set=eval.forgetting=false",
        f"--set=output.dir={run}",
    ])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert len(train) == 2 and all(0 <= m["reward"] <= 1.5 and m["generation_s"] > 0 for m in train)
    phases = json.loads((run / "run_info.json").read_text())["phases_s"]
    assert phases["generation"] > 0 and phases["training"] > 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["tuned"]["mean_reward"] == -evaluation["tuned"]["loss"]
