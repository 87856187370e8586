"""Terminal output with rich: the training progress bar, the before/after table, the data report."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# markup=False: printed text holds user data (code with [brackets], chat tags like [/INST]) that Rich must not
# read as markup; styles are given explicitly with Text and style=.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)  # logs and errors; stdout is for results


@contextmanager
def training_progress(total: int, done: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(loss=, lr=, tokens_per_s=, note=)``, drawing loss, learning rate, tokens/s, ETA and the
    last evaluation's note (validation loss, the best metric, the overfitting gap)."""
    if not enabled:
        yield lambda **_: None
        return
    columns = (
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=total, completed=done, loss="-", lr="-", speed="-", note="")

        def advance(loss: float, lr: float, tokens_per_s: float, note: str = "") -> None:
            # note: the last evaluation (validation loss, best metric, train-validation gap and its trend)
            progress.update(task, advance=1, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{tokens_per_s:,.0f}", note=note)

        yield advance


def print_before_after(evaluation: dict[str, Any] | None) -> None:
    if not evaluation:
        return
    if evaluation["tuned"] is None:
        console.print(evaluation["note"], style="yellow")
        return
    if "base" not in evaluation:  # eval.before_after is off
        console.print(f"validation loss {evaluation['tuned']['loss']:.4f}")
        return
    base, tuned = evaluation["base"], evaluation["tuned"]
    table = Table(title="Before / after (validation set)")
    for column in ("metric", "base model", "fine-tuned", "change"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in ("loss", "perplexity"):
        change = (tuned[key] - base[key]) / base[key] if base[key] else 0.0
        style = "green" if change < 0 else "red"
        table.add_row(key, f"{base[key]:.4f}", f"{tuned[key]:.4f}", Text(f"{change:+.1%}", style=style))
    console.print(table)
    for i, sample in enumerate(evaluation.get("samples", []), start=1):
        samples = Table(title=f"Sample {i} ({sample['source']})", show_lines=True, expand=True)
        samples.add_column("reference")
        samples.add_column("base model")
        samples.add_column("fine-tuned")
        samples.add_row(sample["reference"], sample["base"], sample["tuned"])
        console.print(Text(_last_user_turn(sample["prompt"]), style="bold"))
        console.print(samples)


def _last_user_turn(prompt: str, limit: int = 300) -> str:
    return ("prompt: ..." + prompt[-limit:]) if len(prompt) > limit else f"prompt: {prompt}"


def print_data_report(report: dict[str, Any]) -> None:
    table = Table(title="Data report", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for info in report["files"]:
        table.add_row(f"{info['role']} file", f"{info['path']} ({info['format']}, {info['records']} records)")
    table.add_row("formats", ", ".join(f"{k}: {v}" for k, v in report["formats"].items()))
    for key in ("records", "duplicates_removed", "overlap_removed", "overlap_kept", "dropped_overlong",
                "zero_supervised_examples"):
        if key in report and (key != "overlap_kept" or report[key]):  # kept overlap: only when there is some
            table.add_row(key.replace("_", " "), str(report[key]))
    if report.get("prompt_completion"):
        table.add_row("prompt_completion rendered as", report["prompt_completion"])
    for split in ("train", "validation"):
        stats = report[split]
        lengths = stats["token_length"]
        table.add_row(f"{split} examples", str(stats["examples"]))
        if lengths:
            table.add_row(f"{split} tokens p50/p90/p99/max",
                          f"{lengths['p50']:.0f} / {lengths['p90']:.0f} / {lengths['p99']:.0f} / {lengths['max']:.0f}")
        if stats["examples"]:  # an empty split has no share to show (0.0% would read as a masking bug)
            table.add_row(f"{split} supervised share", f"{stats['supervised_share']:.1%}")
    for name, counts in (report.get("tasks") or {}).items():
        table.add_row(f"task {name}", f"{counts['train']} train / {counts['validation']} validation")
    table.add_row("truncation rate", f"{report['truncation_rate']:.1%}")
    console.print(table)
    for change in report["tokenizer_changes"]:
        console.print(Text.assemble(("tokenizer change: ", "yellow"), change))
    for warning in report["warnings"]:
        console.print(Text.assemble(("warning: ", "yellow"), warning))
    example = report.get("example")
    if example:
        print_supervised_example(example)


def print_supervised_example(example: dict[str, Any]) -> None:
    """One example with its supervised tokens in green; without colour (a pipe, a CI log, NO_COLOR) they are
    marked ⟦like this⟧ instead, so the mask can still be read."""
    colour = console.is_terminal and not console.no_color
    legend = ("green", "bold green") if colour else "⟦...⟧"
    console.print(Text.assemble("\nExample ", example["source"], " (", legend, " = supervised tokens, which take the loss):"))
    text = Text()
    for segment in example["segments"]:
        if colour:
            text.append(segment["text"], style="bold green" if segment["supervised"] else "dim")
        else:
            text.append(f"⟦{segment['text']}⟧" if segment["supervised"] else segment["text"])
    console.print(text)


def print_runs(runs: list[dict[str, Any]]) -> None:
    table = Table(title="Runs")
    table.add_column("run", overflow="fold", ratio=2)  # fold, never truncate: the name is how rows differ
    for column in ("status", "technique", "model", "step", "train loss", "val loss base -> tuned"):
        table.add_column(column, overflow="fold")
    for run in runs:
        val = "-"
        if run["tuned_val_loss"] is not None:
            base = f"{run['base_val_loss']:.4f}" if run["base_val_loss"] is not None else "?"
            val = f"{base} -> {run['tuned_val_loss']:.4f}"
        loss = f"{run['train_loss']:.4f}" if run["train_loss"] is not None else "-"
        table.add_row(run["run"], run["status"], str(run["technique"]), str(run["model"]), str(run["step"]), loss, val)
    console.print(table)


def print_eval_report(report: dict[str, Any]) -> None:
    """Scores of every system, then each comparison's deltas with intervals and the biggest changes."""
    names = [s["name"] for s in report["systems"]]
    table = Table(title=f"{report['examples']} examples: {', '.join(report['data'])}")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for metric, info in report["metrics"].items():
        table.add_row(f"{metric} {'↑' if info['higher_is_better'] else '↓'}",
                      *(f"{info['scores'][n]:.4f}" for n in names))
    console.print(table)
    for comparison in report["comparisons"]:
        table = Table(title=f"{report['target']} - {comparison['against']} (paired bootstrap 95% interval)")
        for column in ("metric", "delta", "interval", "verdict", "wins/losses/ties"):
            table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
        for metric, c in comparison["metrics"].items():
            style = {"better": "green", "worse": "red"}.get(c["verdict"], "")
            table.add_row(metric, f"{c['delta']:+.4f}", f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
                          Text(c["verdict"], style=style), f"{c['wins']}/{c['losses']}/{c['ties']}")
        console.print(table)
        for key, title in (("improved", "improved most"), ("worsened", "worsened most")):
            for example in comparison[key][:3]:
                changes = Table(title=f"{title} ({report['primary_metric']}): {example['source']}", show_lines=True,
                                expand=True)
                for column in ("reference", report["target"], comparison["against"]):
                    changes.add_column(column, overflow="fold")
                changes.add_row(example["reference"] or "", example["target"] or "", example["other"] or "")
                console.print(changes)
    console.print(f"report: {report['output']}/report.html (and report.md, eval.json, predictions.jsonl)")
