"""A compare's outputs: compare.json, and the table of techniques as report.md (and on the terminal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.fs import write_entry_json, write_entry_text


def _interval(summary: dict[str, Any] | None, digits: int = 4) -> str:
    if summary is None:
        return "-"
    if summary["low"] is None:
        return f"{summary['mean']:.{digits}g}"
    return f"{summary['mean']:.{digits}g} [{summary['low']:.{digits}g}, {summary['high']:.{digits}g}]"


def _mean(summary: dict[str, Any] | None, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    return "-" if summary is None else f"{summary['mean'] / scale:.{digits}g}{unit}"


def _forgetting(row: dict[str, Any]) -> str:
    if row["forgetting_change"] is None:
        return "-"
    return f"{row['forgetting_change']['mean']:+.1%} ({row['forgetting_flagged_runs']}/{row['seeds']} flagged)"


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The techniques table: headers and rows of text, one row per technique (its best learning rate)."""
    rows = result["techniques"]
    metrics = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    headers = ["technique", "lr", "seeds", *(f"{name} (95% CI)" for name in metrics), "forgetting",
               "trainable params", "peak memory", "wall time", "tokens/s", "artefact", "Pareto"]
    lines = []
    for row in rows:
        lines.append([row["technique"], f"{row['learning_rate']:g}", str(row["seeds"]),
                      *(_interval(row["metrics"].get(name)) for name in metrics), _forgetting(row),
                      f"{row['trainable_parameters']:,}" if row["trainable_parameters"] is not None else "-",
                      _mean(row["peak_memory_bytes"], 2**30, " GiB"), _mean(row["wall_time_s"], unit=" s"),
                      _mean(row["tokens_per_s"]), _mean(row["artefact_bytes"], 2**20, " MiB"),
                      {True: "yes", False: "no", None: "-"}[row["pareto"]]])
    return headers, lines


def markdown(result: dict[str, Any]) -> str:
    headers, rows = table(result)
    metric = result["primary_metric"]
    lines = ["# Technique comparison", ""]
    if metric:
        better = "higher" if metric["higher_is_better"] else "lower"
        lines += [f"Quality: `{metric['name']}` ({better} is better). Each figure is the mean over seeds with its "
                  "Student-t 95% interval in brackets. Pareto: no other technique is at least as good in quality, "
                  "peak memory and wall time together and better in one.", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    if result["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {warning}" for warning in result["warnings"])]
    if result["learning_rate_sweep"]:
        lines += ["", "## Learning-rate sweep", "", "| technique | lr | " + (metric["name"] if metric else "") + " |",
                  "|---|---|---|"]
        lines += [f"| {row['technique']} | {row['learning_rate']:g} | "
                  f"{_interval(row['metrics'].get(metric['name'])) if metric else '-'} |"
                  for row in result["learning_rate_sweep"]]
    lines += ["", "## Runs", "", *(f"- `{run['run']}`: {run['status']}" for run in result["runs"]), ""]
    return "\n".join(lines)


def write_reports(out: Path, result: dict[str, Any]) -> None:
    write_entry_json(out, "compare.json", result)
    write_entry_text(out, "report.md", markdown(result))
