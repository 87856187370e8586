"""Starting a run in its folder, or resuming it: the policy.

A new run never clears anyone's files: a folder holding entries tunelab did not record creating is refused, and a
previous run there is replaced only when it has nothing to lose or ``output.overwrite`` says so. A resume must find
a run tunelab started, a complete checkpoint, the same data and a config that differs only in what a resumption
may change (more steps, evaluation and saving intervals, reporting); a finished run resumes only to train further.
The ownership record and the writer lock it uses are ``tunelab.fs``'s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from tunelab import fs
from tunelab.checkpoint import latest_checkpoint
from tunelab.config import TunelabConfig, read_run_config
from tunelab.errors import ConfigError
from tunelab.runs import WRITER, changed_data, read_json, read_metrics
from tunelab.techniques.base import RESULT_DIRS

log = logging.getLogger(__name__)


def prepare_run_dir(config: TunelabConfig, resume: bool) -> Path:
    """Claim the run folder: check a resume against the saved run, or start a new run without ever clearing
    anyone's files (and write its resolved config.yaml). Takes the folder's writer lock (``release_lock``)."""
    run_dir = Path(config.output.dir or "runs/run")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {run_dir} is a file; give a folder for the run")
    fs.refuse_a_live_writer(run_dir)
    if resume:
        _check_resumable(config, run_dir)
        fs.acquire_lock(run_dir)
        return run_dir  # the session saves the new config.yaml once the resume is under way
    foreign = fs.foreign_entries(run_dir)
    if foreign:  # never write into (let alone clear) a folder holding someone's files
        unclaimed = "" if fs.is_claimed(run_dir) else " (tunelab keeps a record of what it creates, and there is none here)"
        raise ConfigError(
            f"output.dir {run_dir} is not empty and is not a tunelab run folder{unclaimed}: it holds "
            f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which tunelab did not create; choose a "
            "new folder with --set output.dir=..."
        )
    has_run = "config.yaml" in fs.owned_entries(run_dir)
    if has_run and _nothing_to_lose(run_dir):
        log.info("%s holds a run that stopped before its first checkpoint; starting it again", run_dir)
        fs.clear(run_dir)
    elif has_run:
        if not config.output.overwrite:
            raise ConfigError(f"{run_dir} already holds a run{_how_to_continue(run_dir)}, choose another folder with "
                              "--set output.dir=..., or replace it with --set output.overwrite=true")
        fs.clear(run_dir)
    fs.claim(run_dir, WRITER)
    fs.acquire_lock(run_dir)
    fs.write_entry_text(run_dir, "config.yaml", config.to_yaml())
    return run_dir


def finished_status(run_dir: Path) -> str | None:
    """'completed' or 'early_stopped' when the run folder holds a finished run, else None."""
    status = (read_json(run_dir / "status.json") or {}).get("status")
    return status if status in ("completed", "early_stopped") else None


def _check_resumable(config: TunelabConfig, run_dir: Path) -> None:
    if not fs.is_claimed(run_dir) or "config.yaml" not in fs.owned_entries(run_dir):
        raise ConfigError(f"--resume: {run_dir} holds no run that tunelab started (no {fs.RECORD} record of one)")
    latest = latest_checkpoint(run_dir / "checkpoints")
    blocking, allowed = resume_config_changes(config, run_dir)
    finished = finished_status(run_dir)
    if finished is not None:
        _check_extending(run_dir, finished, latest, allowed)
    if latest is None:
        raise ConfigError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    if blocking:
        raise ConfigError(f"--resume: the config differs from the run's {run_dir / 'config.yaml'}: " + "; ".join(blocking))
    for change in allowed:  # e.g. a --set the user forgot to repeat: say so rather than quietly run fewer steps
        log.warning("--resume changes %s", change)


def _check_extending(run_dir: Path, finished: str, latest: Path | None, allowed: list[str]) -> None:
    """A finished run resumes only to train further (more steps or epochs) from a checkpoint of its last step:
    an older checkpoint would roll the run back and replace its result with a retrained one."""
    step = (read_json(run_dir / "status.json") or {}).get("step")
    more_steps = any(c.startswith(("training.max_steps:", "training.epochs:")) for c in allowed)
    if not more_steps:
        raise ConfigError(f"--resume: {run_dir} is already finished ({finished} at step {step}); there is nothing "
                          "to resume, and its result and eval.json stay as they are. To train it further, raise "
                          "training.max_steps (or epochs) with --resume, or start a new run in another output.dir")
    latest_step = int(latest.name.split("-")[1]) if latest is not None else None
    if latest_step != step:
        raise ConfigError(f"--resume: {run_dir} is already finished ({finished} at step {step}) and has no checkpoint "
                          f"of that step (latest: {latest.name if latest else 'none'}), so it cannot be continued "
                          "without retraining and replacing its result; start a new run in another output.dir")


def _how_to_continue(run_dir: Path) -> str:
    status = (read_json(run_dir / "status.json") or {}).get("status", "unknown")
    if finished_status(run_dir):
        return f" that is finished ({status})"
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return f" ({status}, with a checkpoint). Continue it with --resume"
    return f" ({status})"


def _nothing_to_lose(run_dir: Path) -> bool:
    """A run that failed or was stopped before writing a checkpoint or a result: re-running it loses nothing."""
    status = (read_json(run_dir / "status.json") or {}).get("status")
    if status not in ("failed", "interrupted"):  # "starting"/"running" may be another process at work
        return False
    has_result = any((run_dir / name).exists() for name in RESULT_DIRS)
    return not has_result and latest_checkpoint(run_dir / "checkpoints") is None


# Fields that may change between a run and its resumption; anything else would make "resume" a different run.
# training.distributed: a sharded run's checkpoints hold the full tensors in the one-process format, and the global
# batch and data order do not depend on it, so a run may continue with DDP or sharded.
_RESUMABLE_CHANGES = {"training.max_steps", "training.epochs", "training.eval_every", "training.save_every",
                      "training.early_stopping_patience", "training.report_to", "training.distributed", "eval"}
_NOT_PART_OF_THE_RUN = {"output.overwrite"}  # how the folder was claimed, not what the run computes


def resume_config_changes(config: TunelabConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """Differences between ``config`` and the run's saved config: (ones that forbid resuming, allowed ones)."""
    saved = read_run_config(run_dir)
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
    """Refuse a resume whose data files differ from the run's (their content hashes are in data_report.json),
    naming the files that changed."""
    change = changed_data(run_dir, report["data_fingerprint"], report.get("data_file_hashes") or [])
    if change is not None:
        raise ConfigError(f"--resume: the data files changed since {run_dir} started ({', '.join(change.files)}: "
                          f"content hash {change.saved} -> {report['data_fingerprint']}); resuming would mix two "
                          "datasets. Restore the files, or start a new run in another output.dir")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, forget metric lines written after the checkpoint: those steps are run again."""
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= last_step]
    fs.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
