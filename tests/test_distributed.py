"""Two CPU processes (torchrun, gloo) train the same run as one process with the same global batch, record their
world size, checkpoint, and resume exactly. Each launch is a real `torchrun` subprocess (tens of seconds), so the
launches are shared by module-scoped fixtures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.runs import tiny_config_dict
from support.tiny import toy_chat_records, write_jsonl
from support.torchrun import DRIVER, torchrun

from tunelab import distributed
from tunelab.config import ConfigError, build_config
from tunelab.runs import read_metrics
from tunelab.training import train

# Two processes add the same gradients in another order (an all-reduce of two halves rather than one running sum),
# so they are only promised to agree with one process to float32 rounding. Measured on this tiny model: identical
# losses and adapter weights (max difference 0.0, weights up to ~0.13). The bounds allow rounding, not a bug: a
# wrong loss scale or a lost micro-batch moves the losses by >1e-2.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _config(model_dir: Path, data: Path, out: Path, **training: Any) -> dict[str, Any]:
    return tiny_config_dict(
        model_dir,
        data={"train": [str(data)], "val_size": 8, "max_length": 64},
        technique={"name": "lora", "r": 4, "dropout": training.pop("dropout", 0.0)},
        training={"max_steps": 6, "micro_batch_size": 2, "learning_rate": 3e-3, "save_every": 3, **training},
        eval={"num_samples": 1, "max_new_tokens": 4},
        output={"dir": str(out)},
    )


@pytest.fixture(scope="module")
def workspace(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_jsonl(root / "train.jsonl", toy_chat_records(48))
    return root


@pytest.fixture(scope="module")
def two_process_cli_run(workspace: Path, tiny_model_dir: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 tunelab train CONFIG`, as the README says, with the global batch 2 x 2."""
    config = workspace / "two.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model_dir, workspace / "train.jsonl", workspace / "two",
                                             grad_accum=1, eval_every=3)))
    return torchrun([str(Path(sys.executable).with_name("tunelab")), "train", str(config), "--no-progress"], workspace)


@pytest.fixture(scope="module")
def resume_runs(workspace: Path, tiny_model_dir: Path) -> dict[str, Any]:
    """In one two-process launch: a straight run, and the same run stopped after step 3 and resumed (dropout on,
    so each process's own random stream must come back)."""
    data = workspace / "train.jsonl"
    configs = {"straight": _config(tiny_model_dir, data, workspace / "straight", dropout=0.1),
               "split": _config(tiny_model_dir, data, workspace / "split", dropout=0.1)}
    result = torchrun([str(DRIVER), json.dumps(configs)], workspace)
    lines = [line for line in result.stdout.splitlines() if line.startswith("DRIVER ")]
    assert len(lines) == 2 and lines[0] == lines[1], result.stdout  # both processes saw the same outcomes
    return json.loads(lines[0].removeprefix("DRIVER "))


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if m["kind"] == "train"]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_two_processes_equal_one_with_the_same_global_batch(two_process_cli_run, workspace: Path,
                                                             tiny_model_dir: Path) -> None:
    two = workspace / "two"
    one = train(build_config(_config(tiny_model_dir, workspace / "train.jsonl", workspace / "one", grad_accum=2,
                                     eval_every=3)), progress=False).run_dir
    assert json.loads((two / "status.json").read_text())["world_size"] == 2
    assert json.loads((one / "status.json").read_text())["world_size"] == 1
    assert len(_losses(two)) == 6
    torch.testing.assert_close(_losses(two), _losses(one), rtol=LOSS_RTOL, atol=0)
    a, b = _adapter(two), _adapter(one)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    # evaluation and generation ran on the unwrapped model, on every process, with the same figures
    evals = [json.loads((run / "eval.json").read_text()) for run in (two, one)]
    assert evals[0]["tuned"]["loss"] == pytest.approx(evals[1]["tuned"]["loss"], rel=LOSS_RTOL)
    assert evals[0]["samples"] and evals[0]["samples"][0]["tuned"] is not None
    assert "completed after 6 steps" in two_process_cli_run.stdout
    assert two_process_cli_run.stdout.count("completed after 6 steps") == 1, "only the main process prints"


def test_two_processes_checkpoint_and_resume_exactly(resume_runs: dict[str, Any], workspace: Path) -> None:
    assert resume_runs == {"straight": ["completed", 6], "first": ["interrupted", 3], "second": ["completed", 6]}
    straight, split = workspace / "straight", workspace / "split"
    assert _losses(straight) == _losses(split)
    a, b = _adapter(straight), _adapter(split)
    assert all(torch.equal(a[name], b[name]) for name in a), "a resumed two-process run must equal the straight one"
    optimizer = [torch.load(run / "checkpoints" / "step-000006" / "optimizer.pt", weights_only=True)
                 for run in (straight, split)]
    for key, values in optimizer[0]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, optimizer[1]["state"][key][name]), f"optimizer state {key}.{name}"
    rng = torch.load(split / "checkpoints" / "step-000006" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])


def test_a_run_resumes_only_with_its_number_of_processes(resume_runs: dict[str, Any], workspace: Path) -> None:
    copy = workspace / "split-copy"
    shutil.copytree(workspace / "split", copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["output"]["dir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    status = json.loads((copy / "status.json").read_text())
    (copy / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    before = sorted(p.name for p in copy.rglob("*"))
    with pytest.raises(ConfigError, match=r"trained on 2 process\(es\) and this launch has 1; resume with the same"):
        train(build_config({**saved, "output": {"dir": str(copy)}}), resume=True, progress=False)
    assert sorted(p.name for p in copy.rglob("*")) == before


def test_a_checkpoint_keeps_each_ranks_random_stream() -> None:
    states = {"torch": torch.tensor([0]), "ranks": [{"torch": torch.tensor([0])}, {"torch": torch.tensor([1])}]}
    assert torch.equal(distributed.rank_rng_state(states, 1)["torch"], torch.tensor([1]))
    assert distributed.rank_rng_state({"torch": torch.tensor([5])}, 1)["torch"].item() == 5  # a one-process checkpoint


def test_the_printed_resume_command_starts_as_many_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launcher_prefix() == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    prefix = distributed.launcher_prefix()
    assert prefix.endswith("torchrun --nproc_per_node 2 ") and "--nnodes" not in prefix
