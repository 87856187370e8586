"""Checkpoints: a re-save never leaves the step without a checkpoint, every byte is on disk before the marker,
no pickle is ever executed from a checkpoint, and the trainer's rotation keeps the best."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.runs import tiny_run_config

from tunelab import checkpoint as ckpt
from tunelab import fs
from tunelab.training import context
from tunelab.training import train


def _save(root: Path, step: int, marker: str, model: torch.nn.Module | None = None) -> Path:
    model = model or torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ckpt.save_checkpoint(root, step, model, optimizer, scheduler, {"step": step, "marker": marker}, ckpt.rng_state())


def test_a_failed_re_save_of_the_same_step_keeps_the_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect: the complete checkpoint was deleted before the new one was renamed in (Ctrl-C right after a
    resume saves the same step again); a failure between the two left no checkpoint at all."""
    root = tmp_path / "checkpoints"
    _save(root, 5, "first")
    real_replace = os.replace

    def failing_rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise OSError("killed while renaming (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(fs.os, "replace", failing_rename)
    with pytest.raises(OSError, match="injected"):
        _save(root, 5, "second")
    monkeypatch.undo()
    [kept] = ckpt.list_checkpoints(root)
    assert ckpt.read_state(kept)["marker"] == "first"
    assert sorted(p.name for p in root.iterdir()) == ["step-000005"]
    _save(root, 5, "third")  # and a later save of that step replaces it cleanly
    assert ckpt.read_state(ckpt.latest_checkpoint(root))["marker"] == "third"
    assert sorted(p.name for p in root.iterdir()) == ["step-000005"]


def test_a_hard_kill_between_the_two_renames_is_recovered(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    path = _save(root, 5, "first")
    path.rename(root / ".old-step-000005")  # moved aside, replacement never renamed in
    assert ckpt.latest_checkpoint(root).name == "step-000005"
    assert ckpt.read_state(ckpt.latest_checkpoint(root))["marker"] == "first"


def test_every_file_and_the_folder_reach_the_disk_before_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(fs.os, "fsync", recording_fsync)
    path = _save(tmp_path / "checkpoints", 3, "x")
    names = [Path(p).name for p in synced]
    complete_at = names.index(ckpt.COMPLETE)
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert name in names[:complete_at], f"{name} must be fsynced before {ckpt.COMPLETE}: {names}"
    assert ".tmp-step-000003" in names[:complete_at], "the folder (its file names) must be fsynced before the marker"
    assert names[-1] == "checkpoints", "the rename into place is made durable"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", ckpt.COMPLETE])


class _Planted:
    """A pickle that runs code when loaded: here it would create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, name: str) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model, optimizer, scheduler, {"step": 1}, ckpt.rng_state())
    ckpt.load_checkpoint(path, model, optimizer, scheduler)  # control: the real files load
    evidence = tmp_path / "pwned"
    torch.save({"state": _Planted(evidence)}, path / name)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(path, model, optimizer, scheduler)
    assert not evidence.exists(), "loading a checkpoint must never run code from it"


def test_a_planted_pickle_in_the_rng_file_is_refused_on_the_per_rank_path(tmp_path: Path) -> None:
    """The multi-process resume reads rng.pt again for each rank's own stream: through the same loader."""
    path = _save(tmp_path / "checkpoints", 1, "m")
    assert "torch" in ckpt.load_rng(path)  # control: the real file loads
    evidence = tmp_path / "pwned"
    torch.save({"torch": _Planted(evidence)}, path / "rng.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rng(path)
    assert not evidence.exists()


def _unpickling_calls(tree: ast.Module) -> list[tuple[str, int]]:
    """(enclosing function, line) of every torch.load / pickle.load(s) / torch.serialization.load call, and of any
    import of those names (a bare ``load(...)`` after ``from torch import load`` would dodge the first check)."""
    found: list[tuple[str, int]] = []
    scopes: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            scopes.append(node.name)
            self.generic_visit(node)
            scopes.pop()

        visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

        def visit_Call(self, node: ast.Call) -> None:
            name = ast.unparse(node.func)
            if name in {"torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "dill.load"}:
                found.append((scopes[-1] if scopes else "<module>", node.lineno))
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module in {"torch", "torch.serialization", "pickle"} and any(a.name in {"load", "loads"} for a in node.names):
                found.append((f"import from {node.module}", node.lineno))

    Visitor().visit(tree)
    return found


def test_every_unpickling_load_in_the_source_is_the_checkpoint_loader() -> None:
    """One function reads every torch file (the one the planted-pickle tests cover); a second path fails here."""
    source = Path(ckpt.__file__).resolve().parent
    calls = {(str(file.relative_to(source)), *call) for file in sorted(source.rglob("*.py"))
             for call in _unpickling_calls(ast.parse(file.read_text(), str(file)))}
    assert [(file, function) for file, function, _ in calls] == [("checkpoint.py", "load_torch_file")], calls


def test_the_trainers_rotation_keeps_the_best_checkpoint(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([3.0, 2.0, 2.5, 2.6])  # evaluations at steps 2, 4, 6, 8: the best is step 4

    def fake_loss(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {"loss": next(scripted), "perplexity": 1.0, "tokens": 10}

    monkeypatch.setattr(context, "validation_loss", fake_loss)
    config = tiny_run_config(tiny_model_dir, tmp_path, technique={"name": "full"}, eval={"before_after": False},
                         training={"max_steps": 8, "eval_every": 2, "save_every": 2, "restore_best": True})
    result = train(config, progress=False)
    root = result.run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000004", "step-000008"]
    best = load_file(str(root / "step-000004" / "trainable.safetensors"))
    final = load_file(str(result.run_dir / "model" / "model.safetensors"))
    assert all(torch.equal(final[n], best[n]) for n in best), "restore_best saves the best step's weights"
    assert json.loads((result.run_dir / "eval.json").read_text())["weights_from_step"] == 4


def test_a_checkpoint_folder_without_its_marker_is_never_resumed_from(tmp_path: Path) -> None:
    """A step folder whose COMPLETE marker never made it (a copy cut short, a disk that lost the last writes) is
    not a checkpoint, whatever files it holds."""
    root = tmp_path / "checkpoints"
    _save(root, 2, "complete")
    half = _save(root, 4, "half")
    (half / ckpt.COMPLETE).unlink()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002"]
    assert ckpt.read_state(ckpt.latest_checkpoint(root))["marker"] == "complete"
