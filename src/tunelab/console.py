"""Terminal output with rich: the training progress bar, the before/after table, the data report."""

from __future__ import annotations

import textwrap
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

# markup=False: printed text holds user data (code with [brackets], chat tags like [/INST]) that Rich must not
# read as markup; styles are given explicitly with Text and style=.
console = Console(markup=False)
# Identifiers (run, technique, model, metric and method names) are never folded or cut, whatever the width: a
# folded name cannot be grepped or pasted back into a command. Other columns wrap around them.
NAME_COLUMN: dict[str, Any] = {"no_wrap": True, "overflow": "ignore"}


def print_table(table: Table) -> None:
    """Print a table so that its unbreakable name columns stay whole. Rich would squeeze a table wider than the
    console (80 columns when piped) and cut the names: such a table is printed at its natural width instead, its
    lines running past the console's."""
    size = Measurement.get(console, console.options.update_width(10_000), table)  # unclamped
    # print(width=...) cannot exceed the console's own width: a wider table needs a console of its width
    fits = size.minimum <= console.width
    (console if fits else Console(markup=False, width=size.maximum)).print(table, crop=False)
err_console = Console(stderr=True, markup=False)  # logs and errors; stdout is for results


def wrap_words(text: str, width: int) -> str:
    """``text`` with its lines broken at spaces to fit ``width`` columns, each continuation indented as its line
    is; a path, flag or any other run without a space is never broken, and one wider than ``width`` has a line
    of its own. A terminal wraps at its edge mid-word, and rich folds a long word: both broke paths."""
    lines = []
    for line in text.split("\n"):
        indent = line[: len(line) - len(line.lstrip(" "))]
        lines.extend(textwrap.wrap(line, max(width, 1), subsequent_indent=indent, break_long_words=False,
                                   break_on_hyphens=False) or [line])
    return "\n".join(lines)


class _SilentProgress:
    def __call__(self, loss: float, lr: float, tokens_per_s: float, note: str = "") -> None:
        pass

    def evaluated(self, note: str) -> None:
        pass


class _BarProgress:
    """The rich bar on a terminal: loss, learning rate, tokens/s, elapsed, ETA and the last evaluation's note."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def __call__(self, loss: float, lr: float, tokens_per_s: float, note: str = "") -> None:
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{tokens_per_s:,.0f}",
                             note=note)

    def evaluated(self, note: str) -> None:
        self.progress.update(self.task, note=note)


class _PlainProgress:
    """A log file or CI (stdout not a terminal), where a bar prints nothing until the end: one plain line at the
    first step, every ``every`` steps and at the last, and one at each evaluation."""

    def __init__(self, total: int, done: int, every: int) -> None:
        self.total, self.step, self.every = total, done, max(every, 1)
        self.first, self.started = done + 1, time.monotonic()

    def __call__(self, loss: float, lr: float, tokens_per_s: float, note: str = "") -> None:
        self.step += 1
        if self.step in (self.first, self.total) or self.step % self.every == 0:
            elapsed = time.monotonic() - self.started
            eta = elapsed / (self.step - self.first + 1) * (self.total - self.step)
            _plain(f"step {self.step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tokens/s  "
                   f"elapsed {_clock(elapsed)}  eta {_clock(eta)}")

    def evaluated(self, note: str) -> None:
        _plain(f"step {self.step}/{self.total}  evaluation: {note}")


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _plain(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)  # soft_wrap: one line in the log, however long


TrainingProgress = _SilentProgress | _BarProgress | _PlainProgress


@contextmanager
def training_progress(total: int, done: int, enabled: bool = True, plain_every: int = 1) -> Iterator[TrainingProgress]:
    """Yield ``advance(loss=, lr=, tokens_per_s=, note=)`` (called once per step) with ``advance.evaluated(note)``
    (once per evaluation). On a terminal: a bar with loss, learning rate, tokens/s, ETA and the last evaluation's
    note (validation loss, the best metric, the overfitting gap). Otherwise plain lines, every ``plain_every``
    steps and at each evaluation."""
    if not enabled:
        yield _SilentProgress()
        return
    if not (console.is_terminal or console.is_jupyter):  # a notebook draws the bar
        yield _PlainProgress(total, done, plain_every)
        return
    columns = (
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield _BarProgress(progress, progress.add_task("train", total=total, completed=done, loss="-", lr="-",
                                                       speed="-", note=""))


NOT_OBJECTIVE_FIGURES = ("loss", "perplexity", "tokens")  # shown above them, or a count


def objective_figures(base: dict[str, Any], tuned: dict[str, Any]) -> list[str]:
    """The objective's own validation figures both sides have (a pair objective's preference accuracy and reward
    margin, a classifier's accuracy): eval.json holds them, so the before/after table shows them too."""
    return [k for k, v in tuned.items() if k not in NOT_OBJECTIVE_FIGURES and not k.startswith("confusion_")  # cells
            and isinstance(v, (int, float))
            and not isinstance(v, bool) and isinstance(base.get(k), (int, float))]


def _four(value: float, signed: bool = False) -> str:
    """Four decimals, without a minus sign on a value that rounds to zero (-0.0000)."""
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return text.replace("-", "+" if signed else "", 1) if float(text) == 0 else text


def print_before_after(evaluation: dict[str, Any] | None) -> None:
    if not evaluation:
        return
    if evaluation["tuned"] is None:
        console.print(evaluation["note"], style="yellow")
        print_forgetting(evaluation.get("forgetting"))
        return
    if "base" not in evaluation:  # eval.before_after is off
        console.print(f"validation loss {evaluation['tuned']['loss']:.4f}")
        print_forgetting(evaluation.get("forgetting"))
        return
    base, tuned = evaluation["base"], evaluation["tuned"]
    table = Table(title="Before / after (validation set)")
    for column in ("metric", "base model", "fine-tuned", "change"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in (k for k in ("loss", "perplexity") if k in base and k in tuned):  # perplexity: SFT-like objectives
        # over |base|: an online objective's loss is minus its reward, so a fall from -0.70 to -0.74 is -5.9%
        change = (tuned[key] - base[key]) / abs(base[key]) if base[key] else 0.0
        style = "green" if change < 0 else "red"
        table.add_row(key, _four(base[key]), _four(tuned[key]), Text(f"{change:+.1%}", style=style))
    for key in objective_figures(base, tuned):  # the objective's own (preference accuracy, reward margin, ...)
        table.add_row(key, _four(base[key]), _four(tuned[key]), _four(tuned[key] - base[key], signed=True))
    for name, m in (evaluation.get("metrics") or {}).items():
        good = m["delta"] * (1 if m["higher_is_better"] else -1)
        style = "green" if m["ci_low" if m["higher_is_better"] else "ci_high"] * (1 if m["higher_is_better"] else -1) > 0 else (
            "red" if good < 0 else "")
        table.add_row(f"{name} ({m['examples']} samples)", f"{m['base']:.4f}", f"{m['tuned']:.4f}",
                      Text(f"{m['delta']:+.4f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]", style=style))
    console.print(table)
    print_forgetting(evaluation.get("forgetting"))
    shown = evaluation.get("samples", [])[:MAX_SAMPLES_SHOWN]
    for i, sample in enumerate(shown, start=1):
        samples = Table(title=f"Sample {i} ({sample['source']})", show_lines=True, expand=True)
        samples.add_column("reference")
        samples.add_column("base model")
        samples.add_column("fine-tuned")
        samples.add_row(sample["reference"], sample["base"], sample["tuned"])
        console.print(Text(_last_user_turn(sample["prompt"]), style="bold"))
        console.print(samples)
    hidden = len(evaluation.get("samples", [])) - len(shown)
    if hidden > 0:
        console.print(f"... and {hidden} more sample generations in eval.json", style="dim")


MAX_SAMPLES_SHOWN = 3  # the rest are in eval.json


def print_forgetting(check: dict[str, Any] | None) -> None:
    if not check or "flagged" not in check:
        return
    line = (f"forgetting check: held-out text loss {check['base_loss']:.4f} -> {check['tuned_loss']:.4f} "
            f"({check['relative_change']:+.1%}, threshold {check['threshold']:.0%})")
    console.print(Text.assemble((line, "bold red" if check["flagged"] else "dim"),
                                (" FLAGGED: the model may have lost general ability" if check["flagged"] else " ok", "")))


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
        if stats["examples"] and not report.get("classes"):  # no share to show (0.0% would read as a masking bug)
            table.add_row(f"{split} supervised share", f"{stats['supervised_share']:.1%}")
    for name, counts in (report.get("tasks") or {}).items():
        table.add_row(f"task {name}", f"{counts['train']} train / {counts['validation']} validation")
    table.add_row("truncation rate", f"{report['truncation_rate']:.1%}")
    _record_rows(table, report)
    console.print(table)
    for change in report["tokenizer_changes"]:
        console.print(Text.assemble(("tokenizer change: ", "yellow"), change))
    for warning in report["warnings"]:
        console.print(Text.assemble(("warning: ", "yellow"), warning))
    for example in report.get("examples") or ([report["example"]] if report.get("example") else []):
        print_supervised_example(example)


def _record_rows(table: Table, report: dict[str, Any]) -> None:
    """The counts of preference pairs, unpaired completions or labeled texts (none for SFT data)."""
    sides = report.get("pairs") or report.get("unpaired")
    if sides:
        if "chosen_equals_rejected" in sides:
            table.add_row("pairs with chosen = rejected", str(sides["chosen_equals_rejected"]))
        table.add_row("empty sides", ", ".join(f"{k}: {v}" for k, v in sides["empty_sides"].items()))
        for side, lengths in sides["tokens"].items():
            if lengths:
                table.add_row(f"{side} tokens p50/p90/max", f"{lengths['p50']:.0f} / {lengths['p90']:.0f} / {lengths['max']:.0f}")
        table.add_row("truncated", f"{sides['truncated']} ({sides['truncation']})")
    classes = report.get("classes")
    if classes:
        for name in classes["names"]:
            train, validation = classes["train"][name], classes["validation"][name]
            table.add_row(f"class {name}", f"{train['count']} train ({train['share']:.0%}) / {validation['count']} validation")


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


def _figure(value: Any, spec: str = ".4f") -> str:
    """A number as ``spec`` formats it; '-' when absent, and a run file's non-number (edited by hand) as it is."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if not isinstance(seconds, (int, float)):  # a run file edited by hand: shown as it is, not a traceback
        return str(seconds)
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def print_runs(runs: list[dict[str, Any]]) -> None:
    """``tunelab runs``: one row per run, with the columns that compare runs (technique and variant, trainable
    parameters, peak memory, tokens/s, the primary metric and its change against the base)."""
    table = Table(title="Runs")
    table.add_column("run", **NAME_COLUMN)
    for column in ("status", "date", "duration", "technique", "model", "lr", "step", "trainable", "peak memory",
                   "tokens/s", "train loss (final 10%)", "metric: base -> tuned (delta)"):
        table.add_column(column, **(NAME_COLUMN if column in ("technique", "model") else {"overflow": "fold"}))
    for run in runs:
        started = (run.get("started") or "-").replace("T", " ")[:16]
        table.add_row(run["run"], str(run["status"]), started, duration(run.get("duration_s")), technique_label(run),
                      str(run.get("model") or "-"), _figure(run.get("learning_rate"), ".1e"), "-" if run.get("step") is None else str(run["step"]),
                      trainable_label(run), memory_label(run.get("peak_memory_bytes")),
                      _figure(run.get("tokens_per_s"), ",.0f"), _figure(run.get("train_loss_smoothed")),
                      metric_label(run))
    print_table(table)


def trainable_label(summary: dict[str, Any]) -> str:
    """Trainable parameters and their share of the model: '1.2M (0.9%)'."""
    trainable, total = summary.get("trainable_parameters"), summary.get("total_parameters")
    if trainable is None:
        return "-"
    share = f" ({100 * trainable / total:.2g}%)" if total else ""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if trainable >= size:
            return f"{trainable / size:.1f}{unit}{share}"
    return f"{trainable}{share}"


def memory_label(peak_bytes: int | None) -> str:
    return "-" if peak_bytes is None else f"{peak_bytes / 2**30:.2f} GiB"


def metric_label(summary: dict[str, Any]) -> str:
    """The run's primary metric against its base: 'rouge_l 0.2100 -> 0.3400 (+0.1300)', flagged when the
    forgetting check flagged the run."""
    metric = summary.get("primary_metric")
    if not metric:
        return "-"
    text = f"{metric['name']} {metric['base']:.4f} -> {metric['tuned']:.4f} ({metric['delta']:+.4f})"
    return text + (" (forgetting!)" if summary.get("forgetting_flagged") else "")


def technique_label(summary: dict[str, Any]) -> str:
    """A run's technique and the variant its settings chose, as tables show it: 'lora (dora)'."""
    variant = summary.get("variant")
    return f"{summary.get('technique') or '-'}" + (f" ({variant})" if variant else "")


BARS = "▁▂▃▄▅▆▇█"


def sparkline(points: list[list[float]], width: int = 40) -> str:
    """A curve in one line of text: the values in at most ``width`` buckets of consecutive steps (each its mean),
    scaled from the lowest to the highest, with the first and last steps and the range."""
    if not points:
        return "-"
    values = [p[1] for p in points]
    size = -(-len(values) // width)  # ceil: steps per bucket
    buckets = [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]
    low, high = min(buckets), max(buckets)
    scale = (len(BARS) - 1) / (high - low) if high > low else 0.0
    line = "".join(BARS[round((v - low) * scale)] for v in buckets)
    return f"{line}  steps {points[0][0]}-{points[-1][0]}, {values[0]:.4g} -> {values[-1]:.4g} (range {min(values):.4g}..{max(values):.4g})"


CURVES = {"train": "train loss by step", "reward": "reward by step (sampled completions)",
          "validation_reward": "reward at each evaluation (greedy)"}


def print_run_details(details: dict[str, Any]) -> None:
    """``tunelab runs show RUN``: one run's figures, from its files."""
    summary, info, evaluation = details["summary"], details["run_info"], details["eval"]
    table = Table(title=f"Run {summary['run']}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    rows = [("status", f"{summary['status']} at step {summary['step']}"), ("started", summary.get("started")),
            ("duration", duration(summary.get("duration_s"))), ("model", summary["model"]),
            ("technique", technique_label(summary)), ("learning rate", _figure(summary["learning_rate"], ".2e")),
            ("train loss: last / final-10% mean", f"{_figure(summary['train_loss'])} / {_figure(summary['train_loss_smoothed'])}")]
    error = (details.get("status") or {}).get("error")
    if error:  # a failed or interrupted run: why, as status.json recorded it
        rows.insert(1, ("error", str(error)))
    if info:
        params = info.get("trainable_parameters"), info.get("total_parameters")
        if params[0] is not None:
            rows.append(("trainable parameters", f"{params[0]:,} of {params[1]:,} ({100 * params[0] / params[1]:.3f}%)"))
        rows += [("tokens/s (training)", _figure(info.get("tokens_per_s"), ",.1f")),
                 ("peak memory", f"{_figure((info.get('peak_memory') or {}).get('rss_gib'), '.2f')} GiB RSS"
                  + (f", {info['peak_memory']['gpu_max_allocated_gib']:.2f} GiB GPU" if "gpu_max_allocated_gib" in info.get("peak_memory", {}) else "")),
                 ("phases", ", ".join(f"{k} {duration(v)}" for k, v in (info.get("phases_s") or {}).items())),
                 ("versions", ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items() if v)),
                 ("hardware", f"{(info.get('hardware') or {}).get('cpu')} x{(info.get('hardware') or {}).get('cpu_count')}"
                  + (f", {', '.join(info['hardware']['gpus'])}" if info.get("hardware", {}).get("gpus") else ""))]
    for key, label in CURVES.items():
        if (details.get("curves") or {}).get(key):
            rows.append((label, sparkline(details["curves"][key])))
    base, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
    if tuned:
        rows.append(("validation loss base -> tuned", f"{_figure(base.get('loss'))} -> {_figure(tuned.get('loss'))}"))
    for key in objective_figures(base, tuned) if base else []:  # the objective's own, as the end of training shows
        rows.append((f"{key} base -> tuned", f"{_four(base[key])} -> {_four(tuned[key])} "
                                             f"({_four(tuned[key] - base[key], signed=True)})"))
    for name, m in (evaluation.get("metrics") or {}).items():
        cell = before_after_cell(m, "95% interval ")
        if cell is not None:
            rows.append((f"{name} base -> tuned", cell))
    missing = missing_before_after(evaluation)
    if missing:
        rows.append(("eval.json", missing))
    forgetting = evaluation.get("forgetting") or {}
    if "flagged" in forgetting:
        rows.append(("forgetting check", f"held-out loss {forgetting['base_loss']:.4f} -> {forgetting['tuned_loss']:.4f} "
                                         f"({forgetting['relative_change']:+.1%}; {'FLAGGED' if forgetting['flagged'] else 'ok'})"))
    for path in details["evaluations"]:
        rows.append(("tunelab eval report", path))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def print_runs_side_by_side(details: list[dict[str, Any]]) -> None:
    """``tunelab runs show RUN RUN ...``: the runs' figures in one column each, then the config settings that
    differ between them."""
    summaries = [d["summary"] for d in details]
    table = Table(title="Runs side by side")
    table.add_column("", **NAME_COLUMN)
    for summary in summaries:
        table.add_column(summary["run"], overflow="fold")
    rows: list[tuple[str, list[str]]] = [
        ("status", [f"{s['status']} at step {s['step']}" for s in summaries]),
        ("model", [str(s["model"]) for s in summaries]),
        ("technique", [technique_label(s) for s in summaries]),
        ("learning rate", [_figure(s["learning_rate"], ".2e") for s in summaries]),
        ("trainable parameters", [trainable_label(s) for s in summaries]),
        ("peak memory", [memory_label(s.get("peak_memory_bytes")) for s in summaries]),
        ("tokens/s (training)", [_figure(s.get("tokens_per_s"), ",.1f") for s in summaries]),
        ("duration", [duration(s.get("duration_s")) for s in summaries]),
        ("train loss (final 10%)", [_figure(s.get("train_loss_smoothed")) for s in summaries]),
        ("validation loss base -> tuned", [f"{_figure(s.get('base_val_loss'))} -> {_figure(s.get('tuned_val_loss'))}"
                                           for s in summaries]),
    ]
    names = list(dict.fromkeys(name for d in details for name in (d["eval"].get("metrics") or {})))
    for name in names:
        cells = []
        for d in details:
            m = (d["eval"].get("metrics") or {}).get(name)
            cells.append("-" if not m else before_after_cell(m) or "lacks its before/after figures")
        rows.append((f"{name} base -> tuned", cells))
    rows.append(("forgetting check", [_forgetting_cell(d["eval"]) for d in details]))
    for key, values in config_differences([d["config"] for d in details]).items():
        rows.append((f"config: {key}", values))
    for key, values in rows:
        table.add_row(key, *values)
    print_table(table)


BEFORE_AFTER = ("base", "tuned", "delta", "ci_low", "ci_high")  # a metric's entry in a run's eval.json


def before_after_cell(figures: Any, interval: str = "") -> str | None:
    """One metric of a run's eval.json: base -> tuned (delta, [interval]); None when the entry lacks them."""
    entry = figures if isinstance(figures, dict) else {}
    if not all(isinstance(entry.get(key), (int, float)) for key in BEFORE_AFTER):
        return None
    return (f"{entry['base']:.4f} -> {entry['tuned']:.4f} ({entry['delta']:+.4f}, {interval}"
            f"[{entry['ci_low']:+.4f}, {entry['ci_high']:+.4f}])")


def missing_before_after(evaluation: dict[str, Any]) -> str | None:
    """What a run's eval.json lacks of the before/after figures training wrote, or None. Older folders may lack
    them: `tunelab eval --output RUN --overwrite` once wrote its own report over the run's eval.json, and
    `runs show` must still show the rest of the run."""
    if not evaluation:
        return None  # not evaluated (yet): nothing is missing
    keys = [repr(key) for key in ("base", "tuned") if key not in evaluation]
    metrics = [name for name, m in (evaluation.get("metrics") or {}).items() if before_after_cell(m) is None]
    if not keys and not metrics:
        return None
    parts = ([f"lacks {' and '.join(keys)}"] if keys else []) + (
        [f"has no before/after figures for {', '.join(metrics)}"] if metrics else [])
    source = " (it holds a `tunelab eval` report)" if "comparisons" in evaluation else ""
    return f"{'; '.join(parts)}: not the run's before/after figures{source}"


def _forgetting_cell(evaluation: dict[str, Any]) -> str:
    forgetting = evaluation.get("forgetting") or {}
    if "flagged" not in forgetting:
        return "-"
    return f"{forgetting['relative_change']:+.1%} ({'FLAGGED' if forgetting['flagged'] else 'ok'})"


def config_differences(configs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The dotted config keys whose values are not the same in every config, with each config's value ('-' when
    it has no such key); output folders aside (every run has its own)."""
    flat = [_flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for f in flat for key in f))
    missing = object()
    return {key: ["-" if f.get(key, missing) is missing else str(f[key]) for f in flat] for key in keys
            if not key.startswith("output.") and len({repr(f.get(key, missing)) for f in flat}) > 1}


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def print_eval_report(report: dict[str, Any], technique_tables: Sequence[Any] = ()) -> None:
    """Scores of every system, then each comparison's deltas with intervals and the biggest changes, then the
    target's technique's own figures as the tables it declares (``Technique.figure_tables``)."""
    names = [s["name"] for s in report["systems"]]
    table = Table(title=f"{report['examples']} examples: {', '.join(report['data'])}")
    table.add_column("metric", **NAME_COLUMN)
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for metric, info in report["metrics"].items():
        table.add_row(f"{metric} {'↑' if info['higher_is_better'] else '↓'}",
                      *(f"{info['scores'][n]:.4f}" for n in names))
    print_table(table)
    for comparison in report["comparisons"]:
        table = Table(title=f"{report['target']} - {comparison['against']} (paired bootstrap 95% interval)")
        for column in ("metric", "delta", "interval", "verdict", "wins/losses/ties"):
            table.add_column(column, justify="left" if column in ("metric", "verdict") else "right",
                             **(NAME_COLUMN if column == "metric" else {}))
        for metric, c in comparison["metrics"].items():
            style = {"better": "green", "worse": "red"}.get(c["verdict"], "")
            table.add_row(metric, f"{c['delta']:+.4f}", f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
                          Text(c["verdict"], style=style), f"{c['wins']}/{c['losses']}/{c['ties']}")
        print_table(table)
        if comparison.get("overall"):  # reports written before the overall verdict have none
            console.print(f"verdict: {comparison['overall']}", soft_wrap=True, highlight=False)
        for key, title in (("improved", "improved most"), ("worsened", "worsened most")):
            for example in comparison[key][:3]:
                changes = Table(title=f"{title} ({report['primary_metric']}): {example['source']}", show_lines=True,
                                expand=True)
                for column in ("reference", report["target"], comparison["against"]):
                    changes.add_column(column, overflow="fold")
                changes.add_row(example["reference"] or "", example["target"] or "", example["other"] or "")
                console.print(changes)
    print_figure_tables(technique_tables)
    console.print(f"report: {report['output']}/report.html (and report.md, eval.json, predictions.jsonl)",
                  soft_wrap=True)  # a path to copy: never broken across lines


def print_figure_tables(tables: Sequence[Any]) -> None:
    """Tables a technique declares for its own eval figures (each with ``title``, ``columns`` and ``rows`` of text;
    the first column is a label, the others figures)."""
    for declared in tables:
        table = Table(title=declared.title)
        for index, column in enumerate(declared.columns):
            table.add_column(column, **(NAME_COLUMN if index == 0 else {"justify": "right"}))
        for row in declared.rows:
            table.add_row(*row)
        print_table(table)
        if getattr(declared, "note", ""):
            console.print(declared.note, soft_wrap=True, markup=False)


def print_quantize_table(report: dict[str, Any]) -> None:
    """One row per method: size, memory, speed and quality against the unquantized model, or why it was skipped."""
    table = Table(title=f"quantization of {report['run']} on {report['device']} ({report['prompts']} prompts × "
                        f"{report['max_new_tokens']} tokens; {report['validation_tokens']} validation tokens)")
    for column in ("method", "size MiB", "memory MiB", "tokens/s", "val loss", "Δ loss", "same answers"):
        table.add_column(column, **({"justify": "left", **NAME_COLUMN} if column == "method" else {"justify": "right"}))

    def cell(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for row in report["rows"]:
        if row["status"] != "ok":
            table.add_row(row["method"], Text("skipped (below)", style="yellow"), "", "", "", "", "")
            continue
        table.add_row(row["method"], cell(row["size_mb"], ".1f"), cell(row["memory_mb"], ".1f"),
                      cell(row["tokens_per_s"], ".1f"), cell(row["val_loss"], ".4f"), cell(row["loss_change"], "+.4f"),
                      cell(row["same_answers"], ".0%"))
    print_table(table)
    for row in report["rows"]:
        if row["status"] != "ok":
            console.print(Text.assemble((f"{row['method']} skipped: ", "yellow"), row["reason"]), highlight=False)
