"""A compare's outputs: compare.json, the table of techniques as report.md (and on the terminal), and a
self-contained report.html (the table, an inline SVG Pareto plot and the loss curves overlaid; no remote asset)."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from tunelab.fs import write_entry_json, write_entry_text
from tunelab.runs import COMPARE_RESULT, read_metrics


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
                  "peak memory and wall time together and better in one."
                  + (f" Note: {metric['note']}." if metric.get("note") else ""), ""]
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


def loss_curves(out: Path, result: dict[str, Any]) -> dict[str, list[list[tuple[int, float]]]]:
    """Per technique (its reported learning rate), each run's (step, training loss), from its metrics.jsonl."""
    return {row["technique"]: [[(m["step"], m["loss"]) for m in read_metrics(out / run)
                                if m.get("kind") == "train" and not m.get("skipped")] for run in row["runs"]]
            for row in result["techniques"]}


def write_reports(out: Path, result: dict[str, Any]) -> None:
    write_entry_json(out, COMPARE_RESULT, result)
    write_entry_text(out, "report.md", markdown(result))
    write_entry_text(out, "report.html", html_report(result, loss_curves(out, result)))


# ---------------------------------------------------------------- report.html: self-contained, inline SVG only

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, MARGIN = 640, 360, 56


def _scale(values: list[float], low_px: float, high_px: float) -> Any:
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return lambda v: low_px + (v - low) / span * (high_px - low_px)


def _axes(x_label: str, y_label: str) -> list[str]:
    bottom, right = HEIGHT - MARGIN, WIDTH - MARGIN / 2
    return [f'<line x1="{MARGIN}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
            f'<line x1="{MARGIN}" y1="{MARGIN / 2}" x2="{MARGIN}" y2="{bottom}" stroke="#333"/>',
            f'<text x="{(MARGIN + right) / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 14 {HEIGHT / 2})">'
            f'{escape(y_label)}</text>']


def pareto_svg(result: dict[str, Any]) -> str:
    """Quality against peak memory, one point per technique, its wall time in the label; Pareto-optimal points
    filled."""
    metric = result["primary_metric"]
    rows = [row for row in result["techniques"] if metric and row["metrics"].get(metric["name"])
            and row["peak_memory_bytes"]]
    if not rows:
        return "<p>No quality and memory figures to plot.</p>"
    memory = [row["peak_memory_bytes"]["mean"] / 2**30 for row in rows]
    quality = [row["metrics"][metric["name"]]["mean"] for row in rows]
    x = _scale(memory, MARGIN + 20, WIDTH - MARGIN)
    y = _scale(quality, HEIGHT - MARGIN - 20, MARGIN / 2 + 10)
    parts = _axes("peak memory (GiB)", metric["name"] + (" (higher is better)" if metric["higher_is_better"]
                                                          else " (lower is better)"))
    for i, (row, m, q) in enumerate(zip(rows, memory, quality)):
        colour = PALETTE[i % len(PALETTE)]
        fill = colour if row["pareto"] else "white"
        parts.append(f'<circle cx="{x(m):.1f}" cy="{y(q):.1f}" r="6" fill="{fill}" stroke="{colour}" stroke-width="2">'
                     f'<title>{escape(row["technique"])}: {q:.4g}, {m:.3g} GiB</title></circle>')
        seconds = _mean(row["wall_time_s"], unit=" s")
        parts.append(f'<text x="{x(m) + 9:.1f}" y="{y(q) + 4:.1f}">{escape(row["technique"])} ({seconds})</text>')
    return _svg(parts, "Quality against peak memory; filled: Pareto-optimal over quality, memory and time")


def loss_svg(curves: dict[str, list[list[tuple[int, float]]]]) -> str:
    """Training loss per step, every run, one colour per technique."""
    points = [p for runs in curves.values() for run in runs for p in run]
    if not points:
        return "<p>No training losses logged.</p>"
    x = _scale([float(s) for s, _ in points], MARGIN, WIDTH - MARGIN / 2)
    y = _scale([loss for _, loss in points], HEIGHT - MARGIN, MARGIN / 2)
    parts = _axes("step", "training loss")
    for i, (technique, runs) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        for run in runs:
            path = " ".join(f"{x(s):.1f},{y(loss):.1f}" for s, loss in run)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5" opacity="0.8">'
                         f'<title>{escape(technique)}</title></polyline>')
        parts.append(f'<text x="{WIDTH - MARGIN - 90}" y="{MARGIN / 2 + 16 * (i + 1)}" fill="{colour}">'
                     f'{escape(technique)}</text>')
    return _svg(parts, "Training loss, every run overlaid")


def _svg(parts: list[str], title: str) -> str:
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">{"".join(parts)}</svg>'
            f"<figcaption>{escape(title)}</figcaption></figure>")


def html_report(result: dict[str, Any], curves: dict[str, list[list[tuple[int, float]]]]) -> str:
    headers, rows = table(result)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    warnings = "".join(f"<li>{escape(w)}</li>" for w in result["warnings"])
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Technique comparison</title>"
            f"<style>{style}</style></head><body><h1>Technique comparison</h1>"
            f"<table><tr>{head}</tr>{body}</table>"
            + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")
            + f"<h2>Pareto</h2>{pareto_svg(result)}<h2>Loss curves</h2>{loss_svg(curves)}</body></html>")
