"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-000010/`` holding:
- ``trainable.safetensors``: every parameter with ``requires_grad`` (the whole model for full fine-tuning,
  only the adapter for LoRA), by its parameter name;
- ``optimizer.pt`` / ``scheduler.pt`` / ``rng.pt``: torch state dicts, read back by ``load_torch_file`` with
  ``weights_only=True`` (plain tensors and numbers, never arbitrary pickle): it is the project's only
  ``torch.load``, which tests/test_checkpoint.py checks over the whole source;
- ``state.json``: the loop's counters (step, best validation loss, skipped steps, ...);
- ``technique.safetensors``: only for a technique that keeps state beyond its weights (AdaLoRA's sensitivity
  statistics), its tensors, with its other state as JSON in the file's metadata;
- ``COMPLETE``: written last.

It is written with ``fs.atomic_folder``: everything goes into ``.tmp-step-000010`` first, every file and the folder
are fsynced, then ``COMPLETE`` is written (and fsynced), then the folder is renamed: a crash mid-save leaves only a
temporary folder, which is ignored, and the previous checkpoints intact. Saving a step that already has a
checkpoint moves the old one to ``.old-step-000010`` and deletes it only once the new one is in place (a hard kill
between the two renames is undone when checkpoints are listed). Rotation keeps the latest and the best.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import fs

COMPLETE = "COMPLETE"
WeightsInto = Callable[[nn.Module, dict[str, torch.Tensor]], None]  # (model, full weights by name)
OptimizerInto = Callable[[nn.Module, torch.optim.Optimizer, dict[str, Any]], None]  # (model, optimizer, saved state)
TECHNIQUE_STATE = "technique.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any], rng: dict[str, Any],
    technique_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint; a crash or power loss at any moment leaves the previous complete checkpoints intact.
    ``gathered``: a sharded model's full trainable weights and optimizer state, in the one-process format, written
    instead of ``model``'s and ``optimizer``'s own (which hold only this process's shards)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    weights, optimizer_state = gathered if gathered is not None else (trainable_state(model), optimizer.state_dict())
    # checkpoints/ is tunelab's whole, so the step's temporaries (.tmp-step-N, .old-step-N) are its own.
    with fs.atomic_folder(final, seal=lambda tmp: _write_complete(tmp, step)) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if technique_state is not None:
            tensors, extras = technique_state
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TECHNIQUE_STATE),
                      metadata={"extras": json.dumps(extras)})
    return final


def _write_complete(folder: Path, step: int) -> None:
    """The seal, written once every other file and the folder's names are on disk (``fs.atomic_folder``)."""
    with open(folder / COMPLETE, "w") as handle:
        handle.write(f"step {step}\n")
        handle.flush()
        fs.fsync_file(folder / COMPLETE)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary and half-written folders are ignored."""
    if not root.is_dir():
        return []
    fs.restore_replaced(root, "step-*", lambda old: (old / COMPLETE).is_file())
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))  # by step: step-1000000 comes after step-999999


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_trainable(path: Path, model: nn.Module, assign: WeightsInto | None = None) -> None:
    """Load a checkpoint's trainable weights into the model; every saved name must exist. ``assign`` puts the
    full tensors into a sharded model (each process keeps its shard) instead of copying them in."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise RuntimeError(f"{path}: the checkpoint has weights this model lacks: {missing[:5]}; was the config changed?")
    if assign is not None:
        assign(model, weights)
        return
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def load_technique_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A checkpoint's technique state (tensors, extras), or None when its technique keeps none."""
    file = path / TECHNIQUE_STATE
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        extras = json.loads((handle.metadata() or {}).get("extras", "{}"))
    return load_file(str(file)), extras


def load_torch_file(file: Path) -> Any:
    """A checkpoint's ``.pt`` file as plain tensors and numbers. Every load of one goes through here: a planted
    pickle raises ``pickle.UnpicklingError`` and runs nothing."""
    return torch.load(file, weights_only=True)


def load_rng(path: Path) -> dict[str, Any]:
    """A checkpoint's saved random streams (rng.pt): the main process's, with each rank's under ``ranks``."""
    return load_torch_file(path / "rng.pt")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    sharded: tuple[WeightsInto, OptimizerInto] | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG; returns the loop's counters. ``sharded``: how a sharded model
    and optimizer take the checkpoint's full tensors (``distributed.load_full_weights`` and
    ``load_full_optimizer_state``)."""
    assign_weights, assign_optimizer = sharded if sharded is not None else (None, None)
    load_trainable(path, model, assign_weights)
    optimizer_state = load_torch_file(path / "optimizer.pt")
    if assign_optimizer is not None:
        assign_optimizer(model, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(load_torch_file(path / "scheduler.pt"))
    restore_rng(load_rng(path))
    return read_state(path)


def rotate(root: Path, keep_steps: set[int]) -> None:
    """Delete complete checkpoints whose step is not in ``keep_steps`` (the latest and the best)."""
    for path in list_checkpoints(root):
        if int(path.name.split("-")[1]) not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
