"""The run folder: every report is built from its files, never from logs.

    runs/<name>/
      config.yaml          the resolved config (defaults filled in)
      data_report.json     the data report
      metrics.jsonl        one JSON line per logged step / evaluation
      eval.json            before/after: validation loss, perplexity, sample generations
      adapter/ or model/   the result: a standard PEFT adapter, or a plain transformers model
      tokenizer/           the tokenizer used for training, chat template included
      checkpoints/         resumable checkpoints (latest and best)
      status.json          running / interrupted / completed / failed, and the final step
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


# Every name tunelab writes into a run folder. Overwriting a run removes these and nothing else.
RUN_ENTRIES = frozenset({"config.yaml", "data_report.json", "metrics.jsonl", "eval.json", "base_eval.json",
                         "status.json", "adapter", "model", "tokenizer", "checkpoints"})


def _written_by_tunelab(name: str) -> bool:
    # Besides RUN_ENTRIES: their atomic-write temporaries (".eval.json.tmp") and the result's ".tmp-result".
    return name in RUN_ENTRIES or name == ".tmp-result" or (name.endswith(".tmp") and name[1:-4] in RUN_ENTRIES)


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that tunelab did not write."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if not _written_by_tunelab(p.name))


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files, and only those: anything else in the folder is the user's."""
    for entry in run_dir.iterdir():
        if _written_by_tunelab(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a report."""
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


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, forget metric lines written after the checkpoint: those steps are run again."""
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= last_step]
    tmp = run_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
    os.replace(tmp, run_dir / "metrics.jsonl")


def summarize_run(run_dir: Path) -> dict[str, Any] | None:
    """Key figures of one run folder, or None when the folder is not a tunelab run."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    config = yaml.safe_load(config_path.read_text()) or {}
    status = read_json(run_dir / "status.json") or {}
    evaluation = read_json(run_dir / "eval.json") or {}
    train_losses = [m["loss"] for m in read_metrics(run_dir) if m.get("kind") == "train"]
    return {
        "run": str(run_dir),
        "status": status.get("status", "unknown"),
        "model": config.get("model", {}).get("name"),
        "technique": config.get("technique", {}).get("name"),
        "step": status.get("step"),
        "train_loss": train_losses[-1] if train_losses else None,
        "base_val_loss": (evaluation.get("base") or {}).get("loss"),
        "tuned_val_loss": (evaluation.get("tuned") or {}).get("loss"),
    }


def list_runs(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    found = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            summary = summarize_run(run_dir)
        except (OSError, ValueError, yaml.YAMLError, AttributeError) as exc:  # one damaged run must not hide the rest
            summary = {"run": str(run_dir), "status": f"unreadable ({type(exc).__name__})", "model": None,
                       "technique": None, "step": None, "train_loss": None, "base_val_loss": None,
                       "tuned_val_loss": None}
        if summary is not None:
            found.append(summary)
    return found
