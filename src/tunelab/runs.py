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
      run_info.json        parameters, peak memory, wall time per phase, tokens/s, library versions, hardware
      evals/<data name>/   reports of `tunelab eval` on this run (eval.json, report.md/html, predictions.jsonl)
      tensorboard/, mlruns/  TensorBoard events and a local MLflow store, when training.report_to asks for them
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.config import TunelabConfig

log = logging.getLogger(__name__)


# Every name tunelab writes into a run folder. Overwriting a run removes these and nothing else.
RUN_ENTRIES = frozenset({"config.yaml", "data_report.json", "metrics.jsonl", "eval.json", "base_eval.json",
                         "status.json", "adapter", "model", "tokenizer", "checkpoints",
                         "run_info.json", "evals", "tensorboard", "mlruns",
                         "quantize.json", "exports"})


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
    config = yaml.safe_load(config_path.read_text()) or {}
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
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()) or {},
        "status": read_json(run_dir / "status.json") or {},
        "run_info": read_json(run_dir / "run_info.json") or {},
        "eval": read_json(run_dir / "eval.json") or {},
        "data": {k: v for k, v in (read_json(run_dir / "data_report.json") or {}).items()
                 if k in ("records", "train", "validation", "truncation_rate", "warnings")},
        "evaluations": sorted(str(p.relative_to(run_dir)) for p in evals.glob("*/eval.json")) if evals.is_dir() else [],
    }


# ---------------------------------------------------------------- claiming a run folder, checking a resume


def latest_checkpoint(run_checkpoints: Path) -> Path | None:
    # Imported here: tunelab.checkpoint imports torch, which `tunelab runs` does not need.
    from tunelab.checkpoint import latest_checkpoint as latest

    return latest(run_checkpoints)


def prepare_run_dir(config: TunelabConfig, resume: bool) -> Path:
    """Claim the run folder: check a resume against the saved run, or start a new run without ever clearing
    anyone's files (and write its resolved config.yaml)."""
    run_dir = Path(config.output.dir or "runs/run")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {run_dir} is a file; give a folder for the run")
    if resume:
        if latest_checkpoint(run_dir / "checkpoints") is None:
            raise ConfigError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        blocking, allowed = resume_config_changes(config, run_dir)
        if blocking:
            raise ConfigError(f"--resume: the config differs from the run's {run_dir / 'config.yaml'}: " + "; ".join(blocking))
        for change in allowed:  # e.g. a --set the user forgot to repeat: say so rather than quietly run fewer steps
            log.warning("--resume changes %s", change)
        return run_dir  # the trainer saves the new config.yaml once the resume is under way
    foreign = foreign_entries(run_dir)
    if foreign:  # never write into (let alone clear) a folder holding someone's files
        raise ConfigError(
            f"output.dir {run_dir} is not empty and is not a tunelab run folder (it holds {', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose a new folder with --set output.dir=..."
        )
    if (run_dir / "config.yaml").exists() and _nothing_to_lose(run_dir):
        log.info("%s holds a run that stopped before its first checkpoint; starting it again", run_dir)
        clear_run(run_dir)
    if (run_dir / "config.yaml").exists():
        if not config.output.overwrite:
            raise ConfigError(f"{run_dir} already holds a run{_how_to_continue(run_dir)}, choose another folder with "
                              "--set output.dir=..., or replace it with --set output.overwrite=true")
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    return run_dir


def _how_to_continue(run_dir: Path) -> str:
    status = (read_json(run_dir / "status.json") or {}).get("status", "unknown")
    if status in ("completed", "early_stopped"):
        return f" that is finished ({status})"
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return f" ({status}, with a checkpoint). Continue it with --resume"
    return f" ({status})"


def _nothing_to_lose(run_dir: Path) -> bool:
    """A run that failed or was stopped before writing a checkpoint or a result: re-running it loses nothing."""
    status = (read_json(run_dir / "status.json") or {}).get("status")
    if status not in ("failed", "interrupted"):  # "starting"/"running" may be another process at work
        return False
    has_result = (run_dir / "adapter").exists() or (run_dir / "model").exists()
    return not has_result and latest_checkpoint(run_dir / "checkpoints") is None


# Fields that may change between a run and its resumption; anything else would make "resume" a different run.
_RESUMABLE_CHANGES = {"training.max_steps", "training.epochs", "training.eval_every", "training.save_every",
                      "training.early_stopping_patience", "training.report_to", "eval"}
_NOT_PART_OF_THE_RUN = {"output.overwrite"}  # how the folder was claimed, not what the run computes


def resume_config_changes(config: TunelabConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """Differences between ``config`` and the run's saved config: (ones that forbid resuming, allowed ones)."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    current = yaml.safe_load(config.to_yaml())
    blocking, allowed = [], []
    for section, fields in current.items():
        for key, value in (fields or {}).items():
            dotted, before = f"{section}.{key}", saved.get(section, {}).get(key)
            if before != value and dotted not in _NOT_PART_OF_THE_RUN:
                resumable = dotted in _RESUMABLE_CHANGES or section in _RESUMABLE_CHANGES
                (allowed if resumable else blocking).append(f"{dotted}: {before!r} -> {value!r}")
    return blocking, allowed


def check_same_data(run_dir: Path, report: dict[str, Any]) -> None:
    saved = (read_json(run_dir / "data_report.json") or {}).get("data_fingerprint")
    if saved is not None and saved != report["data_fingerprint"]:
        raise ConfigError(f"--resume: the data files changed since {run_dir} started (content hash {saved} -> "
                          f"{report['data_fingerprint']}); resuming would mix two datasets. Restore the files, or "
                          "start a new run in another output.dir")
