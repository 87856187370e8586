"""Real tier for PPO: the RLHF example's last two stages on the embedded SmolLM2-135M-Instruct through the CLI, cut
short: a one-step reward model run, then two PPO steps scored by it (the SFT stage left out: PPO starts from the
embedded model), with the value head saved beside the adapter and generation timed apart from training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.objectives.ppo import load_value_head

pytestmark = pytest.mark.real

EXAMPLES = Path(__file__).parents[1] / "examples" / "intermediate"
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
SHORT = ["--no-progress", "--set=eval.before_after=false", "--set=eval.forgetting=false", "--set=eval.max_examples=2"]


def test_ppo_trains_two_steps_on_smollm2_through_the_cli_scored_by_a_reward_run(tmp_path: Path) -> None:
    reward = tmp_path / "reward"
    result = runner.invoke(app, [
        "train", str(EXAMPLES / "reward-lora.yaml"), *SHORT, "--set=training.max_steps=1", "--set=training.grad_accum=1",
        "--set=training.micro_batch_size=2", "--set=training.eval_every=null", "--set=data.val_size=2",
        f"--set=output.dir={reward}",
    ])
    assert result.exit_code == 0, result.output
    run = tmp_path / "ppo"
    result = runner.invoke(app, [
        "train", str(EXAMPLES / "ppo-lora.yaml"), *SHORT, "--set=model.name=smollm2-135m-instruct",
        f"--set=objective.rewards=[{{run: {reward}}}]", "--set=training.max_steps=2", "--set=training.micro_batch_size=2",
        "--set=objective.ppo_epochs=1", "--set=objective.max_completion_length=8", "--set=data.val_size=2",
        f"--set=output.dir={run}",
    ])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    train = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]
    assert len(train) == 2 and all(m["generation_s"] > 0 and m["clip_fraction"] == 0 for m in train)
    assert abs(train[0]["kl"]) < 1e-6  # the first rollout's policy is the reference (LoRA's B starts at 0)
    assert load_value_head(run).weight.shape == (1, 576)  # SmolLM2-135M's hidden size
    assert (run / "adapter" / "adapter_config.json").is_file()
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["tuned"]["mean_reward"] == -evaluation["tuned"]["loss"]
