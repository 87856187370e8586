"""Real tier: bottleneck adapters (each placement) and adapter routing, 2 steps each on the embedded SmolLM2-135M
through the CLI, then reloaded: identical to the base at the start, a routed run over two of the adapter runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app

pytestmark = pytest.mark.real

ROOT = Path(__file__).parents[1]
ADAPTER_EXAMPLE = ROOT / "examples" / "intermediate" / "adapter.yaml"
ROUTING_EXAMPLE = ROOT / "examples" / "expert" / "adapter-routing.yaml"
# short and cheap: the base-model evaluation and sample generations are covered by the LoRA real tier
SHORT = ["training.max_steps=2", "training.micro_batch_size=1", "data.max_length=96", "eval.num_samples=0",
         "eval.before_after=false", "eval.max_examples=8"]


def _train(config: Path, out: Path, *sets: str) -> dict:
    args = ["train", str(config), "--no-progress"]
    for item in [*SHORT, f"output.dir={out}", *sets]:
        args += ["--set", item]
    result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def placement_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-adapters")
    runs = {}
    for placement in ("houlsby", "pfeiffer", "parallel"):
        evaluation = _train(ADAPTER_EXAMPLE, root / placement, f"technique.placement={placement}")
        assert evaluation["tuned"]["loss"] > 0
        runs[placement] = root / placement
    return runs


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_each_placement_trains_two_steps_and_reloads(placement_runs: dict[str, Path], placement: str) -> None:
    import tunelab

    run = placement_runs[placement]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "train"] == [1, 2]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["type"] == "tunelab-bottleneck" and config["placement"] == placement
    assert len(config["layers"]) == 30 and config["hidden_size"] == 576
    loaded = tunelab.load_run(run, device="cpu")
    ids = loaded.tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    from tunelab.techniques.attach import adapters_disabled

    with torch.no_grad():
        tuned = loaded.model(ids).logits
        with adapters_disabled(loaded.model):
            base = loaded.model(ids).logits
    assert not torch.equal(tuned, base)  # two steps moved the zero-initialised up-projections


def test_routing_over_two_adapter_runs_on_smollm2(placement_runs: dict[str, Path], tmp_path: Path) -> None:
    evaluation = _train(ROUTING_EXAMPLE, tmp_path / "routed", f"technique.adapters.docstrings={placement_runs['pfeiffer']}",
                        f"technique.adapters.unicode={placement_runs['parallel']}")
    routing = evaluation["routing"]
    assert routing["adapters"] == ["docstrings", "unicode"]
    assert {"all", "docstrings", "unicode"} <= set(routing["mean_gate"])
    for gates in routing["mean_gate"].values():
        assert abs(sum(gates.values()) - 1) < 1e-3
    steps = [json.loads(line) for line in (tmp_path / "routed" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(s["gates"]) == {"docstrings", "unicode"} for s in steps if s["kind"] == "train")
    report = json.loads((tmp_path / "routed" / "data_report.json").read_text())
    assert set(report["tasks"]) == {"docstrings", "unicode"}
