"""`tunelab quickstart` run again: it resumes an interrupted quickstart, starts over when the config changed,
replaces its own demo run, and never replaces a run in any other folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.ddp_driver import StopAfter
from support.tiny import toy_chat_records, write_jsonl

from tunelab import api
from tunelab.training import loop
from tunelab import checkpoint as ckpt
from tunelab.config import ConfigError
from tunelab.runs import read_json


@pytest.fixture
def tiny_recipe(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The quickstart recipe swapped for a tiny one, run from an empty working folder."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(24))
    (recipes / "quickstart.yaml").write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {data}, val_size: 4, max_length: 64}}\n"
        "technique: {name: lora, r: 2}\ntraining: {max_steps: 4, micro_batch_size: 2, save_every: 1}\n"
        "eval: {before_after: false}\n"
    )
    monkeypatch.setattr(api, "RECIPES", recipes)
    monkeypatch.chdir(tmp_path)
    return recipes


def _interrupted_after(steps: int, overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_StopRequest", StopAfter(steps))
        assert api.quickstart(overrides, progress=False).status == "interrupted"


def test_run_again_replaces_its_own_demo_run(tiny_recipe: Path) -> None:
    assert api.quickstart(progress=False).status == "completed"
    assert api.quickstart(progress=False).status == "completed"


def test_run_again_after_ctrl_c_resumes(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupted_after(2, [], monkeypatch)
    result = api.quickstart(progress=False)
    assert (result.status, result.step) == ("completed", 4)
    history = read_json(result.run_dir / "checkpoints" / "step-000004" / "state.json")["history"]
    assert history == ["resumed from step-000002"]


@pytest.mark.parametrize("change", ["data.val_size=3", "training.max_steps=5"])
def test_run_again_with_another_config_starts_over(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    _interrupted_after(2, [], monkeypatch)
    result = api.quickstart([change], progress=False)  # no dead end on "--resume: the config differs"
    assert result.status == "completed"
    history = read_json(ckpt.latest_checkpoint(result.run_dir / "checkpoints") / "state.json")["history"]
    assert history == []


def test_another_folder_is_never_replaced(tiny_recipe: Path) -> None:
    assert api.quickstart(["output.dir=runs/mywork"], progress=False).status == "completed"
    with pytest.raises(ConfigError, match="already holds a run"):
        api.quickstart(["output.dir=runs/mywork"], progress=False)


def test_a_quickstart_another_live_process_is_writing_is_left_alone(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import socket
    import subprocess
    import sys

    from tunelab.fs import LOCK

    _interrupted_after(2, [], monkeypatch)
    run_dir = Path(api.QUICKSTART_DIR)
    status = (run_dir / "status.json").read_text()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # e.g. a `make quickstart` still running in another terminal
        (run_dir / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        for overrides in ([], ["training.max_steps=5"]):  # would resume it / would start over
            with pytest.raises(ConfigError, match=f"being written by another tunelab process \\(pid {other.pid}"):
                api.quickstart(overrides, progress=False)
        assert (run_dir / "status.json").read_text() == status
        assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-000002"
    finally:
        other.kill()
        other.wait()
    assert api.quickstart(progress=False).status == "completed"  # the lock's process is gone: resumed
