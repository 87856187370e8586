"""Run-folder ownership: tunelab deletes only what it recorded creating (never by name), writes new entries only
through the one ownership API (tunelab.fs), and lets one process at a time write a run folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.runs import tiny_run_config

from tunelab import fs
from tunelab.config import ConfigError
from tunelab.training import train


# ---------------------------------------------------------------- the API


def test_an_entry_is_recorded_before_it_is_written_and_a_users_entry_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = fs.own_entry(run_dir, "report.md")
    assert path == run_dir / "report.md" and not path.exists()
    assert fs.owned_entries(run_dir) == {"report.md"}
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt exists and was not created by tunelab"):
        fs.write_entry_text(run_dir, "notes.txt", "tunelab's")
    assert (run_dir / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="one plain name"):
        fs.own_entry(run_dir, "../escape")


def test_clearing_removes_what_was_recorded_and_nothing_else(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fs.write_entry_json(run_dir, "eval.json", {"a": 1})
    with fs.new_entry_folder(run_dir, "model") as tmp:
        (tmp / "weights").write_text("tunelab's")
    (run_dir / ".eval.json.tmp").write_text("tunelab's temporary")
    users = ["smodel.tmp", "Xeval.json.tmp", "eval.json.bak", "notes.txt", ".model.tmp2"]
    for name in users:
        (run_dir / name).write_text("mine")
    assert fs.foreign_entries(run_dir) == sorted(users)
    fs.clear(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([fs.RECORD, *users])
    assert all((run_dir / name).read_text() == "mine" for name in users)


def test_a_users_folder_with_tunelabs_names_is_never_owned(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for name in ("model", "adapter", "checkpoints"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "weights.bin").write_text("mine")
    (run_dir / "config.yaml").write_text("mine")
    fs.clear(run_dir)
    fs.remove_entry(run_dir, "model")
    assert sorted(fs.foreign_entries(run_dir)) == ["adapter", "checkpoints", "config.yaml", "model"]
    assert (run_dir / "model" / "weights.bin").read_text() == "mine"


def test_a_new_folder_replaces_the_old_one_only_once_complete(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with fs.new_entry_folder(run_dir, "adapter") as tmp:
        (tmp / "weights").write_text("first")
    with pytest.raises(OSError, match="injected"):
        with fs.new_entry_folder(run_dir, "adapter") as tmp:
            (tmp / "weights").write_text("half")
            raise OSError("disk full (injected)")
    assert (run_dir / "adapter" / "weights").read_text() == "first"
    assert sorted(p.name for p in run_dir.iterdir()) == [fs.RECORD, "adapter"]


def test_a_damaged_record_owns_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fs.write_entry_json(run_dir, "status.json", {})
    (run_dir / fs.RECORD).write_text('{"entries": ["stat')
    fs.clear(run_dir)
    assert (run_dir / "status.json").exists()


# ---------------------------------------------------------------- through train()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_holding_only_the_users_result_folder_is_refused_and_kept(
    tiny_model_dir: Path, tmp_path: Path, overwrite: bool,
) -> None:
    """The defect: only tunelab's names in the folder (adapter/, no config.yaml) passed the check, and the end of
    the run replaced the user's adapter/."""
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False},
                         output={"dir": str(tmp_path / "run"), "overwrite": overwrite})
    mine = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_text("the user's own adapter")
    with pytest.raises(ConfigError, match="not a tunelab run folder.*adapter"):
        train(config, progress=False)
    assert mine.read_text() == "the user's own adapter"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter"]


def test_overwrite_replaces_the_run_and_keeps_what_the_user_added_afterwards_refused(
    tiny_model_dir: Path, tmp_path: Path,
) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False},
                         output={"dir": str(tmp_path / "run"), "overwrite": True})
    run_dir = train(config, progress=False).run_dir
    owned = fs.owned_entries(run_dir)
    assert {"config.yaml", "status.json", "metrics.jsonl", "adapter", "tokenizer", "eval.json"} <= owned
    assert fs.foreign_entries(run_dir) == []
    (run_dir / "Xeval.json.tmp").write_text("mine")  # the old name check took this for eval.json's temporary
    with pytest.raises(ConfigError, match="not a tunelab run folder.*Xeval.json.tmp"):
        train(config, progress=False)
    assert (run_dir / "Xeval.json.tmp").read_text() == "mine" and (run_dir / "adapter").is_dir()
    (run_dir / "Xeval.json.tmp").unlink()
    assert train(config, progress=False).status == "completed"


# ---------------------------------------------------------------- one writer at a time


def test_a_live_writer_blocks_a_second_one_and_a_dead_ones_lock_does_not(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False},
                         output={"dir": str(tmp_path / "run"), "overwrite": True})
    run_dir = train(config, progress=False).run_dir
    assert not (run_dir / fs.LOCK).exists(), "the lock is released when the run ends"
    status_before = (run_dir / "status.json").read_text()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / fs.LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        for resume in (False, True):
            with pytest.raises(ConfigError, match=f"being written by another tunelab process \\(pid {other.pid}"):
                train(config, resume=resume, progress=False)
        assert (run_dir / "status.json").read_text() == status_before
    finally:
        other.kill()
        other.wait()
    assert train(config, progress=False).status == "completed"  # its process is gone: a stale lock



_RACER = """
import sys, time
from pathlib import Path
from tunelab import fs
from tunelab.errors import ConfigError
check = fs.refuse_a_live_writer
def slow_check(folder):  # widen the gap between the check and the lock's write, as a busy machine would
    check(folder)
    time.sleep(0.5)
fs.refuse_a_live_writer = slow_check
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every racer starts at the same moment
try:
    fs.acquire_lock(Path(sys.argv[1]))
    print("won", flush=True)
except ConfigError:
    print("refused", flush=True)
time.sleep(1.5)  # alive while the others decide: a live writer
"""


def test_runs_started_at_the_same_moment_on_one_folder_get_one_writer(tmp_path: Path) -> None:
    """Three processes take one folder's lock at the same moment, each pausing between its check and its write:
    exactly one writes, the others are refused (the check and the write are one step under the folder's flock)."""
    folder = tmp_path / "run"
    start = time.time() + 2.0
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(folder), str(start)], stdout=subprocess.PIPE,
                               text=True) for _ in range(3)]
    verdicts = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert verdicts == ["refused", "refused", "won"]
