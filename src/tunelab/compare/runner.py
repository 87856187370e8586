"""Running a compare: the grid of runs (technique x learning rate x seed), each trained by ``tunelab train`` in
its own process, so each run's peak memory is its own (a process's peak RSS never goes down) and Ctrl-C leaves
the run being trained with a resumable checkpoint. Run again, a compare keeps finished runs and resumes the
interrupted one."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from tunelab.checkpoint import latest_checkpoint
from tunelab.compare.report import write_reports
from tunelab.compare.table import flag_pareto, primary_metric, quality_cost, quality_note, run_figures, technique_row
from tunelab.config import TunelabConfig, build_config, parse_overrides
from tunelab.data.prepare import data_file_hashes, fingerprint_of
from tunelab.errors import ConfigError
from tunelab.fs import claim, foreign_entries, own_entry, owned_entries, recorded_writer, write_entry_json, write_text
from tunelab.runs import COMPARE_PLAN, COMPARE_WRITER, DataChange, changed_data, is_run_folder, read_json
from tunelab.techniques import TECHNIQUES

log = logging.getLogger(__name__)

WRITER = COMPARE_WRITER
PLAN = COMPARE_PLAN  # what this folder's compare trains: a rerun with other settings is refused
LR_SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # around each technique's default learning rate


class CompareInterrupted(Exception):
    """Ctrl-C during a compare: the run being trained saved a checkpoint; the same command resumes."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    technique: str
    learning_rate: float
    seed: int


def plan_runs(config: TunelabConfig, techniques: list[str], seeds: int, lr_sweep: bool) -> list[PlannedRun]:
    unknown = [name for name in techniques if name not in TECHNIQUES]
    if unknown or not techniques:
        raise ConfigError(f"--techniques: unknown {', '.join(unknown) or '(none given)'}; expected some of "
                          f"{', '.join(TECHNIQUES)}")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give 1 or more")
    runs = []
    for technique in dict.fromkeys(techniques):
        default = TECHNIQUES[technique].default_learning_rate
        rates = [default * f for f in LR_SWEEP_FACTORS] if lr_sweep else [default]
        for rate in rates:
            for seed in range(config.training.seed, config.training.seed + seeds):
                lr_part = f"-lr{rate:.3g}" if lr_sweep else ""
                runs.append(PlannedRun(f"{technique}{lr_part}-seed{seed}", technique, float(f"{rate:.3g}"), seed))
    return runs


def split_technique_items(items: list[str] | None) -> tuple[list[str], list[str]]:
    """Compare's --set items: (those of the config, the ``technique.KEY=VALUE`` ones). A technique item applies to
    every technique compared (``run_config``); loaded with the config, it was validated against the file's
    technique alone (compared or not) and dropped, unsaid, from every other technique's runs. ``technique.name``
    and a whole ``technique=...`` section stay the config's: they say which technique the file's section is."""
    config_items, technique_items = [], []
    for item in items or []:
        path = item.partition("=")[0].strip().split(".")
        is_technique = len(path) > 1 and path[0] == "technique" and path[1] != "name"
        (technique_items if is_technique else config_items).append(item)
    return config_items, technique_items


def _check_technique_items(items: list[str], technique: str) -> None:
    """Refuse a --set technique.KEY item for a technique that has no KEY: compare applies it to every technique
    compared, and leaving it out of this one's runs would change the comparison without a word."""
    fields = TECHNIQUES[technique].config_class.model_fields
    for item, (path, _) in zip(items, parse_overrides(items)):
        if path[1] not in fields:
            raise ConfigError(
                f"technique {technique}: --set {item.strip()}: {technique} has no setting '{path[1]}' (its settings: "
                f"{', '.join(name for name in fields if name != 'name')}). A --set technique.KEY item applies to "
                "every technique compared; to give it to one technique only, write it in the config file's "
                "technique section (which applies to the file's technique only), or compare that technique apart")


def run_config(config: TunelabConfig, run: PlannedRun, out: Path,
               technique_items: list[str] | None = None) -> dict[str, Any]:
    """The config of one run: the user's, with the run's technique (the user's settings of it when the config
    names the same technique) and ``technique_items`` (--set technique.KEY=VALUE, for every technique), learning
    rate, seed and folder. Validated here, so a technique that refuses the config fails before anything trains."""
    technique_items = technique_items or []
    _check_technique_items(technique_items, run.technique)
    # only what the user set: a default the config resolved for its own technique (data.packing turned off, say)
    # must stay a default, which the run's technique resolves again, not become an explicit setting it refuses
    data = config.model_dump(mode="json", exclude_unset=True)
    given = {}
    if data.get("technique", {}).get("name", config.technique.name) != run.technique:
        data["technique"] = {"name": run.technique}
        # the user named this technique on the command line: a refusal of it is not at the file's technique line
        given = {"technique": f"--techniques {run.technique}"}
    data.setdefault("training", {}).update(seed=run.seed, learning_rate=run.learning_rate)
    data.setdefault("output", {}).update(dir=str((out / run.name).resolve()), overwrite=False)
    # the technique items are --set items of the user's command line: a refusal names them as load_config would
    origin = config.origin and replace(config.origin, overrides=(*config.origin.overrides, *technique_items))
    try:  # refused as the user's file would be: at its line or --set item, not at an anonymous '<config>'
        return build_config(data, technique_items, origin=origin, given=given).model_dump(mode="json")
    except ConfigError as exc:
        raise ConfigError(f"technique {run.technique}: {exc}") from None


def _check_out(out: Path) -> None:
    """Use ``out`` only if it is new, empty, or an earlier compare's folder. A file gave a traceback; a run folder
    (or another command's output, or a folder of the user's files) had the compare's runs, configs and logs written
    into it, recorded as that folder's own: an overwrite of the run would then have deleted the compare."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the compare")
    if not out.is_dir() or not any(out.iterdir()):
        return
    writer = recorded_writer(out)
    if is_run_folder(out):  # first: a run folder an older compare wrote into records the compare's plan as its own
        what = "it holds a training run"
    elif writer == WRITER or PLAN in owned_entries(out):
        return
    elif writer is not None:
        what = f"it was written by {writer}"
    else:
        names = foreign_entries(out) or sorted(p.name for p in out.iterdir())
        what = f"it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}, which tunelab compare did not create"
    raise ConfigError(f"--out {out} is not empty and is not a tunelab compare folder ({what}); give a new or empty "
                      "folder, or the --out of an earlier compare to resume it")


def _in_run_order(plan: Any) -> Any:
    """``plan`` with its runs sorted by name: ``--techniques ia3,lora`` after ``lora,ia3`` plans the same runs (each
    its own folder, named by technique and seed), and was refused as a compare with other settings."""
    runs = plan.get("runs") if isinstance(plan, dict) else None
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        return plan
    return {**plan, "runs": sorted(runs, key=lambda run: str(run.get("name")))}


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    saved = read_json(out / PLAN) if (out / PLAN).is_file() else None
    if saved is not None and _in_run_order(saved) != _in_run_order(plan):
        raise ConfigError(f"{out} holds a compare with other settings ({out / PLAN}: {_plan_differences(saved, plan)}); "
                          "give another --out, or the same config, techniques, seeds and --lr-sweep to resume it")
    write_entry_json(out, PLAN, plan)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _plan_differences(saved: Any, plan: dict[str, Any]) -> str:
    """What differs between the folder's compare and this one: its runs (techniques, seeds, learning rates) and the
    config keys. The refusal said only 'other settings', leaving the user to diff compare_plan.json by hand."""
    saved = saved if isinstance(saved, dict) else {}
    parts = []
    runs = [run.get("name") for run in saved.get("runs") or [] if isinstance(run, dict)]
    if sorted(map(str, runs)) != sorted(run["name"] for run in plan["runs"]):
        parts.append(f"runs {', '.join(map(str, runs)) or '(none)'} there, {', '.join(r['name'] for r in plan['runs'])} here")
    if saved.get("technique_set") != plan.get("technique_set"):
        parts.append(f"--set technique items {saved.get('technique_set') or '(none)'} there, "
                     f"{plan.get('technique_set') or '(none)'} here")
    before, now = _flat(saved.get("config")), _flat(plan["config"])
    keys = [key for key in dict.fromkeys([*before, *now]) if before.get(key) != now.get(key)]
    if keys:
        shown = [f"{key} {before.get(key)!r} there, {now.get(key)!r} here" for key in keys[:5]]
        parts.append("config " + "; ".join(shown) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else ""))
    return "; ".join(parts) or "written by another version of tunelab"


def _earlier_run(run_dir: Path) -> str | None:
    """What an earlier compare left of a run: 'completed' (kept as it is), 'checkpoint' (resumed from it), or None
    (nothing worth keeping: trained anew)."""
    status = (read_json(run_dir / "status.json") or {}).get("status") if run_dir.is_dir() else None
    if status == "completed":
        return "completed"
    if status is not None and latest_checkpoint(run_dir / "checkpoints") is not None:
        return "checkpoint"
    return None


def _check_same_data(config: TunelabConfig, planned: list[PlannedRun], out: Path) -> None:
    """Refuse to keep or resume a run trained on data the config's files no longer hold: its figures would be
    reported beside runs of the new data (the plan compares file names, not contents). `train --resume` refuses
    the same case, by the same comparison (``runs.changed_data``)."""
    earlier = [run.name for run in planned if _earlier_run(out / run.name) is not None]
    files = [Path(path) for path in [*config.data.train, *config.data.validation]]
    if not earlier or not all(path.is_file() for path in files):  # a missing file: training names it
        return
    hashes = data_file_hashes(config.data)  # hashes every data file: once, and only when a run is kept
    fingerprint = fingerprint_of(hashes)
    changed = {name: change for name in earlier
               if (change := changed_data(out / name, fingerprint, hashes)) is not None}
    if changed:
        raise ConfigError(_changed_data_message(out, changed, fingerprint))


def _changed_data_message(out: Path, changed: dict[str, DataChange], fingerprint: str) -> str:
    """``changed``: each run trained on other data -> how its data differs (the files that changed)."""
    runs, them = (f"run {next(iter(changed))}", "it") if len(changed) == 1 else (f"runs {', '.join(changed)}", "them")
    files = dict.fromkeys(path for change in changed.values() for path in change.files)
    return (f"{out}: {runs} trained on other data: the data files changed since "
            f"({', '.join(files)}: content hash {next(iter(changed.values())).saved} -> {fingerprint}); keeping "
            f"{them} would report figures of the old data beside the new. Give another --out, or remove "
            f"{', '.join(str(out / name) for name in changed)} to train {them} again on the new data")


def _train_command(config_path: Path, resume: bool, overwrite: bool) -> list[str]:
    command = [sys.executable, "-m", "tunelab", "train", str(config_path), "--no-progress"]
    return command + ["--resume"] * resume + ["--set", "output.overwrite=true"] * overwrite


def _train(run: PlannedRun, config: dict[str, Any], out: Path) -> None:
    """Train one planned run to completion in its own process: kept when completed, resumed from its checkpoint
    when interrupted, started again (its folder is tunelab's own) when it stopped before any checkpoint."""
    run_dir = Path(config["output"]["dir"])
    earlier = _earlier_run(run_dir)
    if earlier == "completed":
        log.info("%s: completed earlier, kept", run.name)
        return
    resume = earlier == "checkpoint"
    overwrite = run_dir.exists() and not resume
    config_path = own_entry(out, "configs") / f"{run.name}.yaml"
    config_path.parent.mkdir(exist_ok=True)
    write_text(config_path, yaml.safe_dump(config, sort_keys=False))
    log_path = own_entry(out, "logs") / f"{run.name}.log"
    log_path.parent.mkdir(exist_ok=True)
    log.info("%s: %s (log: %s)", run.name, "resuming" if resume else "training", log_path)
    status_before = _file_stamp(run_dir / "status.json")
    with open(log_path, "a") as log_file:
        # its own session: a terminal's Ctrl-C reaches this process only, which passes it on exactly once
        process = subprocess.Popen(_train_command(config_path, resume, overwrite), stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = _wait_passing_on_termination(process)
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)  # the run finishes its step and saves a checkpoint
            process.wait()
            raise CompareInterrupted(run.name) from None
    if code == 130:
        raise CompareInterrupted(run.name)
    if code != 0:
        reason = _error_in_status(run_dir / "status.json", status_before) or _error_in_log(log_path)
        raise ConfigError(f"run {run.name} failed{f': {reason}' if reason else ''} (exit code {code}); its output is "
                          f"in {log_path}")


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """Which version of a file is there (inode, modification time), or None: status.json is replaced whole
    (written to a temporary file, then renamed), so a run that wrote it leaves another stamp."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _error_in_status(status_path: Path, stamp_before: tuple[int, int] | None) -> str | None:
    """The error the run recorded in its own status.json when it failed after set-up, on one line, or None. Such a
    failure (a traceback) prints no 'error:' line, so the compare said only its exit code. A status.json this
    run did not write (its stamp unchanged: the run was refused at set-up) holds an earlier session's error."""
    if _file_stamp(status_path) in (None, stamp_before):
        return None
    try:
        status = read_json(status_path)
    except (OSError, ValueError):  # unreadable: the log or the exit code says what it can
        return None
    if not isinstance(status, dict) or status.get("status") != "failed" or not status.get("error"):
        return None
    return " ".join(line.strip() for line in str(status["error"]).splitlines() if line.strip()) or None


def _error_in_log(log_path: Path) -> str | None:
    """The run's own error on one line (`tunelab train` ends a refusal with 'error: ...', unwrapped: its lines are
    the message's own, such as an invalid config's one per mistake), or None: the compare said only 'failed (exit
    code 2)', and the run folder of a run refused at set-up is removed, so the reason was in the log alone. The
    lines are joined as they are: rejoining the console's 80-column wrapping put a space inside long paths."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if not starts:
        return None
    message = " ".join(line.strip() for line in lines[starts[-1]:] if line.strip())
    return message.removeprefix("error: ")


TERMINATING = (signal.SIGTERM, signal.SIGHUP)  # `kill PID`, `timeout`, a closed terminal


def _wait_passing_on_termination(process: subprocess.Popen) -> int:
    """Wait for the run's process, passing on a SIGTERM or SIGHUP the compare receives meanwhile, then end the
    compare by that signal. The run is a session of its own (Ctrl-C reaches it once, through the compare), so
    without this a terminated compare died alone and left its run training, orphaned, holding the run's lock."""
    received: list[int] = []

    def pass_on(signum: int, _frame: Any) -> None:
        received.append(signum)
        process.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there (the CLI's case)
        previous = {sig: signal.signal(sig, pass_on) for sig in TERMINATING}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        signal.raise_signal(received[0])  # as the signal would have ended the compare, now that its run ended too
    return code


def compare(config: TunelabConfig, techniques: list[str], out: Path, seeds: int = 1, lr_sweep: bool = False,
            technique_items: list[str] | None = None) -> dict[str, Any]:
    """Train every planned run (or keep it, when a previous compare finished it) and write compare.json,
    report.md and report.html into ``out``; returns compare.json's content. ``technique_items``: --set
    technique.KEY=VALUE items, for every technique compared (``split_technique_items``)."""
    if config.training.learning_rate is not None:
        log.warning("training.learning_rate %g is not used: each technique trains at its own default learning "
                    "rate (one rate does not fit full fine-tuning and prompt tuning alike)%s",
                    config.training.learning_rate, "" if lr_sweep else "; --lr-sweep tries 3 around it")
    planned = plan_runs(config, techniques, seeds, lr_sweep)
    configs = {run.name: run_config(config, run, out, technique_items) for run in planned}
    _check_out(out)  # before anything is written there
    claim(out, WRITER)
    # the technique items are not in the config: recorded beside it, so a rerun with other ones is refused
    items = {"technique_set": technique_items} if technique_items else {}
    _check_plan(out, {"config": config.model_dump(mode="json"), **items, "runs": [asdict(run) for run in planned]})
    _check_same_data(config, planned, out)  # before any run trains: nothing is kept beside runs of other data
    for index, run in enumerate(planned, start=1):
        log.info("[%d/%d] %s, learning rate %g, seed %d", index, len(planned), run.technique, run.learning_rate,
                 run.seed)
        try:
            _train(run, configs[run.name], out)
        except KeyboardInterrupt:  # between two runs, or while one was being set going
            raise CompareInterrupted(run.name) from None
    result = summarize(planned, configs, out)
    write_reports(out, result)
    return result


def summarize(planned: list[PlannedRun], configs: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """compare.json's content: every run's figures, one row per technique and learning rate, and per technique
    the row of its best learning rate, flagged Pareto-optimal or not."""
    figures = {run.name: run_figures(out / run.name, configs[run.name]) for run in planned}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in planned:
        groups.setdefault((run.technique, run.learning_rate), []).append(figures[run.name])
    sweep_rows = [technique_row(technique, rate, runs) for (technique, rate), runs in groups.items()]
    metric = primary_metric(sweep_rows)
    rows, warnings = best_rows(sweep_rows, metric)
    flag_pareto(rows, metric)
    note = quality_note(sweep_rows, metric)
    return {"primary_metric": {"name": metric[0], "higher_is_better": metric[1], **({"note": note} if note else {})}
            if metric else None,
            "techniques": rows, "learning_rate_sweep": sweep_rows if len(sweep_rows) > len(rows) else None,
            "warnings": warnings, "runs": list(figures.values())}


def best_rows(rows: list[dict[str, Any]], metric: tuple[str, bool] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Per technique, the learning rate with the best primary metric (mean over seeds); a warning when it is the
    lowest or highest rate tried (the optimum may lie beyond the sweep)."""
    best, warnings = [], []
    for technique in dict.fromkeys(row["technique"] for row in rows):
        tried = sorted((row for row in rows if row["technique"] == technique), key=lambda row: row["learning_rate"])
        chosen = min(tried, key=lambda row: quality_cost(row, metric)) if metric and len(tried) > 1 else tried[0]
        if len(tried) > 2 and chosen in (tried[0], tried[-1]):
            warnings.append(f"{technique}: the best learning rate {chosen['learning_rate']:g} is at the edge of the "
                            f"sweep ({tried[0]['learning_rate']:g} to {tried[-1]['learning_rate']:g}); the optimum "
                            "may lie beyond it")
        best.append(chosen)
    return best, warnings
