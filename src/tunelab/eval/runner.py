"""``tunelab eval TARGET --data FILE [--against base|RUN ...]``: score one model and compare it with others.

Systems are evaluated one at a time (one model in memory), in chunks of ``batch_size`` examples. Each chunk's
texts go straight to a per-system file and only per-example statistics stay in memory (see ``metrics``), so
memory stays flat as the set grows. At the end the per-system files are merged line by line into
``predictions.jsonl``, and the scores, paired bootstrap intervals, wins/losses/ties and the biggest changes are
computed from the statistics and written as ``eval.json``, ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab import fs
from tunelab.console import err_console
from tunelab.data.formats import RECORD_KINDS, SFT_FORMATS, load_file
from tunelab.data.tokenize import apply_length_policy, pad_token_id, prompt_for_generation, tokenize_example
from tunelab.errors import ConfigError, DataError
from tunelab.eval.bootstrap import paired_interval, resample_indices, wins_losses_ties
from tunelab.eval.classify import answer_of, check_labels, label_log_likelihoods
from tunelab.eval.loss import example_losses
from tunelab.eval.objective import (ObjectiveRun, answer_stats, baseline_stats, head_classes, objective_run,
                                    prepare_model, prepare_records, prompt_and_reference, score_records)
from tunelab.eval.report import QUANTIZE_REPORT, write_reports
from tunelab.eval.technique import technique_figures
from tunelab.generation import Sampling, generate_texts
from tunelab.metrics import (Classification, Metric, Normalization, example_scores, loss_metrics, resolve_metrics,
                             unit_mean)
from tunelab.models import default_device
from tunelab.result import check_openable, open_model
from tunelab.rewards import build_rewards
from tunelab.runs import is_compare_folder, is_run_folder

log = logging.getLogger(__name__)

OUTPUT_FILES = ("eval.json", "report.md", "report.html", "predictions.jsonl")
WRITER = "tunelab eval"  # an output folder's ownership record, written first: only its recorded files are replaced


@dataclass
class EvalSettings:
    metrics: list[str] = field(default_factory=lambda: ["exact_match", "bleu", "chrf", "rouge_1", "rouge_2", "rouge_l"])
    labels: list[str] | None = None  # classification by label scoring; generation metrics are then off by default
    normalization: Normalization = field(default_factory=Normalization)
    max_new_tokens: int = 128
    batch_size: int = 8
    max_length: int = 1024
    max_examples: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    resamples: int = 1000
    confidence: float = 0.95
    top_n: int = 5
    primary: str | None = None  # the per-example metric that ranks improvements and regressions
    dtype: str = "auto"


@dataclass
class SystemScores:
    name: str
    spec: str
    stats: dict[str, np.ndarray]  # metric name -> (examples, k) statistics
    predictions_path: Path
    confusion: list[list[int]] | None = None


# ---------------------------------------------------------------- the output folder


def default_output(target: str | Path, data_files: list[Path], against: list[str] | None = None) -> Path:
    """RUN/evals/<data>[-vs-<systems>] for a run, else evals/<target>-<data>[-vs-<systems>]: one folder per
    comparison, so `--against base` and `--against RUN` on one file keep both reports."""
    stem = report_name(data_files, against)
    if (Path(target) / "config.yaml").is_file():  # a run: its evaluations live with it
        return Path(target) / "evals" / stem
    return Path("evals") / f"{Path(str(target)).name or 'model'}-{stem}"


def report_name(data_files: list[Path], against: list[str] | None = None) -> str:
    """<data>[-vs-<systems>]: the name of a comparison's report folder."""
    stem = "-".join(p.stem for p in data_files)[:80]
    if against:
        stem += "-vs-" + "-".join(re.sub(r"[^\w.+-]", "_", Path(a).name or a) for a in against)[:80]
    return stem


def refuse_a_run_folder(folder: Path, suggestion: Path) -> None:
    """Refuse a training run's folder as the output, with or without --overwrite: its eval.json is the run's own
    before/after figures (what `tunelab runs` reads), so a report there would destroy them, and the report's other
    files would lie among the run's entries. ``suggestion``: a folder of its own to offer instead."""
    if is_run_folder(folder):
        raise ConfigError(f"--output {folder} is a training run's folder: its eval.json holds the run's own "
                          "before/after figures, which the report would replace. Give the report a folder of its "
                          f"own: a subfolder such as {suggestion}, or another path")


def refuse_a_compare_folder(folder: Path, suggestion: Path) -> None:
    """Refuse a `tunelab compare --out` folder as the output, with or without --overwrite: its report.md and
    report.html are the comparison's own report (its ownership record lists them, so the eval's writes would be
    taken as replacing tunelab's files), and the eval's eval.json would lie beside its compare.json."""
    if is_compare_folder(folder):
        raise ConfigError(f"--output {folder} is a tunelab compare folder: its report.md and report.html are the "
                          "comparison's own report, which this report would replace. Give the report a folder of "
                          f"its own, such as {suggestion}, or another path")


def check_replaceable(folder: Path, request: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace a different evaluation's report (other data, systems or settings) without ``overwrite``;
    the same evaluation run again replaces its own."""
    earlier = fs.read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
    if earlier is None or overwrite or earlier.get("request") == request:
        return
    before = earlier.get("request") or {}
    changed = [key for key in ("target", "adapter", "against", "data") if before.get(key) != request[key]]
    changed += [f"{key} {before.get('settings', {}).get(key)!r} -> {value!r}"
                for key, value in request["settings"].items() if before.get("settings", {}).get(key) != value]
    raise ConfigError(f"{folder} holds the report of another evaluation (differs in: "
                      f"{', '.join(changed) or 'written by an older tunelab'}); keep it and choose another folder "
                      "with --output, or replace it with --overwrite")


def claim_output(folder: Path) -> None:
    """Use ``folder`` only if it is new, empty, or an earlier ``tunelab eval`` output (it holds tunelab's
    ownership record); then each output file is written as a recorded entry of it (a user's file of that name in an
    earlier output is refused, never written over)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; give a folder for the report")
    run_dir = folder.parent.parent
    if folder.parent.name == "evals" and (run_dir / "config.yaml").is_file():
        fs.own_entry(run_dir, "evals")  # recorded in the run's ownership record (refused if evals/ is the user's)
    if folder.is_dir() and any(folder.iterdir()) and not fs.is_claimed(folder):
        raise ConfigError(f"--output {folder} is not empty and was not written by tunelab eval; choose another folder")
    fs.claim(folder, WRITER)


# ---------------------------------------------------------------- evaluating one system


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def score_system(opened: Any, examples: list[Any], prompts: list[str], plain_text: bool, metrics: list[Metric],
                 settings: EvalSettings, out_path: Path, device: Any, on_chunk: Callable[[int], None] | None = None,
                 ) -> SystemScores:
    """Loss, generations and metric statistics of one model over ``examples``; its outputs go to ``out_path``."""
    tokenizer, model = opened.tokenizer, opened.model
    pad_id = pad_token_id(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # for batching only; logged once by the caller
    n = len(examples)
    stats: dict[str, np.ndarray] = {"loss": np.zeros((n, 2))}
    classification = Classification(settings.labels) if settings.labels else None
    truth = check_labels(examples, settings.labels) if settings.labels else []
    if classification:
        for metric in classification.metrics:
            stats[metric.name] = np.zeros((n, len(settings.labels) ** 2))
    # Sampled eval has always kept transformers' default top-k of 50 (eval takes no --top-k): kept, so the
    # figures of a sampled evaluation do not change.
    sampling = (Sampling(settings.max_new_tokens, settings.temperature, settings.top_p, top_k=50, seed=settings.seed)
                if settings.do_sample else Sampling(settings.max_new_tokens))
    with open(out_path, "w") as handle:
        for chunk in _chunks(n, settings.batch_size):
            tokenized = [apply_length_policy(tokenize_example(tokenizer, examples[i]), settings.max_length, "truncate")
                         for i in chunk]
            losses = list(example_losses(model, tokenized, pad_id, settings.batch_size, device))
            outputs = (generate_texts(model, tokenizer, [prompts[i] for i in chunk], sampling, len(chunk),
                                      special_tokens=plain_text, sources=[examples[i].source for i in chunk])
                       if metrics else [None] * len(chunk))
            scored = (label_log_likelihoods(model, tokenizer, [examples[i] for i in chunk], settings.labels, pad_id,
                                            settings.batch_size, device) if classification else [None] * len(chunk))
            for offset, i in enumerate(chunk):
                record: dict[str, Any] = {"index": i, "loss": losses[offset][0], "tokens": losses[offset][1]}
                stats["loss"][i] = losses[offset]
                if outputs[offset] is not None:
                    record["output"] = outputs[offset]
                    for metric in metrics:
                        row = metric.example_stats(outputs[offset], _reference(examples[i]))
                        if metric.name not in stats:  # sized by the first example: each metric's vector length
                            stats[metric.name] = np.zeros((n, len(row)))
                        stats[metric.name][i] = row
                if scored[offset] is not None:
                    predicted = int(np.argmax(scored[offset]))
                    record.update(predicted_label=settings.labels[predicted], label_log_likelihoods=scored[offset])
                    for metric in classification.metrics:
                        stats[metric.name][i] = classification.cell(truth[i], predicted)
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if on_chunk:
                on_chunk(len(chunk))
            del tokenized
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    confusion = None
    if classification:
        k = len(settings.labels)
        confusion = stats["accuracy"].sum(0).reshape(k, k).astype(int).tolist()
    return SystemScores(opened.name, "", stats, out_path, confusion)


def _reference(example: Any) -> str:
    return answer_of(example)


# ---------------------------------------------------------------- comparing systems


def all_metrics(metrics: list[Metric], settings: EvalSettings) -> list[Metric]:
    extra = Classification(settings.labels).metrics if settings.labels else []
    return [*loss_metrics(), *metrics, *extra]


def _stats_key(metric: Metric) -> str:
    return "loss" if metric.name == "perplexity" else metric.name


def compare(target: SystemScores, other: SystemScores, metrics: list[Metric], settings: EvalSettings,
            indices: np.ndarray) -> dict[str, Any]:
    """Every metric's delta (target - other), its paired bootstrap interval, and wins/losses/ties."""
    result: dict[str, Any] = {}
    for metric in metrics:
        a, b = target.stats[_stats_key(metric)], other.stats[_stats_key(metric)]
        interval = paired_interval(metric, a, b, indices, settings.confidence)
        per_example = wins_losses_ties(example_scores(metric, a), example_scores(metric, b), metric.higher_is_better)
        better = interval.low > 0 if metric.higher_is_better else interval.high < 0
        worse = interval.high < 0 if metric.higher_is_better else interval.low > 0
        result[metric.name] = {**interval.as_dict(), **per_example,
                               "verdict": "better" if better else "worse" if worse else "no clear difference"}
    return result


def overall_verdict(target: str, other: str, primary: Metric, compared: dict[str, Any], metrics: list[Metric]) -> str:
    """One line: who wins on the primary metric (and whether its interval is clear of 0), and whether the metrics
    agree; when they do not, which favour which system (by the sign of each delta, in the metric's direction)."""
    result = compared[primary.name]
    sign = 1 if primary.higher_is_better else -1
    winner = target if sign * result["delta"] > 0 else other if sign * result["delta"] < 0 else None
    clear = "clear" if result["verdict"] != "no clear difference" else "not clear: its interval includes 0"
    line = (f"{winner} wins on the primary metric {primary.name} ({result['delta']:+.4f}, {clear})" if winner
            else f"no winner on the primary metric {primary.name} (a tie)")
    better = [m.name for m in metrics if (1 if m.higher_is_better else -1) * compared[m.name]["delta"] > 0]
    worse = [m.name for m in metrics if (1 if m.higher_is_better else -1) * compared[m.name]["delta"] < 0]
    if better and worse:
        return (f"{line}; the metrics disagree: {target} is better on {', '.join(better)} and worse on "
                f"{', '.join(worse)} than {other}")
    return f"{line}; every metric that moved agrees"


def primary_metric(metrics: list[Metric], settings: EvalSettings) -> Metric:
    names = {m.name: m for m in metrics}
    if settings.primary:
        if settings.primary not in names:
            raise ConfigError(f"--primary {settings.primary!r} is not among the computed metrics: {', '.join(names)}")
        return names[settings.primary]
    for preferred in ("rouge_l", "accuracy", "exact_match"):
        if preferred in names:
            return names[preferred]
    return next(m for m in metrics if m.name not in ("perplexity",)) if len(metrics) > 1 else metrics[0]


def biggest_changes(target: SystemScores, other: SystemScores, metric: Metric, top_n: int) -> tuple[list[int], list[int]]:
    """Indices of the ``top_n`` examples the target improved most and worsened most, by ``metric``."""
    key = _stats_key(metric)
    sign = 1 if metric.higher_is_better else -1
    diff = sign * (example_scores(metric, target.stats[key]) - example_scores(metric, other.stats[key]))
    order = np.argsort(-diff, kind="stable")
    improved = [int(i) for i in order[:top_n] if diff[i] > 1e-9]
    worsened = [int(i) for i in order[::-1][:top_n] if diff[i] < -1e-9]
    return improved, worsened


# ---------------------------------------------------------------- the whole evaluation


def evaluate(target: str | Path, data_files: list[str | Path], against: list[str] | None = None,
             adapter: str | Path | None = None, output: str | Path | None = None,
             settings: EvalSettings | None = None, device: Any = None, progress: bool = False,
             overwrite: bool = False) -> dict[str, Any]:
    """Evaluate ``target`` on ``data_files`` and compare it with each of ``against`` ('base', a run folder, a
    model folder or name); returns eval.json's content and writes the report files. A different evaluation's
    report in the output folder is replaced only with ``overwrite``."""
    settings = settings or EvalSettings()
    against = list(against or [])
    files = [Path(f) for f in data_files]
    if not files:
        raise ConfigError("no evaluation data: give --data FILE")
    out_dir = Path(output) if output is not None else default_output(target, files, against)
    refuse_a_run_folder(out_dir, out_dir / "evals" / report_name(files, against))  # before any work
    refuse_a_compare_folder(out_dir, default_output(target, files, against))
    metrics = resolve_metrics([] if settings.labels and settings.metrics == EvalSettings().metrics else settings.metrics,
                              settings.normalization)
    device = torch.device(device) if device is not None else default_device()
    run = objective_run(target, adapter)  # a run whose objective scores its own way (pairs, classes, rewards)
    # a policy trained on prompts is evaluated on prompts, read as its training data was (data.format: prompt takes
    # a whole chat as its prompt and a `reference` answer; 'auto' takes {prompt, reference} as a prompt record)
    prompts = run is not None and run.evaluation.records == "prompt"
    fmt = run.data_config.format if prompts else "auto"
    examples = [e for f in files for e in load_file(f, fmt, prompts=prompts).examples][: settings.max_examples]
    if not examples:
        raise DataError(f"{', '.join(map(str, files))}: no examples to evaluate")
    # every system is checked before any is evaluated: a bad --against costs nothing
    specs = [str(target)] + [_against_spec(a, check_openable(target, adapter)) for a in against]
    for spec in specs[1:]:
        check_openable(spec)
    request = json.loads(json.dumps({
        "target": str(target), "adapter": None if adapter is None else str(adapter), "against": against,
        "data": [str(f) for f in files], "settings": {**asdict(settings), "normalization": asdict(settings.normalization)},
    }))  # as eval.json holds it
    if run is not None:
        check_objective_settings(run, settings)
    else:
        check_sft_records(examples)
    check_replaceable(out_dir, request, overwrite)
    claim_output(out_dir)
    try:
        report = (_evaluate_objective(run, specs, against, examples, files, settings, out_dir, device, progress)
                  if run is not None else
                  _evaluate_systems(specs, against, adapter, examples, files, metrics, settings, out_dir, device, progress))
    finally:  # a failure or Ctrl-C leaves no per-system temporary file
        for leftover in out_dir.glob(".system-*.jsonl.tmp"):
            leftover.unlink(missing_ok=True)
    report["request"] = request
    write_reports(out_dir, report, _run_quantize_report(target))
    report["output"] = str(out_dir)
    return report


def _evaluate_systems(specs: list[str], against: list[str], adapter: str | Path | None, examples: list[Any],
                      files: list[Path], metrics: list[Metric], settings: EvalSettings, out_dir: Path, device: Any,
                      progress: bool) -> dict[str, Any]:
    """Each system in turn (one model in memory), then the comparison; writes predictions.jsonl. ``specs``: the
    target, then each of ``against`` as given ('base' resolved)."""
    target = specs[0]
    opened = open_model(target, adapter, device, settings.dtype)
    tokenizer = opened.tokenizer  # renders every system's prompts: the same inputs for all
    prompts = [prompt_for_generation(tokenizer, e)[0] for e in examples]
    references = [_reference(e) for e in examples]
    plain_text = not examples[0].messages
    systems: list[SystemScores] = []
    figures: dict[str, Any] | None = None
    for position, spec in enumerate(specs):
        if position > 0:
            opened = open_model(spec, None, device, settings.dtype)
            opened.tokenizer = tokenizer
        name = _unique(opened.name, [s.name for s in systems], against, position)
        log.info("evaluating %s on %d examples", name, len(examples))
        with _progress(progress, name, len(examples)) as advance:
            scores = score_system(opened, examples, prompts, plain_text, metrics, settings,
                                  out_dir / f".system-{position}.jsonl.tmp", device, advance)
        scores.name, scores.spec = name, spec
        systems.append(scores)
        if position == 0:  # the target run's technique's own figures on this data (e.g. a router's split per task)
            figures = technique_figures(target, opened, examples, settings.max_length, device)
        del opened
        gc.collect()
    report = build_report(systems, examples, references, files, metrics, settings)
    if figures:
        report["technique"] = figures
    write_predictions(out_dir, systems, examples, prompts, references)
    _attach_examples(report, out_dir)
    return report


def check_sft_records(examples: list[Any]) -> None:
    """Loss and generations need SFT records: pairs or labeled texts are refused at their line, with what reads them."""
    other = next((e for e in examples if e.format not in SFT_FORMATS), None)
    if other is not None:
        raise DataError(f"{other.source}: a {other.format} record, but this target is evaluated on SFT records (loss "
                        "and generations); pairs and labeled texts are scored by a run whose objective reads them: "
                        "give that run's folder as TARGET")


def check_objective_settings(run: ObjectiveRun, settings: EvalSettings) -> None:
    """Refuse the settings of SFT evaluation that an objective's own evaluation would silently ignore."""
    defaults = EvalSettings()
    given = [name for name, flag in (("labels", "--labels"), ("metrics", "--metric"), ("primary", "--primary"))
             if getattr(settings, name) != getattr(defaults, name)]
    if given:
        raise ConfigError(f"{', '.join(flag for name, flag in (('labels', '--labels'), ('metrics', '--metric'), ('primary', '--primary')) if name in given)}: "
                          f"a {run.objective.name} run is scored by its objective's own metrics (on "
                          f"{RECORD_KINDS[run.evaluation.records]}), not by generations or label scoring")


def _evaluate_objective(run: ObjectiveRun, specs: list[str], against: list[str], examples: list[Any],
                        files: list[Path], settings: EvalSettings, out_dir: Path, device: Any,
                        progress: bool) -> dict[str, Any]:
    """Each system in turn (one model in memory) scored unit by unit as the run's objective declares, then the
    baseline, then the comparison of the run with each; writes predictions.jsonl."""
    evaluation = run.evaluation
    opened = open_model(specs[0], None, device, settings.dtype)
    tokenizer = opened.tokenizer  # tokenizes every system's records: the same inputs for all
    classes = head_classes(opened.model, run)
    records, kept, dropped = prepare_records(examples, tokenizer, run, classes)
    head = run.objective.head_size(classes)  # a plain model (the base) gets a new, untrained head of this size
    systems: list[SystemScores] = []
    answers: dict[str, list[str]] = {}  # an online policy's: system -> its greedy answer to each prompt
    # its rewards, built once (a reward model run is loaded once for every system)
    rewards = build_rewards(run.settings.rewards, device) if evaluation.rewarded_answers else []
    for position, spec in enumerate(specs):
        if position > 0:
            torch.manual_seed(run.seed)  # the untrained head is drawn as the run drew its own
            opened = open_model(spec, None, device, settings.dtype, num_labels=head)
            opened.tokenizer = tokenizer
        pad_id = prepare_model(opened.model, tokenizer)
        name = _unique(opened.name, [s.name for s in systems], against, position)
        log.info("evaluating %s on %d records", name, len(records))
        with _progress(progress, name, len(records)) as advance:
            if evaluation.rewarded_answers:
                stats, answers[name] = answer_stats(opened.model, tokenizer, records, rewards, run,
                                                    settings.batch_size, advance)
            else:
                stats = score_records(opened.model, records, evaluation, pad_id, settings.batch_size, device, advance)
        systems.append(SystemScores(name, spec, stats, out_dir / "predictions.jsonl"))
        del opened
        gc.collect()
    baseline = baseline_stats(records, evaluation, pad_token_id(tokenizer), classes)
    if baseline is not None:
        name, stats = baseline
        systems.append(SystemScores(_unique(name, [s.name for s in systems], [], 0), "baseline", stats,
                                    out_dir / "predictions.jsonl"))
    scored = evaluation.metrics(classes)
    scored += [unit_mean(name) for name in systems[0].stats if name not in {m.name for m in scored}]  # reward terms
    report = comparison_report(systems, len(records), files, scored, scored[0], settings)
    report["objective"] = {"name": run.objective.name, "records": evaluation.records, "dropped_overlong": dropped,
                           "baseline": None if baseline is None else systems[-1].name}
    if evaluation.confusion is not None:
        k = len(classes)
        report["classification"] = {"labels": classes, "confusion": {
            s.name: s.stats[evaluation.confusion].sum(0).reshape(k, k).astype(int).tolist() for s in systems}}
    texts = [prompt_and_reference(e) for e in kept]
    _write_unit_predictions(out_dir, systems, kept, texts, evaluation, classes, answers)
    _attach_examples(report, out_dir)
    return report


def _write_unit_predictions(out_dir: Path, systems: list[SystemScores], examples: list[Any],
                            texts: list[tuple[str, str]], evaluation: Any, classes: list[str],
                            answers: dict[str, list[str]]) -> None:
    """One line per record: its prompt, what the data says is right, and each system's verdict and statistics."""
    with fs.atomic_file(fs.own_entry(out_dir, "predictions.jsonl")) as tmp, open(tmp, "w") as out:
        for i, (example, (prompt, reference)) in enumerate(zip(examples, texts)):
            row: dict[str, Any] = {"index": i, "source": example.source, "prompt": prompt, "reference": reference,
                                   "outputs": {}, "stats": {}}
            for system in systems:
                unit = {name: values[i].tolist() for name, values in system.stats.items()}
                row["outputs"][system.name] = (answers[system.name][i] if system.name in answers
                                               else evaluation.describe(unit, classes))
                row["stats"][system.name] = unit
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _run_quantize_report(target: str | Path) -> dict[str, Any] | None:
    """The target run's quantize.json (a section of the report), or None for a model or an unquantized run."""
    run_dir = Path(target)
    return fs.read_json(run_dir / QUANTIZE_REPORT) if (run_dir / "config.yaml").is_file() else None


def _against_spec(spec: str, target_base: str | None) -> str:
    if spec != "base":
        return spec
    if target_base is None:
        raise ConfigError("--against base: the target is a plain model, so it has no base; give a run folder or "
                          "an adapter as TARGET, or name the other model")
    return target_base


def _unique(name: str, taken: list[str], against: list[str], position: int) -> str:
    if position > 0 and against[position - 1] == "base":
        name = f"base ({name})"
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name} #{k}", k + 1
    return candidate


class _progress:
    """A rich progress bar over examples (or nothing)."""

    def __init__(self, enabled: bool, name: str, total: int) -> None:
        self.enabled, self.name, self.total = enabled, name, total

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        self._bar = Progress(TextColumn(f"eval {self.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=err_console, transient=True)
        self._bar.__enter__()
        task = self._bar.add_task("eval", total=self.total)
        return lambda k: self._bar.update(task, advance=k)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)


def build_report(systems: list[SystemScores], examples: list[Any], references: list[str], files: list[Path],
                 metrics: list[Metric], settings: EvalSettings) -> dict[str, Any]:
    scored = all_metrics(metrics, settings)
    report = comparison_report(systems, len(examples), files, scored, primary_metric(scored, settings), settings)
    if settings.labels:
        report["classification"] = {"labels": settings.labels, "confusion": {s.name: s.confusion for s in systems}}
    return report


def comparison_report(systems: list[SystemScores], n: int, files: list[Path], scored: list[Metric], primary: Metric,
                      settings: EvalSettings) -> dict[str, Any]:
    """Every system's scores, and the first system compared with each other one: the deltas with their paired
    bootstrap intervals (one resampling for all), wins/losses/ties, the verdict, the biggest changes' indices."""
    target = systems[0]
    indices = resample_indices(n, settings.resamples, settings.seed)
    report: dict[str, Any] = {
        "target": target.name,
        "systems": [{"name": s.name, "spec": s.spec} for s in systems],
        "data": [str(f) for f in files],
        "examples": n,
        "settings": {**asdict(settings), "normalization": asdict(settings.normalization)},
        "metrics": {m.name: {"higher_is_better": m.higher_is_better,
                             "scores": {s.name: m.score(s.stats[_stats_key(m)].sum(0)) for s in systems}}
                    for m in scored},
        "primary_metric": primary.name,
        "comparisons": [],
    }
    for other in systems[1:]:
        improved, worsened = biggest_changes(target, other, primary, settings.top_n)
        metrics_compared = compare(target, other, scored, settings, indices)
        report["comparisons"].append({
            "against": other.name,
            "metrics": metrics_compared,
            "overall": overall_verdict(target.name, other.name, primary, metrics_compared, scored),
            "improved": improved, "worsened": worsened,
        })
    return report


def write_predictions(out_dir: Path, systems: list[SystemScores], examples: list[Any], prompts: list[str],
                      references: list[str]) -> None:
    """One line per example: its prompt, reference and every system's output and per-example scores."""
    handles = [open(s.predictions_path) for s in systems]
    try:
        with fs.atomic_file(fs.own_entry(out_dir, "predictions.jsonl")) as tmp, open(tmp, "w") as out:
            for i, lines in enumerate(zip(*handles)):
                records = [json.loads(line) for line in lines]
                row: dict[str, Any] = {"index": i, "source": examples[i].source, "prompt": prompts[i],
                                       "reference": references[i], "outputs": {}, "loss": {}}
                for system, record in zip(systems, records):
                    if "output" in record:
                        row["outputs"][system.name] = record["output"]
                    if "predicted_label" in record:
                        row.setdefault("predicted_label", {})[system.name] = record["predicted_label"]
                        row.setdefault("label_log_likelihoods", {})[system.name] = record["label_log_likelihoods"]
                    row["loss"][system.name] = {"loss_sum": record["loss"], "tokens": record["tokens"]}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        for handle in handles:
            handle.close()
    for system in systems:
        system.predictions_path.unlink(missing_ok=True)


def _attach_examples(report: dict[str, Any], out_dir: Path) -> None:
    """Put the texts of each comparison's biggest changes into the report (read back from predictions.jsonl,
    so only those examples are ever held in memory)."""
    wanted = {i for c in report["comparisons"] for i in c["improved"] + c["worsened"]}
    found: dict[int, dict[str, Any]] = {}
    if wanted:
        with open(out_dir / "predictions.jsonl") as handle:
            for line in handle:
                row = json.loads(line)
                if row["index"] in wanted:
                    found[row["index"]] = row
    for comparison in report["comparisons"]:
        for key in ("improved", "worsened"):
            comparison[key] = [_side_by_side(found[i], report["target"], comparison["against"]) for i in comparison[key]]


def _side_by_side(row: dict[str, Any], target: str, other: str) -> dict[str, Any]:
    pick = row.get("outputs") or row.get("predicted_label") or {}
    return {"index": row["index"], "source": row["source"], "prompt": row["prompt"], "reference": row["reference"],
            "target": pick.get(target), "other": pick.get(other)}
