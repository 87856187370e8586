"""Real tier: `tunelab eval` on real SmolLM2 runs (a few LoRA steps each), against the base model and against
another run; and the forgetting check's cost and result on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import build_config

pytestmark = pytest.mark.real

QUICKSTART_DATA = Path(__file__).parents[1] / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"


def _run(tmp_path: Path, name: str, lr: float, data: Path, **eval_section: object) -> Path:
    from tunelab.training import train

    config = build_config({
        "data": {"train": [str(data)], "val_size": 4, "max_length": 128},
        "technique": {"name": "lora", "r": 8, "dropout": 0.0},
        "training": {"max_steps": 3, "micro_batch_size": 4, "learning_rate": lr},
        "eval": {"num_samples": 2, "max_new_tokens": 16, **eval_section},
        "output": {"dir": str(tmp_path / name)},
    })
    result = train(config, progress=False)
    assert result.status == "completed"
    return result.run_dir


def test_eval_a_real_run_against_the_base_and_another_run(tmp_path: Path) -> None:
    lines = QUICKSTART_DATA.read_text().splitlines()
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("\n".join(lines[:48]) + "\n")
    test_file.write_text("\n".join(lines[-4:]) + "\n")  # never trained on
    strong = _run(tmp_path, "strong", 2e-3, train_file)
    weak = _run(tmp_path, "weak", 1e-5, train_file, before_after=False, forgetting=False)
    forgetting = json.loads((strong / "eval.json").read_text())["forgetting"]
    assert forgetting["tokens"] > 200 and forgetting["base_loss"] > 0 and "flagged" in forgetting

    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "eval", str(strong), "--data", str(test_file), "--against", "base", "--against", str(weak),
        "--max-new-tokens", "16", "--resamples", "300", "--no-progress"])
    assert result.exit_code == 0, result.output
    out = strong / "evals" / "test-vs-base-weak"  # one folder per comparison (eval.runner.default_output)
    report = json.loads((out / "eval.json").read_text())
    names = [s["name"] for s in report["systems"]]
    assert names[0] == "strong" and names[1].startswith("base (") and names[2] == "weak"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["outputs"]["strong"] for r in rows)
    # Three steps at 2e-3 on the house style lower the loss on unseen questions in that style, clearly.
    vs_base = report["comparisons"][0]["metrics"]["loss"]
    assert vs_base["delta"] < 0 and vs_base["ci_high"] < 0 and vs_base["verdict"] == "better"
    assert report["metrics"]["rouge_l"]["scores"]["strong"] > 0
    assert (out / "report.html").read_text().count("<svg") == 4  # two plots per comparison
    print(json.dumps({n: {m: report["metrics"][m]["scores"][n] for m in ("loss", "rouge_l", "exact_match", "bleu")}
                      for n in names}, indent=1))
