"""The one file-system helper: a file or folder is replaced whole or not at all, tunelab writes over or deletes only
what its ownership record names, and folders written by an older tunelab (its old markers) are still its own."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support.runs import tiny_run_config

from tunelab import fs
from tunelab.errors import ConfigError


def _fail_renaming(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """Simulate a crash at the atomic moment: renaming a temporary whose name starts with ``prefix`` fails."""
    real_replace = os.replace

    def failing(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(prefix):
            raise OSError("killed while renaming (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(fs.os, "replace", failing)


# ---------------------------------------------------------------- one atomic write


def test_a_file_write_that_fails_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "status.json"
    fs.write_json(path, {"status": "running"})
    with pytest.raises(RuntimeError, match="crash"):
        with fs.atomic_file(path) as tmp:
            tmp.write_text('{"status": "comp')  # half written when the process dies
            raise RuntimeError("crash mid-write")
    _fail_renaming(monkeypatch, ".status.json")
    with pytest.raises(OSError, match="injected"):
        fs.write_json(path, {"status": "completed"})
    monkeypatch.undo()
    assert fs.read_json(path) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"], "no temporary is left behind"
    fs.write_json(path, {"status": "completed"})
    assert fs.read_json(path) == {"status": "completed"}


@pytest.mark.parametrize("shared", [False, True])
def test_a_folder_is_replaced_only_once_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    final = tmp_path / "adapter"
    with fs.atomic_folder(final, shared=shared) as tmp:
        (tmp / "weights").write_text("first")
    with pytest.raises(OSError, match="disk full"):
        with fs.atomic_folder(final, shared=shared) as tmp:
            (tmp / "weights").write_text("half")
            assert (final / "weights").read_text() == "first", "the old folder stays while the new one is built"
            raise OSError("disk full (injected)")
    _fail_renaming(monkeypatch, ".tmp-adapter")  # complete, but killed at the rename into place
    with pytest.raises(OSError, match="injected"):
        with fs.atomic_folder(final, shared=shared) as tmp:
            (tmp / "weights").write_text("second")
    monkeypatch.undo()
    assert (final / "weights").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary is left behind"
    with fs.atomic_folder(final, shared=shared) as tmp:
        (tmp / "weights").write_text("third")
    assert (final / "weights").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_the_seal_is_written_after_everything_else_is_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(fs.os, "fsync", recording_fsync)
    with fs.atomic_folder(tmp_path / "out", seal=lambda folder: synced.append("SEAL")) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "deep.bin").write_text("x")
        (tmp / "top.bin").write_text("y")
    seal = synced.index("SEAL")
    assert {"deep.bin", "sub", "top.bin", ".tmp-out"} <= set(synced[:seal]), synced
    assert synced[-1] == tmp_path.name, "the rename into place is made durable"


def test_two_builders_of_a_shared_folder_never_delete_each_others_work(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    with fs.owned_folder(final, "test") as outer:
        (outer / "data").write_text("outer")
        with fs.owned_folder(final, "test") as inner:  # another process builds the same cache entry meanwhile
            (inner / "data").write_text("inner")
        assert (outer / "data").read_text() == "outer"
    assert (final / "data").read_text() == "outer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_hard_kill_between_the_two_renames_is_undone(tmp_path: Path) -> None:
    (tmp_path / ".old-step-2").mkdir()
    (tmp_path / ".old-step-2" / "COMPLETE").write_text("")
    (tmp_path / ".old-step-3").mkdir()  # never complete: not put back
    fs.restore_replaced(tmp_path, "step-*", lambda old: (old / "COMPLETE").is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-step-3", "step-2"]


# ---------------------------------------------------------------- the ownership record


def test_the_record_refuses_the_users_entries_and_clears_only_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    fs.claim(folder, "test")
    fs.write_entry_text(folder, "report.md", "tunelab's")
    with fs.new_entry_folder(folder, "model") as tmp:
        (tmp / "weights").write_text("tunelab's")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt exists and was not created by tunelab"):
        fs.write_entry_text(folder, "notes.txt", "tunelab's")
    assert fs.foreign_entries(folder) == ["notes.txt"]
    fs.remove_entry(folder, "notes.txt")  # not recorded: never deleted
    fs.clear(folder)
    assert sorted(p.name for p in folder.iterdir()) == [fs.RECORD, "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_folder_owned_whole_replaces_only_tunelabs_own(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with fs.owned_folder(out, "tunelab merge") as tmp:
        (tmp / "model.safetensors").write_text("first")
    assert json.loads((out / fs.RECORD).read_text())["entries"] == ["model.safetensors"]
    with fs.owned_folder(out, "tunelab merge") as tmp:  # its own earlier output: replaced
        (tmp / "model.safetensors").write_text("second")
    assert (out / "model.safetensors").read_text() == "second"
    (out / "notes.txt").write_text("mine")  # added by the user: the folder is no longer tunelab's whole
    with pytest.raises(ConfigError, match="notes.txt, which tunelab did not write"):
        with fs.owned_folder(out, "tunelab merge"):
            pytest.fail("nothing may be built for a folder holding the user's files")
    users = tmp_path / "users"
    users.mkdir()
    (users / "config.json").write_text("mine")  # looks like a model folder: still the user's
    with pytest.raises(ConfigError, match="config.json, which tunelab did not write"):
        with fs.owned_folder(users, "tunelab merge"):
            pass
    assert (users / "config.json").read_text() == "mine" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "users"]


# ---------------------------------------------------------------- folders of an older tunelab


def test_an_older_run_record_is_read_and_replaced_by_the_new_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / fs.LEGACY_RUN_RECORD).write_text(json.dumps({"format": 1, "entries": ["eval.json"]}))
    (run_dir / "eval.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    assert fs.is_claimed(run_dir) and fs.owned_entries(run_dir) == {"eval.json"}
    assert fs.foreign_entries(run_dir) == ["notes.txt"]
    fs.write_entry_json(run_dir, "status.json", {})
    assert not (run_dir / fs.LEGACY_RUN_RECORD).exists(), "only the new form is written"
    assert fs.owned_entries(run_dir) == {"eval.json", "status.json"}


@pytest.mark.parametrize("marker", fs.LEGACY_WHOLE_FOLDER)
def test_an_older_whole_folder_marker_is_ownership(tmp_path: Path, marker: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("written by tunelab\n")
    (out / "model.safetensors").write_text("old")
    assert fs.foreign_entries(out) == []
    with fs.owned_folder(out, "test") as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [fs.RECORD, "model.safetensors"]


def test_an_older_converted_model_in_the_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab import models

    monkeypatch.setenv("TUNELAB_MODEL_CACHE", str(tmp_path))
    cached = tmp_path / models.EMBEDDED_DEFAULT_MODEL
    cached.mkdir()
    (cached / ".tunelab-converted").write_text("converted from x.gguf\n")
    monkeypatch.setattr(models, "_gguf_path", lambda alias: pytest.fail("an existing conversion is not redone"))
    assert models.embedded_model_dir() == cached


def test_a_cache_entry_without_a_record_is_never_replaced(tmp_path: Path) -> None:
    from tunelab.data.prepare import load_cache, save_cache

    entry = tmp_path / "cache" / "key"
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text("damaged")  # an older tunelab's entry (no record), or the user's folder
    data = type("Prepared", (), {"train": [], "validation": [], "validation_examples": [], "report": {}})()
    save_cache(entry, data)  # type: ignore[arg-type]
    assert (entry / "meta.json").read_text() == "damaged" and load_cache(entry) is None
    save_cache(tmp_path / "cache" / "fresh", data)  # type: ignore[arg-type]
    assert load_cache(tmp_path / "cache" / "fresh") is not None


def test_a_run_of_an_older_tunelab_is_overwritten_as_before(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.training import train

    config = tiny_run_config(tiny_model_dir, tmp_path, training={"max_steps": 1}, eval={"before_after": False},
                         output={"dir": str(tmp_path / "run"), "overwrite": True})
    run_dir = train(config, progress=False).run_dir
    record = json.loads((run_dir / fs.RECORD).read_text())
    (run_dir / fs.LEGACY_RUN_RECORD).write_text(json.dumps({"format": 1, "entries": record["entries"]}))
    (run_dir / fs.RECORD).unlink()  # as an older tunelab left it
    assert fs.foreign_entries(run_dir) == []
    assert train(config, progress=False).status == "completed"
    assert (run_dir / fs.RECORD).is_file() and not (run_dir / fs.LEGACY_RUN_RECORD).exists()


def test_weights_saved_by_safetensors_are_as_readable_as_the_users_other_files(tmp_path: Path) -> None:
    """safetensors writes 0600 whatever the umask: through the atomic writers a file gets the mode of an ordinary
    new file (0644 under umask 022), in a folder and alone, and a file the user's code chose to keep private
    (0400) is left alone."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with fs.atomic_folder(tmp_path / "adapter") as folder:
            save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
            (folder / "secret").write_text("x")
            (folder / "secret").chmod(0o400)
        with fs.atomic_file(tmp_path / "alone.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what an ordinary file gets here
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "adapter" / "adapter_model.safetensors") == mode(plain) == 0o644
    assert mode(tmp_path / "alone.safetensors") == 0o644 and mode(tmp_path / "adapter" / "secret") == 0o400
