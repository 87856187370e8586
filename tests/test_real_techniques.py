"""Real tier for techniques: every registered technique trains 2 steps on SmolLM2-135M through the CLI (in one
process, with short rows, so the tier stays cheap), and `tunelab merge` on a real LoRA run gives a model that plain
transformers loads with the same greedy output as the adapter model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.techniques import TECHNIQUES

pytestmark = pytest.mark.real

QUICKSTART_DATA = Path(__file__).parents[1] / "src" / "tunelab" / "assets" / "pydoc_qa" / "pydoc_qa.jsonl"
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:12]]
    for record in records:  # multi-task data: the question's first word ("how", "explain", ...) is its task
        record["task"] = record["messages"][0]["content"].split()[0].lower()
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli_train(config: Path, run_dir: Path, name: str, *extra: str) -> Path:
    result = runner.invoke(app, [
        "train", str(config), "--no-progress", f"--set=technique.name={name}", "--set=training.max_steps=2",
        "--set=training.micro_batch_size=1", "--set=data.max_length=48", "--set=data.val_size=2",
        "--set=eval.max_examples=2", "--set=eval.before_after=false", f"--set=output.dir={run_dir}", *extra,
    ])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def config_file(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "real.yaml"
    path.write_text(f"data:\n  train: {small_data}\n")
    return path


# adapter and adapter_routing have their own real-model test (tests/test_real_adapter.py, through the CLI too).
REAL = [name for name in TECHNIQUES if name not in ("adapter", "adapter_routing")]


@pytest.mark.parametrize("name", REAL)
def test_every_technique_trains_two_steps_on_smollm2(name: str, config_file: Path, tmp_path: Path) -> None:
    run = cli_train(config_file, tmp_path / name, name)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 2
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)  # two finite steps
    assert (run / TECHNIQUES[name].result_dir_name).is_dir()


def test_merged_real_lora_gives_the_adapters_greedy_output(config_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.result import load_run

    run = cli_train(config_file, tmp_path / "lora", "lora", "--set=training.learning_rate=0.001")
    result = runner.invoke(app, ["merge", str(run)])
    assert result.exit_code == 0, result.output
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_logit_diff"] < 1e-3 and abs(check["mean_kl"]) < 1e-6

    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()  # plain transformers, no tunelab, no peft
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    adapter = load_run(run, device="cpu").model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}], tokenize=False,
                                           add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        from_merged = merged.generate(**encoded, **kwargs)
        from_adapter = adapter.generate(**encoded, **kwargs)
    assert torch.equal(from_merged, from_adapter), (tokenizer.decode(from_merged[0]), tokenizer.decode(from_adapter[0]))
