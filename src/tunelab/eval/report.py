"""The evaluation report in three forms: ``eval.json`` (everything, for programs), ``report.md`` and a
self-contained ``report.html`` (inline CSS and SVG plots: no script, no remote asset, opens offline).

When the evaluated target is a run that ``tunelab quantize`` has measured, ``report.md`` and ``report.html`` end
with its quantization table, read from the run's ``quantize.json``. ``tunelab quantize`` re-renders the reports of
the run's existing evaluations from their ``eval.json`` (:func:`refresh_reports`), so the section follows the
latest measurement whichever command ran first.

The plots are hand-written SVG rather than matplotlib: two small chart types (a dot-and-whisker plot of deltas
with their intervals, and grouped bars of wins/losses/ties) do not justify a plotting dependency, and SVG text
stays searchable and sharp at any zoom.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from tunelab import fs

QUANTIZE_REPORT = "quantize.json"  # written into a run by `tunelab quantize`; a section of the run's eval reports

def write_reports(out_dir: Path, report: dict[str, Any], quantize: dict[str, Any] | None = None) -> None:
    """``quantize``: the evaluated run's quantize.json, when it has one (a section of report.md and report.html)."""
    fs.write_entry_json(out_dir, "eval.json", report)
    _render(out_dir, report, quantize)


def _render(out_dir: Path, report: dict[str, Any], quantize: dict[str, Any] | None) -> None:
    fs.write_entry_text(out_dir, "report.md", markdown(report, quantize))
    fs.write_entry_text(out_dir, "report.html", html_report(report, quantize))


def refresh_reports(run_dir: Path, quantize: dict[str, Any]) -> list[Path]:
    """Re-render report.md and report.html of every ``tunelab eval`` output inside ``run_dir/evals`` from its own
    eval.json, with ``quantize`` as the quantization section; returns the folders refreshed. Only folders that
    tunelab eval wrote (their ownership record names eval.json) are touched."""
    refreshed = []
    for folder in sorted((run_dir / "evals").glob("*/")) if (run_dir / "evals").is_dir() else []:
        if "eval.json" in fs.owned_entries(folder) and (folder / "eval.json").is_file():
            _render(folder, json.loads((folder / "eval.json").read_text()), quantize)
            refreshed.append(folder)
    return refreshed


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def signed(value: float) -> str:
    return f"{value:+.4f}"


# ---------------------------------------------------------------- Markdown


def markdown(report: dict[str, Any], quantize: dict[str, Any] | None = None) -> str:
    names = [s["name"] for s in report["systems"]]
    lines = [f"# Evaluation of {report['target']}", "",
             f"{report['examples']} examples from {', '.join(report['data'])}.", "", "## Scores", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric, info in report["metrics"].items():
        arrow = "↑" if info["higher_is_better"] else "↓"
        lines.append(f"| {metric} {arrow} | " + " | ".join(fmt(info["scores"][n]) for n in names) + " |")
    for comparison in report["comparisons"]:
        confidence = int(round(next(iter(comparison["metrics"].values()))["confidence"] * 100))
        lines += ["", f"## {report['target']} against {comparison['against']}", "",
                  f"Delta = {report['target']} − {comparison['against']}; paired bootstrap {confidence}% interval "
                  f"over {report['settings']['resamples']} resamples. Wins/losses/ties count examples.", "",
                  "| metric | delta | interval | verdict | wins | losses | ties |", "|---|---:|---|---|---:|---:|---:|"]
        for metric, c in comparison["metrics"].items():
            lines.append(f"| {metric} | {signed(c['delta'])} | [{signed(c['ci_low'])}, {signed(c['ci_high'])}] | "
                         f"{c['verdict']} | {c['wins']} | {c['losses']} | {c['ties']} |")
        if comparison.get("overall"):
            lines += ["", f"**Verdict:** {_md_escape(comparison['overall'])}"]
        for key, title in (("improved", "Biggest improvements"), ("worsened", "Biggest regressions")):
            lines += ["", f"### {title} ({report['primary_metric']})", ""]
            if not comparison[key]:
                lines.append("None.")
            for example in comparison[key]:
                lines += [f"**{example['source']}**", "", _md_quote("prompt", example["prompt"]),
                          _md_quote("reference", example["reference"]),
                          _md_quote(report["target"], example["target"]),
                          _md_quote(comparison["against"], example["other"]), ""]
    if "classification" in report:
        labels = report["classification"]["labels"]
        for name, matrix in report["classification"]["confusion"].items():
            lines += ["", f"## Confusion matrix of {name} (rows: reference, columns: predicted)", "",
                      "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
            lines += [f"| {label} | " + " | ".join(str(x) for x in row) + " |" for label, row in zip(labels, matrix)]
    if quantize:
        lines += ["", *quantize_markdown(quantize)]
    lines += ["", "Every example's prompt, reference and outputs: `predictions.jsonl`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the quantization section (from quantize.json)

QUANTIZE_COLUMNS = (("size MiB", "size_mb", ".1f"), ("memory MiB", "memory_mb", ".1f"), ("tokens/s", "tokens_per_s", ".1f"),
                    ("val loss", "val_loss", ".4f"), ("Δ loss", "loss_change", "+.4f"), ("same answers", "same_answers", ".0%"))


def _quantize_cell(row: dict[str, Any], key: str, spec: str) -> str:
    return "-" if row.get(key) is None else format(row[key], spec)


def _quantize_caption(quantize: dict[str, Any]) -> str:
    return (f"`tunelab quantize` on {quantize['device']}: {quantize['prompts']} prompts × {quantize['max_new_tokens']} "
            f"greedy tokens for speed and same answers, {quantize['validation_tokens']} validation tokens for the loss; "
            f"Δ loss and same answers are against the unquantized model ({quantize['rows'][0]['method']}).")


def quantize_markdown(quantize: dict[str, Any]) -> list[str]:
    lines = ["## Quantization", "", _quantize_caption(quantize), "",
             "| method | " + " | ".join(c[0] for c in QUANTIZE_COLUMNS) + " |", "|---|" + "---:|" * len(QUANTIZE_COLUMNS)]
    for row in quantize["rows"]:
        if row["status"] == "ok":
            lines.append(f"| {row['method']} | " + " | ".join(_quantize_cell(row, k, f) for _, k, f in QUANTIZE_COLUMNS) + " |")
        else:
            lines.append(f"| {row['method']} | skipped: {row.get('reason') or 'no reason recorded'} |" + " |" * (len(QUANTIZE_COLUMNS) - 1))
    return lines


def quantize_html(quantize: dict[str, Any]) -> str:
    esc = html.escape
    caption = esc(_quantize_caption(quantize)).replace("`tunelab quantize`", "<code>tunelab quantize</code>", 1)
    parts = ["<h2 id='quantization'>Quantization</h2>", f"<p>{caption}</p>", "<table><tr><th>method</th>"
             + "".join(f"<th>{esc(c[0])}</th>" for c in QUANTIZE_COLUMNS) + "</tr>"]
    for row in quantize["rows"]:
        if row["status"] == "ok":
            parts.append(f"<tr><td>{esc(row['method'])}</td>"
                         + "".join(f"<td>{_quantize_cell(row, k, f)}</td>" for _, k, f in QUANTIZE_COLUMNS) + "</tr>")
        else:
            parts.append(f"<tr><td>{esc(row['method'])}</td><td colspan='{len(QUANTIZE_COLUMNS)}' class='skipped'>"
                         f"skipped: {esc(row.get('reason') or 'no reason recorded')}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _md_escape(text: str) -> str:
    """Text in Markdown prose, shown as written: every punctuation character Markdown could read is escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def _md_quote(label: str, text: str | None) -> str:
    """A list item quoting ``text`` verbatim (backticks, pipes and ``<`` included): a code span on one line, a
    fenced block over several; only a very long text is cut (marked with …)."""
    body = text or ""
    if not body.strip():
        return f"- *{label}*: (empty)"
    if len(body) > 400:
        body = "…" + body[-400:] if label == "prompt" else body[:400] + "…"
    if "\n" in body:
        fence = _fence(body, shortest=3)
        block = "\n".join(f"  {line}" if line else "" for line in [fence, *body.split("\n"), fence])
        return f"- *{label}*:\n\n{block}\n"
    return f"- *{label}*: {_code_span(body)}"


def _fence(text: str, shortest: int) -> str:
    """A run of backticks longer than any inside ``text``, so none of them closes it."""
    return "`" * max(shortest, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)


def _code_span(text: str) -> str:
    """``text`` as a Markdown code span, shown exactly: CommonMark strips one space from each side when both are
    there, so a text starting or ending with a backtick or a space gets that space added."""
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    fence = _fence(text, shortest=1)
    return f"{fence}{pad}{text}{pad}{fence}"


# ---------------------------------------------------------------- HTML with inline SVG

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}.better{color:#137333}.worse{color:#b3261e}
.pair{display:grid;grid-template-columns:1fr 1fr 1fr;gap:.5rem;margin:.5rem 0 1.5rem}
.pair div{background:#f6f6f6;padding:.5rem;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85rem}
td.skipped{text-align:left;color:#8a5a00}
.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.8rem;color:#555}
"""


def html_report(report: dict[str, Any], quantize: dict[str, Any] | None = None) -> str:
    esc = html.escape
    names = [s["name"] for s in report["systems"]]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation of {esc(report['target'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Evaluation of {esc(report['target'])}</h1>",
             f"<p>{report['examples']} examples from {esc(', '.join(report['data']))}.</p>", "<h2>Scores</h2><table>",
             "<tr><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    for metric, info in report["metrics"].items():
        arrow = "↑" if info["higher_is_better"] else "↓"
        parts.append(f"<tr><td>{esc(metric)} {arrow}</td>" + "".join(f"<td>{fmt(info['scores'][n])}</td>" for n in names)
                     + "</tr>")
    parts.append("</table>")
    for comparison in report["comparisons"]:
        other = comparison["against"]
        parts += [f"<h2>{esc(report['target'])} against {esc(other)}</h2>",
                  "<table><tr><th>metric</th><th>delta</th><th>95% interval</th><th>verdict</th><th>wins</th>"
                  "<th>losses</th><th>ties</th></tr>"]
        for metric, c in comparison["metrics"].items():
            css = {"better": "better", "worse": "worse"}.get(c["verdict"], "")
            parts.append(f"<tr><td>{esc(metric)}</td><td>{signed(c['delta'])}</td><td>[{signed(c['ci_low'])}, "
                         f"{signed(c['ci_high'])}]</td><td class='{css}'>{esc(c['verdict'])}</td><td>{c['wins']}</td>"
                         f"<td>{c['losses']}</td><td>{c['ties']}</td></tr>")
        parts.append("</table>")
        if comparison.get("overall"):
            parts.append(f"<p><strong>Verdict:</strong> {esc(comparison['overall'])}</p>")
        parts.append("<h3>Relative change with its interval</h3>" + delta_plot(report, comparison))
        parts.append("<h3>Wins, losses and ties per example</h3>" + wins_plot(comparison))
        for key, title in (("improved", "Biggest improvements"), ("worsened", "Biggest regressions")):
            parts.append(f"<h3>{title} ({esc(report['primary_metric'])})</h3>")
            if not comparison[key]:
                parts.append("<p>None.</p>")
            for example in comparison[key]:
                parts.append(f"<p><b>{esc(example['source'])}</b></p><div class='prompt'>{esc(example['prompt'][-600:])}</div>"
                             "<div class='pair'>" + "".join(
                                 f"<div><b>{esc(label)}</b>\n{esc(example[k] or '')}</div>"
                                 for label, k in (("reference", "reference"), (report["target"], "target"), (other, "other")))
                             + "</div>")
    if "classification" in report:
        labels = report["classification"]["labels"]
        for name, matrix in report["classification"]["confusion"].items():
            parts.append(f"<h2>Confusion matrix of {esc(name)}</h2><table><tr><th>reference \\ predicted</th>"
                         + "".join(f"<th>{esc(label)}</th>" for label in labels) + "</tr>")
            parts += [f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{x}</td>" for x in row) + "</tr>"
                      for label, row in zip(labels, matrix)]
            parts.append("</table>")
    if quantize:
        parts.append(quantize_html(quantize))
    parts.append("<p>Every example's prompt, reference and outputs: <code>predictions.jsonl</code>.</p></body></html>\n")
    return "\n".join(parts)


def delta_plot(report: dict[str, Any], comparison: dict[str, Any]) -> str:
    """Each metric's delta and interval relative to the other system's score (percent), as dots with whiskers;
    green when the change is an improvement."""
    rows = []
    for metric, c in comparison["metrics"].items():
        reference = report["metrics"][metric]["scores"][comparison["against"]]
        if not reference:
            continue
        scale = 100 / abs(reference)
        good = 1 if report["metrics"][metric]["higher_is_better"] else -1
        rows.append((metric, c["delta"] * scale, c["ci_low"] * scale, c["ci_high"] * scale, good))
    if not rows:
        return "<p>No metric has a non-zero reference score to compare against.</p>"
    span = max(max(abs(r[2]), abs(r[3]), abs(r[1])) for r in rows) or 1.0
    width, left, row_h = 640, 130, 26
    height = row_h * len(rows) + 30
    x = lambda v: left + (v + span) / (2 * span) * (width - left - 20)  # noqa: E731
    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='deltas with confidence intervals'>",
           f"<line x1='{x(0):.1f}' y1='5' x2='{x(0):.1f}' y2='{height - 22}' stroke='#888' stroke-dasharray='3,3'/>"]
    for k, (metric, delta, low, high, good) in enumerate(rows):
        y = 15 + k * row_h
        colour = "#137333" if delta * good > 0 else "#b3261e" if delta * good < 0 else "#555"
        svg += [f"<text x='{left - 8}' y='{y + 4}' text-anchor='end' font-size='12'>{html.escape(metric)}</text>",
                f"<line x1='{x(low):.1f}' y1='{y}' x2='{x(high):.1f}' y2='{y}' stroke='{colour}' stroke-width='2'/>",
                f"<circle cx='{x(delta):.1f}' cy='{y}' r='4' fill='{colour}'/>",
                f"<text x='{width - 5}' y='{y + 4}' text-anchor='end' font-size='10' fill='#555'>{delta:+.1f}%</text>"]
    svg += [f"<text x='{x(-span):.1f}' y='{height - 6}' font-size='10'>{-span:.1f}%</text>",
            f"<text x='{x(0):.1f}' y='{height - 6}' font-size='10' text-anchor='middle'>0</text>",
            f"<text x='{x(span):.1f}' y='{height - 6}' font-size='10' text-anchor='end'>+{span:.1f}%</text>", "</svg>"]
    return "".join(svg)


def wins_plot(comparison: dict[str, Any]) -> str:
    """One stacked bar per metric: the share of examples won (green), tied (grey) and lost (red)."""
    width, left, row_h = 640, 130, 22
    rows = list(comparison["metrics"].items())
    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{row_h * len(rows) + 10}' role='img' "
           "aria-label='wins, ties and losses'>"]
    for k, (metric, c) in enumerate(rows):
        total = c["wins"] + c["ties"] + c["losses"] or 1
        y, start = 5 + k * row_h, float(left)
        svg.append(f"<text x='{left - 8}' y='{y + 12}' text-anchor='end' font-size='12'>{html.escape(metric)}</text>")
        for count, colour in ((c["wins"], "#137333"), (c["ties"], "#bbb"), (c["losses"], "#b3261e")):
            w = count / total * (width - left - 10)
            svg.append(f"<rect x='{start:.1f}' y='{y}' width='{w:.1f}' height='16' fill='{colour}'><title>{count}</title></rect>")
            start += w
    svg.append("</svg>")
    return "".join(svg)
