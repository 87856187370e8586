"""The run folder: every report is built from its files, never from logs.

    runs/<name>/
      .tunelab-run.json    the ownership record: which entries tunelab created here (see below)
      config.yaml          the resolved config (defaults filled in)
      data_report.json     the data report
      metrics.jsonl        one JSON line per logged step / evaluation
      base_eval.json       the untouched model's figures (with the eval settings they were computed with)
      eval.json            before/after: validation loss, perplexity, sample generations
      adapter/ or model/   the result: a standard PEFT adapter, or a plain transformers model
      tokenizer/           the tokenizer used for training, chat template included
      checkpoints/         resumable checkpoints (latest and best)
      status.json          running / interrupted / completed / failed, and the final step
      run_info.json        parameters, peak memory, wall time per phase, tokens/s, library versions, hardware
      evals/<data name>/   reports of `tunelab eval` on this run (eval.json, report.md/html, predictions.jsonl)
      tensorboard/, mlruns/  TensorBoard events and a local MLflow store, when training.report_to asks for them
      .tunelab-lock        while a process writes the run: its pid and host (a second writer is refused)

Ownership (what tunelab may delete)
-----------------------------------
A folder's entries are tunelab's only if tunelab *recorded* creating them, never because of their names: a user's
own ``model/`` folder or ``eval.json.tmp`` file looks exactly like tunelab's. The record is ``.tunelab-run.json``
(``{"format": 1, "entries": [...]}``), one top-level name per entry; an entry that is a folder is owned with
everything in it. Clearing a run (``output.overwrite``, a failed pre-flight) removes recorded entries and their
temporaries and nothing else.

Every part of tunelab that writes a new file or folder into a run folder goes through this API (the set of
entries is open: eval reports, merges, quantized exports add their own names):

- ``run_entry(run_dir, name)``: record ``name`` as tunelab's, then return ``run_dir / name`` to write to. The name
  is recorded *before* anything is written, so a crash mid-write leaves nothing unowned. An entry already there
  that tunelab did not record is the user's: ``ConfigError``, it is never written over.
- ``write_run_json(run_dir, name, data)`` / ``write_run_text(run_dir, name, text)``: a whole file, atomically
  (temporary ``.NAME.tmp`` + rename).
- ``append_run_line(run_dir, name, line)``: one line appended (metrics.jsonl).
- ``with new_run_folder(run_dir, name) as tmp:`` fill ``tmp`` (``.tmp-NAME``); on success it replaces ``NAME`` in
  one rename (the old one moved to ``.old-NAME`` first and deleted last), on an error it is removed.
- ``remove_run_entry(run_dir, name)``: delete a recorded entry (an unrecorded one is left alone).

Temporaries are recognised exactly: ``.NAME.tmp``, ``.tmp-NAME`` and ``.old-NAME`` for a recorded ``NAME``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from tunelab.config import read_run_config
from tunelab.errors import ConfigError
from tunelab.techniques import technique_variant

log = logging.getLogger(__name__)

MARKER = ".tunelab-run.json"
# The entries the trainer itself writes. Informational only: ownership is what the MARKER records, never a name.
RUN_ENTRIES = frozenset({"config.yaml", "data_report.json", "metrics.jsonl", "eval.json", "base_eval.json",
                         "status.json", "adapter", "model", "tokenizer", "checkpoints",
                         "run_info.json", "evals", "tensorboard", "mlruns", "wandb",
                         "quantize.json", "exports", "merged"})
LOCK = ".tunelab-lock"
_FORMAT = 1


# ---------------------------------------------------------------- ownership: what tunelab created here


def _check_name(name: str) -> None:
    if not name or "/" in name or os.sep in name or name.startswith(".") or name in (MARKER, LOCK):
        raise ValueError(f"run folder entry {name!r}: give one plain name (no '/', not starting with '.')")


def owned_entries(run_dir: Path) -> set[str]:
    """The names tunelab recorded creating in ``run_dir`` (empty for a folder it never claimed)."""
    try:
        record = read_json(run_dir / MARKER)
    except (OSError, ValueError):  # a damaged record: own nothing (deleting too little is the safe side)
        log.warning("%s is damaged; tunelab treats nothing in %s as its own", run_dir / MARKER, run_dir)
        return set()
    if not isinstance(record, dict) or not isinstance(record.get("entries"), list):
        return set()
    return {name for name in record["entries"] if isinstance(name, str)}


def is_claimed(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def claim_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and start its ownership record (kept if there is one)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_claimed(run_dir):
        write_json(run_dir / MARKER, {"format": _FORMAT, "entries": []})


def _temporaries(name: str) -> tuple[str, str, str]:
    return f".{name}.tmp", f".tmp-{name}", f".old-{name}"


def _is_owned(entry: str, owned: set[str]) -> bool:
    if entry in owned or entry in (MARKER, LOCK, f".{MARKER}.tmp"):
        return True
    return any(entry in _temporaries(name) for name in owned)


def run_entry(run_dir: Path, name: str) -> Path:
    """Record ``name`` as created by tunelab and return its path; refuse a same-named entry that is the user's."""
    _check_name(name)
    owned = owned_entries(run_dir)
    if name in owned:
        return run_dir / name
    path = run_dir / name
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists and was not created by tunelab; it is left alone. Move it, or choose "
                          "another output folder")
    claim_run_dir(run_dir)
    write_json(run_dir / MARKER, {"format": _FORMAT, "entries": sorted(owned | {name})})
    return path


def write_run_json(run_dir: Path, name: str, data: Any) -> Path:
    path = run_entry(run_dir, name)
    write_json(path, data)
    return path


def write_run_text(run_dir: Path, name: str, text: str) -> Path:
    path = run_entry(run_dir, name)
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def append_run_line(run_dir: Path, name: str, line: str) -> None:
    with open(run_entry(run_dir, name), "a") as handle:
        handle.write(line if line.endswith("\n") else line + "\n")


@contextmanager
def new_run_folder(run_dir: Path, name: str) -> Iterator[Path]:
    """Build a folder entry in a temporary folder; it replaces ``name`` only once it is complete."""
    final = run_entry(run_dir, name)
    _, tmp_name, old_name = _temporaries(name)
    tmp, old = run_dir / tmp_name, run_dir / old_name
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(old)
    if final.exists():
        final.rename(old)  # the previous one stays whole until the new one is in place
    tmp.rename(final)
    _remove(old)


def remove_run_entry(run_dir: Path, name: str) -> None:
    """Delete a recorded entry and its temporaries; an entry tunelab did not record is never touched."""
    owned = owned_entries(run_dir)
    if name not in owned:
        return
    for entry in (name, *_temporaries(name)):
        _remove(run_dir / entry)
    write_json(run_dir / MARKER, {"format": _FORMAT, "entries": sorted(owned - {name})})


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that tunelab did not record creating."""
    if not run_dir.is_dir():
        return []
    owned = owned_entries(run_dir)
    return sorted(p.name for p in run_dir.iterdir() if not _is_owned(p.name, owned))


def clear_run(run_dir: Path) -> None:
    """Remove what tunelab recorded creating in ``run_dir``, and only that: anything else is the user's."""
    owned = owned_entries(run_dir)
    for entry in run_dir.iterdir():
        if entry.name not in (MARKER, LOCK) and _is_owned(entry.name, owned):
            _remove(entry)
    if is_claimed(run_dir):
        write_json(run_dir / MARKER, {"format": _FORMAT, "entries": []})


def release_run_dir(run_dir: Path, created_folder: bool) -> None:
    """Undo a claim that came to nothing: clear what tunelab wrote, and the folder itself if tunelab made it."""
    if not run_dir.is_dir():
        return
    clear_run(run_dir)
    if not foreign_entries(run_dir):
        for name in (MARKER, LOCK):
            _remove(run_dir / name)
        if created_folder and not any(run_dir.iterdir()):
            run_dir.rmdir()


# ---------------------------------------------------------------- one writer at a time


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def lock_owner(run_dir: Path) -> dict[str, Any] | None:
    """The live process holding ``run_dir``'s lock, or None (no lock, or its process is gone)."""
    try:
        owner = json.loads((run_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"]):
        return None  # a stale lock: its process died (killed, power loss)
    return owner if owner["pid"] != os.getpid() or owner.get("host") != socket.gethostname() else None


def acquire_lock(run_dir: Path) -> None:
    """Refuse to write a run that another live process is writing; otherwise take the lock (pid and host)."""
    owner = lock_owner(run_dir)
    if owner is not None:
        raise ConfigError(f"{run_dir} is being written by another tunelab process (pid {owner['pid']} on "
                          f"{owner.get('host')}); wait for it to finish, stop it, or choose another output.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / LOCK, {"pid": os.getpid(), "host": socket.gethostname()})


def release_lock(run_dir: Path) -> None:
    owner = read_json(run_dir / LOCK) if (run_dir / LOCK).is_file() else None
    if isinstance(owner, dict) and owner.get("pid") == os.getpid():
        (run_dir / LOCK).unlink(missing_ok=True)


# ---------------------------------------------------------------- reading and writing files


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a report. Inside a run
    folder, use ``write_run_json`` (it records the entry as tunelab's)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill mid-write: the metrics around it still count
            log.warning("%s:%d: skipped a damaged metrics line", path, number)
    return records


def smoothed_loss(losses: list[float], share: float = 0.1, most: int = 50) -> float | None:
    """Mean training loss over the final window (the last 10% of logged steps, 1 to 50 of them): one step's
    loss is noisy, and the final window says where training ended up."""
    if not losses:
        return None
    window = max(1, min(most, round(len(losses) * share)))
    return sum(losses[-window:]) / window


def summarize_run(run_dir: Path) -> dict[str, Any] | None:
    """Key figures of one run folder, or None when the folder is not a tunelab run."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    config = read_run_config(run_dir)
    status = read_json(run_dir / "status.json") or {}
    evaluation = read_json(run_dir / "eval.json") or {}
    info = read_json(run_dir / "run_info.json") or {}
    train_losses = [m["loss"] for m in read_metrics(run_dir) if m.get("kind") == "train" and not m.get("skipped")]
    forgetting = evaluation.get("forgetting") or {}
    return {
        "run": str(run_dir),
        "status": status.get("status", "unknown"),
        "started": info.get("started") or _modified(config_path),
        "duration_s": info.get("wall_time_s"),
        "model": config.get("model", {}).get("name"),
        "technique": config.get("technique", {}).get("name"),
        "variant": technique_variant(config.get("technique") or {}),  # e.g. 'dora' for a lora run with use_dora
        "learning_rate": config.get("training", {}).get("learning_rate"),
        "step": status.get("step"),
        "train_loss": train_losses[-1] if train_losses else None,
        "train_loss_smoothed": smoothed_loss(train_losses),
        "base_val_loss": (evaluation.get("base") or {}).get("loss"),
        "tuned_val_loss": (evaluation.get("tuned") or {}).get("loss"),
        "forgetting_flagged": forgetting.get("flagged"),
        "tokens_per_s": info.get("tokens_per_s"),
        "peak_rss_gib": (info.get("peak_memory") or {}).get("rss_gib"),
    }


def _modified(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def list_runs(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    found = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            summary = summarize_run(run_dir)
        except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as exc:  # one damaged run must not hide the rest
            summary = {"run": str(run_dir), "status": f"unreadable ({type(exc).__name__})"}
        if summary is not None:
            found.append(summary)
    return found


def run_details(run_dir: Path) -> dict[str, Any]:
    """Everything ``tunelab runs show`` prints: the summary plus the run's files, read as they are."""
    summary = summarize_run(run_dir)
    if summary is None:
        raise ConfigError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    evals = run_dir / "evals"
    return {
        "summary": summary,
        "config": read_run_config(run_dir),
        "status": read_json(run_dir / "status.json") or {},
        "run_info": read_json(run_dir / "run_info.json") or {},
        "eval": read_json(run_dir / "eval.json") or {},
        "data": {k: v for k, v in (read_json(run_dir / "data_report.json") or {}).items()
                 if k in ("records", "train", "validation", "truncation_rate", "warnings")},
        "evaluations": sorted(str(p.relative_to(run_dir)) for p in evals.glob("*/eval.json")) if evals.is_dir() else [],
    }
