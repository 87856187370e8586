"""The run folder: every report is built from its files, never from logs.

    runs/<name>/
      .tunelab.json        the ownership record: which entries tunelab created here (see below)
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
      evals/<data>-vs-<systems>/  reports of `tunelab eval` on this run (eval.json, report.md/html, predictions.jsonl)
      tensorboard/, mlruns/  TensorBoard events and a local MLflow store, when training.report_to asks for them
      quantize.json        `tunelab quantize`'s table; quantized-<method>/ the model `--save METHOD` kept, with its figures
      .tunelab-lock        while a process writes the run: its pid and host (a second writer is refused)

Ownership (what tunelab may delete)
-----------------------------------
A run folder's entries are tunelab's only if tunelab *recorded* creating them, never because of their names: a
user's own ``model/`` folder or ``eval.json.tmp`` file looks exactly like tunelab's. The record, the atomic writes
and the writer lock are the ones every folder tunelab writes uses (``tunelab.fs``, which also says how a run folder
of an older tunelab, with its ``.tunelab-run.json``, is read). Clearing a run (``output.overwrite``, a failed
pre-flight) removes recorded entries and their temporaries and nothing else.

Every part of tunelab that writes a new file or folder into a run folder goes through that API (the set of
entries is open: eval reports, merges, quantized exports add their own names): ``fs.own_entry`` records a name
before it is written and refuses a user's entry of that name, ``fs.write_entry_json``/``write_entry_text`` write a
whole file atomically, ``fs.append_entry_line`` appends a line, ``fs.new_entry_folder`` builds a folder that
replaces the old one only once complete, ``fs.remove_entry`` deletes a recorded entry.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import read_run_config
from tunelab.errors import ConfigError
from tunelab.fs import LEGACY_RUN_RECORD, recorded_writer
from tunelab.fs import read_json  # also the name the readers of run files import from here
from tunelab.objectives import quality_figure
from tunelab.objectives.online import MEAN_REWARD, STEP_REWARD
from tunelab.techniques import technique_variant
from tunelab.techniques.base import RESULT_DIRS

log = logging.getLogger(__name__)

# The entries the trainer itself writes. Informational only: ownership is what the record names, never a name.
RUN_ENTRIES = frozenset({"config.yaml", "data_report.json", "metrics.jsonl", "eval.json", "base_eval.json",
                         "status.json", *RESULT_DIRS, "tokenizer", "checkpoints",
                         "run_info.json", "evals", "tensorboard", "mlruns", "wandb",
                         "quantize.json", "exports", "merged"})
WRITER = "tunelab train"  # who a run folder's ownership record says wrote it


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a training run's: it holds a config.yaml (what ``load_run`` and ``tunelab runs`` open a
    run by), or its ownership record says ``tunelab train`` wrote it (a run that lost or never wrote its config),
    or it carries an older tunelab's run record."""
    return ((folder / "config.yaml").is_file() or recorded_writer(folder) == WRITER
            or (folder / LEGACY_RUN_RECORD).is_file())


@dataclass(frozen=True)
class DataChange:
    """How the data ``changed_data`` found differs from the data a run was trained on."""
    saved: str  # the content hash of the files the run was trained on
    files: list[str]  # the files that changed (every file, for a run that saved only the one hash)


def changed_data(run_dir: Path, fingerprint: str, hashes: list[dict[str, str]]) -> DataChange | None:
    """How the data files ``run_dir`` was trained on (its data_report.json) differ from the files now, when
    ``fingerprint`` (their one hash, ``data.prepare.fingerprint_of``) differs from the saved one; None when they
    agree or the run saved none. ``hashes``: each file's (``data.prepare.data_file_hashes``). The one comparison
    behind the refusals of `train --resume` and `compare` to mix two datasets."""
    report = read_json(run_dir / "data_report.json") or {}
    saved = report.get("data_fingerprint")
    if saved is None or saved == fingerprint:
        return None
    return DataChange(saved, changed_files(report.get("data_file_hashes"), hashes))


def changed_files(saved: Any, hashes: list[dict[str, str]]) -> list[str]:
    """The files whose content differs between ``saved`` and ``hashes`` (both as ``data_file_hashes`` lists), matched
    by role and position as the fingerprint orders them; a file added or removed counts as changed. Every file now
    when ``saved`` is no such list: a run of an older tunelab saved only one hash over all the files."""
    if not (isinstance(saved, list) and all(isinstance(h, dict) and {"role", "path", "sha256"} <= h.keys()
                                            for h in saved)):
        return [h["path"] for h in hashes]
    changed = []
    for role in ("train", "validation"):
        before = [h for h in saved if h["role"] == role]
        now = [h for h in hashes if h["role"] == role]
        for index in range(max(len(before), len(now))):
            if index >= len(now):
                changed.append(str(before[index]["path"]))
            elif index >= len(before) or before[index]["sha256"] != now[index]["sha256"]:
                changed.append(now[index]["path"])
    return list(dict.fromkeys(changed)) or [h["path"] for h in hashes]  # none differs: a damaged list, name them all


# ---------------------------------------------------------------- reading files


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


def run_file(run_dir: Path, name: str) -> dict[str, Any]:
    """The JSON object of the run file ``name`` ({} when the run has none). A file that is not one (damaged, cut
    short, edited by hand) is a ConfigError naming it and what was expected: `tunelab runs show` printed a
    JSONDecodeError or AttributeError traceback."""
    path = run_dir / name
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable as JSON ({exc}); expected the JSON object tunelab writes there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a JSON {type(data).__name__}")
    return data


def summarize_run(run_dir: Path) -> dict[str, Any] | None:
    """Key figures of one run folder, or None when the folder is not a tunelab run."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    config = read_run_config(run_dir)
    status = run_file(run_dir, "status.json")
    evaluation = run_file(run_dir, "eval.json")
    info = run_file(run_dir, "run_info.json")
    memory = info.get("peak_memory") if isinstance(info.get("peak_memory"), dict) else {}
    train_losses = [m["loss"] for m in read_metrics(run_dir) if m.get("kind") == "train" and not m.get("skipped")]
    forgetting = evaluation.get("forgetting") or {}
    return {
        "run": str(run_dir),
        "status": str(status.get("status", "unknown")),  # a table cell: text, whatever the file holds
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
        "peak_rss_gib": memory.get("rss_gib"),
        "trainable_parameters": info.get("trainable_parameters"),
        "total_parameters": info.get("total_parameters"),
        # on a GPU the most torch allocated there, else the process's peak RSS (as tunelab compare reads it)
        "peak_memory_bytes": memory.get("gpu_max_allocated_bytes", memory.get("rss_bytes")),
        "primary_metric": primary_metric(evaluation, quality_figure((config.get("objective") or {}).get("name"))),
    }


# A generation metric judges a run only when computed on at least this many generations: on the default 4
# (eval.num_samples) exact match is 0 or 0.25 by chance. `tunelab runs` and `tunelab compare` judge by the same rule.
MIN_QUALITY_SAMPLES = 20


def primary_metric(evaluation: dict[str, Any], quality: tuple[str, bool] | None = None) -> dict[str, Any] | None:
    """The figure a run is judged by, against its base: its objective's own validation figure (``quality``:
    ``objectives.quality_figure``, e.g. a DPO run's preference accuracy) when both models have it, else the first
    task metric of eval.json (the config's ``eval.metrics`` order) computed on ``MIN_QUALITY_SAMPLES`` generations
    or more (as compare chooses; `tunelab runs` showed a compare's runs by an exact match of 2 generations where the
    compare judged them by the validation loss), else the validation loss; None when the run was not evaluated
    before and after."""
    if quality is not None:
        name, higher = quality
        base, tuned = (evaluation.get("base") or {}).get(name), (evaluation.get("tuned") or {}).get(name)
        if base is not None and tuned is not None:
            return {"name": name, "base": base, "tuned": tuned, "delta": tuned - base, "higher_is_better": higher}
    for name, figures in (evaluation.get("metrics") or {}).items():
        if figures.get("tuned") is not None and figures.get("base") is not None \
                and figures.get("examples", MIN_QUALITY_SAMPLES) >= MIN_QUALITY_SAMPLES:
            return {"name": name, "base": figures["base"], "tuned": figures["tuned"],
                    "delta": figures["tuned"] - figures["base"], "higher_is_better": figures.get("higher_is_better", True)}
    base, tuned = (evaluation.get("base") or {}).get("loss"), (evaluation.get("tuned") or {}).get("loss")
    if base is None or tuned is None:
        return None
    return {"name": "val_loss", "base": base, "tuned": tuned, "delta": tuned - base, "higher_is_better": False}


def _modified(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def list_runs(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    found = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = _summary_or_damage(run_dir)
        if summary is not None:
            found.append(summary)
    return found


def _summary_or_damage(run_dir: Path) -> dict[str, Any] | None:
    try:
        return summarize_run(run_dir)
    except ConfigError as exc:  # it names the file and what was expected: said in the row, relative to the run
        return {"run": str(run_dir), "status": f"unreadable: {str(exc).removeprefix(f'{run_dir}{os.sep}')}"}
    except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as exc:  # one damaged run must not hide the rest
        return {"run": str(run_dir), "status": f"unreadable ({type(exc).__name__})"}


# The files of a `tunelab compare --out DIR` folder: its plan, written before the first run trains, and its result,
# once every run finished. A folder holding either is a comparison: its run folders are one group.
COMPARE_PLAN = "compare_plan.json"
COMPARE_RESULT = "compare.json"
COMPARE_WRITER = "tunelab compare"  # who a compare folder's ownership record says wrote it


def is_compare_folder(folder: Path) -> bool:
    """Whether ``folder`` is a `tunelab compare --out` folder: it holds the compare's plan or result, or its
    ownership record says tunelab compare wrote it (a compare that lost both files)."""
    return ((folder / COMPARE_PLAN).is_file() or (folder / COMPARE_RESULT).is_file()
            or recorded_writer(folder) == COMPARE_WRITER)


def list_run_groups(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, comparisons) under ``root``: its run folders, and for each compare folder among them its runs
    (each summary with ``group``, the compare folder's name; None for a run of ``root`` itself) and its summary
    (``compare_summary``)."""
    runs = [{**summary, "group": None} for summary in list_runs(root)]
    groups = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and is_compare_folder(p)) if root.is_dir() else []
    for folder in folders:
        members = [{**summary, "group": folder.name} for summary in list_runs(folder)]
        runs += members
        groups.append(compare_summary(folder, [Path(m["run"]).name for m in members]))
    return runs, groups


def compare_summary(folder: Path, runs: list[str]) -> dict[str, Any]:
    """A comparison at a glance, from its compare.json (absent while it is still running): one row per technique
    with the primary metric's mean, peak memory, wall time and the Pareto flag."""
    try:
        result = read_json(folder / COMPARE_RESULT)
        status = "completed" if isinstance(result, dict) else "in progress"
    except (OSError, ValueError) as exc:  # a damaged compare.json must not hide its runs
        result, status = None, f"unreadable ({type(exc).__name__})"
    result = result if isinstance(result, dict) else None
    metric = ((result or {}).get("primary_metric") or {}).get("name")
    rows = [{"technique": row.get("technique"), "learning_rate": row.get("learning_rate"), "seeds": row.get("seeds"),
             "metric": ((row.get("metrics") or {}).get(metric) or {}).get("mean") if metric else None,
             "peak_memory_bytes": (row.get("peak_memory_bytes") or {}).get("mean"),
             "wall_time_s": (row.get("wall_time_s") or {}).get("mean"), "pareto": row.get("pareto")}
            for row in (result or {}).get("techniques") or []]
    return {"name": folder.name, "path": str(folder), "status": status,
            "primary_metric": metric, "techniques": rows, "runs": runs,
            "report": (folder / "report.html").is_file()}


def run_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """[step, value] points of the run's loss (training and validation) and, for a run that learns from rewards,
    of its reward (of the sampled completions at each step, of greedy validation answers at each evaluation):
    a policy's loss hovers near 0 whatever it learns, its reward shows it."""
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if m.get("kind") == "train" and not m.get("skipped")]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    curves = {"train": [[m["step"], m["loss"]] for m in train if "loss" in m],
              "validation": [[m["step"], m["loss"]] for m in evals if "loss" in m]}
    if any(STEP_REWARD in m for m in train):
        curves[STEP_REWARD] = [[m["step"], m[STEP_REWARD]] for m in train if STEP_REWARD in m]
        curves["validation_reward"] = [[m["step"], m[MEAN_REWARD]] for m in evals if MEAN_REWARD in m]
    return curves


def run_details(run_dir: Path) -> dict[str, Any]:
    """Everything ``tunelab runs show`` prints: the summary plus the run's files, read as they are."""
    try:
        summary = summarize_run(run_dir)
    except (AttributeError, TypeError, KeyError) as exc:  # a file's value of another type than tunelab writes
        raise ConfigError(f"{run_dir}: a run file holds a value of an unexpected type ({type(exc).__name__}: {exc}); "
                          "expected the files as tunelab wrote them") from None
    if summary is None:
        if not run_dir.exists():
            raise ConfigError(f"{run_dir}: no such run folder")
        if is_compare_folder(run_dir):
            raise ConfigError(f"{run_dir}: a compare folder, not a run: `tunelab runs {run_dir}` lists its runs, "
                              f"{run_dir / COMPARE_RESULT} and report.md compare them")
        raise ConfigError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    evals = run_dir / "evals"
    return {
        "summary": summary,
        "config": read_run_config(run_dir),
        "status": run_file(run_dir, "status.json"),
        "run_info": run_file(run_dir, "run_info.json"),
        "eval": run_file(run_dir, "eval.json"),
        "data": {k: v for k, v in run_file(run_dir, "data_report.json").items()
                 if k in ("records", "train", "validation", "truncation_rate", "warnings")},
        "evaluations": sorted(str(p.relative_to(run_dir)) for p in evals.glob("*/eval.json")) if evals.is_dir() else [],
        "curves": run_curves(run_dir),
    }
