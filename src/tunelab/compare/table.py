"""From run folders to the comparison: each run's figures read from its own files, then one row per technique
(the best learning rate's seeds) with means, 95% intervals and the Pareto flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.compare.stats import mean_interval, pareto_flags
from tunelab.objectives import quality_figure
from tunelab.runs import MIN_QUALITY_SAMPLES, read_json, read_metrics
from tunelab.techniques.base import RESULT_DIRS

VAL_LOSS = "val_loss"  # the tuned model's validation loss (eval.json), the quality figure every run has
AT_LAST_EVAL = "@last_eval"  # suffix of a training.eval_metrics figure, read from the run's last evaluation
# A generation metric judges quality only when computed on at least MIN_QUALITY_SAMPLES generations (runs.py: the
# rule `tunelab runs` follows too): on the default 4 (eval.num_samples) exact match is 0 or 0.25 by chance, and
# judging by it made the Pareto flag and the learning-rate choice ignore quality. With fewer, the validation loss
# (every validation example) judges, and compare.json says why.


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_figures(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """One finished run's figures, each read from the file the run wrote it to."""
    evaluation = read_json(run_dir / "eval.json") or {}
    info = read_json(run_dir / "run_info.json") or {}
    memory = info.get("peak_memory") or {}
    metrics: dict[str, float] = {}
    directions: dict[str, bool] = {}  # metric -> higher is better
    quality = quality_figure((config.get("objective") or {}).get("name"))
    if quality is not None and (evaluation.get("tuned") or {}).get(quality[0]) is not None:
        # first: the objective's own validation figure is the task metric that judges it (primary_metric)
        metrics[quality[0]], directions[quality[0]] = evaluation["tuned"][quality[0]], quality[1]
    if (evaluation.get("tuned") or {}).get("loss") is not None:
        metrics[VAL_LOSS], directions[VAL_LOSS] = evaluation["tuned"]["loss"], False
    samples: dict[str, int] = {}  # generation metric -> the generations it was computed on
    for name, figures in (evaluation.get("metrics") or {}).items():
        metrics[name], directions[name] = figures["tuned"], figures["higher_is_better"]
        samples[name] = figures.get("examples", 0)
    logged = read_metrics(run_dir)
    evals = [m for m in logged if m.get("kind") == "eval"]
    trained = [m for m in logged if m.get("kind") == "train"]
    for name in config["training"].get("eval_metrics") or []:
        if evals and evals[-1].get(name) is not None:
            metrics[name + AT_LAST_EVAL] = evals[-1][name]
            samples[name + AT_LAST_EVAL] = (config.get("eval") or {}).get("num_samples", 0)
    forgetting = evaluation.get("forgetting") or {}
    results = [run_dir / name for name in RESULT_DIRS if (run_dir / name).is_dir()]
    return {
        "run": run_dir.name,
        "status": (read_json(run_dir / "status.json") or {}).get("status"),
        "metrics": metrics,
        "higher_is_better": directions,
        "samples": samples,
        "forgetting_change": forgetting.get("relative_change"),
        "forgetting_flagged": forgetting.get("flagged"),
        "trainable_parameters": info.get("trainable_parameters"),
        "total_parameters": info.get("total_parameters"),
        "training_tokens": trained[-1].get("tokens") if trained else None,  # the whole run's, resumes included
        # cost figures of the whole run: a resumed run's run_info.json sums its sessions (wall time, tokens) and keeps
        # the highest peak (run_info.py)
        # on a GPU the most torch allocated there, else the process's peak RSS (each run is its own process)
        "peak_memory_bytes": memory.get("gpu_max_allocated_bytes", memory.get("rss_bytes")),
        "wall_time_s": info.get("wall_time_s"),
        "tokens_per_s": info.get("tokens_per_s"),
        "artefact_bytes": sum(folder_bytes(path) for path in results) if results else None,
    }


def _summary(values: list[Any], floor: float | None = None) -> dict[str, Any] | None:
    present = [v for v in values if v is not None]
    return mean_interval(present, floor=floor) if present else None


def technique_row(technique: str, learning_rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One technique at one learning rate: each figure as mean and 95% interval over its seeds."""
    names = list(dict.fromkeys(name for run in runs for name in run["metrics"]))
    flagged = [run["forgetting_flagged"] for run in runs if run["forgetting_flagged"] is not None]
    return {
        "technique": technique,
        "learning_rate": learning_rate,
        "seeds": len(runs),
        "runs": [run["run"] for run in runs],
        "metrics": {name: _summary([run["metrics"].get(name) for run in runs]) for name in names},
        "higher_is_better": {k: v for run in runs for k, v in run["higher_is_better"].items()},
        "samples": {k: min(run.get("samples", {}).get(k, 0) for run in runs)  # the fewest any seed had
                    for k in {k for run in runs for k in run.get("samples", {})}},
        "forgetting_change": _summary([run["forgetting_change"] for run in runs]),
        "forgetting_flagged_runs": sum(flagged) if flagged else None,
        "trainable_parameters": runs[0]["trainable_parameters"],  # the same for every seed
        **{key: _summary([run[key] for run in runs], floor=0.0)  # none of these costs can be negative
           for key in ("peak_memory_bytes", "wall_time_s", "tokens_per_s", "artefact_bytes", "training_tokens")},
    }


def enough_samples(name: str, rows: list[dict[str, Any]]) -> bool:
    """Whether every row's ``name`` was computed on enough examples to judge quality by: an objective's own figure
    (all validation examples) always; a generation metric on ``MIN_QUALITY_SAMPLES`` generations or more."""
    return all(row.get("samples", {}).get(name, MIN_QUALITY_SAMPLES) >= MIN_QUALITY_SAMPLES for row in rows)


def quality_note(rows: list[dict[str, Any]], metric: tuple[str, bool] | None) -> str | None:
    """Why a generation metric every row has did not judge quality (too few generations), or None."""
    if not rows or metric is None:
        return None
    skipped = [f"{name} ({min(row['samples'][name] for row in rows)} generations)" for name in rows[0]["metrics"]
               if name in rows[0].get("samples", {}) and not enough_samples(name, rows)
               and all(name in row["metrics"] for row in rows)]
    if not skipped:
        return None
    return (f"quality is {metric[0]}, not {', '.join(skipped)}: a generation metric judges quality from "
            f"{MIN_QUALITY_SAMPLES} generations up (raise eval.num_samples)")


def primary_metric(rows: list[dict[str, Any]]) -> tuple[str, bool] | None:
    """The quality figure the Pareto flag and the learning-rate choice use: the objective's own validation figure,
    else the config's first task metric every row has computed on enough generations (``enough_samples``), else
    the validation loss; with whether higher is better."""
    if not rows:
        return None
    shared = [name for name in rows[0]["metrics"] if all(row["metrics"].get(name) for row in rows)]
    if not shared:
        return None
    tasks = [name for name in shared if name != VAL_LOSS and not name.endswith(AT_LAST_EVAL)
             and enough_samples(name, rows)]
    name = tasks[0] if tasks else VAL_LOSS if VAL_LOSS in shared else shared[0]
    return name, bool(rows[0]["higher_is_better"].get(name, False))


def quality_cost(row: dict[str, Any], metric: tuple[str, bool]) -> float:
    mean = row["metrics"][metric[0]]["mean"]
    return -mean if metric[1] else mean


def flag_pareto(rows: list[dict[str, Any]], metric: tuple[str, bool] | None) -> None:
    """Mark each row Pareto-optimal or not over quality x peak memory x wall time (all as costs)."""
    usable = [row for row in rows if metric and row["peak_memory_bytes"] and row["wall_time_s"]]
    costs = [(quality_cost(row, metric), row["peak_memory_bytes"]["mean"], row["wall_time_s"]["mean"])
             for row in usable] if metric else []
    for row in rows:
        row["pareto"] = None
    for row, optimal in zip(usable, pareto_flags(costs)):
        row["pareto"] = optimal
