"""The data report: what the data looks like after parsing and tokenization, before any training.

It is a plain dict (written as ``data_report.json`` in every run, printed by ``tunelab data inspect``), built
only from the tokenized examples and the preparation counts.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.data.tokenize import IGNORE, TokenizedExample

EMPTY_RESPONSE_EXAMPLES = 5  # file:line places listed in the report and its warning; enough to find the pattern


def empty_response_summary(sources: list[str]) -> dict[str, Any]:
    """How many records have a blank answer, and the first few file:line places, to find and fix them."""
    return {"count": len(sources), "examples": sources[:EMPTY_RESPONSE_EXAMPLES]}


def empty_response_warning(empty: dict[str, Any]) -> str:
    """One line for the log and the report's warnings. Such records are kept: a blank answer can be intended."""
    more = ", ..." if empty["count"] > len(empty["examples"]) else ""
    return (f"{empty['count']} records have an empty response, which teaches the model to answer nothing: "
            f"{', '.join(empty['examples'])}{more}")


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 95, 99)) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    out: dict[str, float] = {f"p{p}": float(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]) for p in points}
    out["max"] = float(ordered[-1])
    out["mean"] = round(sum(ordered) / len(ordered), 1)
    return out


def mask_segments(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> list[dict[str, Any]]:
    """The example as consecutive runs of text, each marked supervised or not, for highlighting."""
    segments: list[dict[str, Any]] = []
    start = 0
    flags = [label != IGNORE for label in example.labels]
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            segments.append({"text": tokenizer.decode(example.input_ids[start:i]), "supervised": flags[start]})
            start = i
    return segments


def end_of_turn_lint(tokenizer: PreTrainedTokenizerBase, examples: list[TokenizedExample]) -> int:
    """Count untruncated examples whose last supervised token is not a special token (no trained stop)."""
    specials = set(tokenizer.all_special_ids)
    missing = 0
    for example in examples:
        supervised = [label for label in example.labels if label != IGNORE]
        if supervised and not example.truncated and supervised[-1] not in specials:
            missing += 1
    return missing


def split_stats(examples: list[TokenizedExample], max_length: int) -> dict[str, Any]:
    lengths = [len(e.input_ids) for e in examples]
    supervised = sum(e.num_supervised for e in examples)
    total = sum(lengths)
    return {
        "examples": len(examples),
        "tokens": total,
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / total, 4) if total else 0.0,
        "token_length": percentiles(lengths),
        "truncated": sum(e.truncated for e in examples),
        "max_length": max_length,
    }


def task_counts(tasks: list[str], train: list[TokenizedExample], validation: list[TokenizedExample]) -> dict[str, Any]:
    """Examples per task in each split, in task-index order ({} for data without tasks)."""
    counts = {name: {"train": 0, "validation": 0} for name in tasks}
    if not counts:
        return counts
    for split, examples in (("train", train), ("validation", validation)):
        for example in examples:
            counts[example.task][split] += 1
    return counts


def build_report(
    *,
    tokenizer: PreTrainedTokenizerBase,
    files: list[dict[str, Any]],
    counts: dict[str, int],
    train: list[TokenizedExample],
    validation: list[TokenizedExample],
    zero_supervised: list[str],
    empty_responses: dict[str, Any],
    tokenizer_changes: list[str],
    max_length: int,
    tasks: list[str] | None = None,
    prompt_completion: str | None = None,
) -> dict[str, Any]:
    formats: dict[str, int] = {}
    for info in files:
        formats[info["format"]] = formats.get(info["format"], 0) + info["records"]
    everything = train + validation
    report: dict[str, Any] = {
        "files": files,
        "formats": formats,
        **counts,
        "zero_supervised_examples": len(zero_supervised),
        "zero_supervised_sources": zero_supervised[:20],
        "empty_responses": empty_responses,
        "tasks": task_counts(tasks or [], train, validation),
        "train": split_stats(train, max_length),
        "validation": split_stats(validation, max_length),
        "truncation_rate": round(sum(e.truncated for e in everything) / len(everything), 4) if everything else 0.0,
        "missing_end_of_turn_supervision": end_of_turn_lint(tokenizer, everything),
        "tokenizer_changes": tokenizer_changes,
        "prompt_completion": prompt_completion,  # how prompt_completion records were rendered (None: there were none)
        "example": {"source": train[0].source, "segments": mask_segments(tokenizer, train[0])} if train else None,
    }
    report["warnings"] = report_warnings(report)
    return report


def report_warnings(report: dict[str, Any]) -> list[str]:
    warnings = []
    if report["zero_supervised_examples"]:
        places = report["zero_supervised_sources"][:5]
        more = ", ..." if report["zero_supervised_examples"] > len(places) else ""
        warnings.append(f"{report['zero_supervised_examples']} examples have no supervised token (left out of "
                        f"training; an answer truncated away or a weight-0 turn): {', '.join(places)}{more}")
    if report.get("overlap_kept"):
        warnings.append(f"{report['overlap_kept']} training records also appear in the validation data and were kept "
                        "(data.dedup is off): the validation loss will look better than it is")
    if report["empty_responses"]["count"]:
        warnings.append(empty_response_warning(report["empty_responses"]))
    if report["truncation_rate"] > 0.05:
        warnings.append(f"{report['truncation_rate']:.0%} of examples are truncated: consider raising data.max_length")
    if report["missing_end_of_turn_supervision"]:
        warnings.append(
            f"{report['missing_end_of_turn_supervision']} examples do not supervise an end-of-turn token: "
            "the model may not learn to stop"
        )
    untrained = [name for name, counts in report["tasks"].items() if not counts["train"]]
    if untrained:
        warnings.append(f"tasks with no training example (all in validation, dropped or truncated away): {', '.join(untrained)}")
    if report["train"]["examples"] < 50:
        warnings.append(f"only {report['train']['examples']} training examples: expect overfitting")
    return warnings


def _side_stats(records: list[Any], sides: list[TokenizedExample], max_length: int) -> dict[str, Any]:
    """split_stats over the records' sides (both sides of a pair), counting records, not sides."""
    stats = split_stats(sides, max_length)
    stats["examples"] = len(records)
    stats["truncated"] = sum(record_truncated(r) for r in records)
    return stats


def record_truncated(record: Any) -> bool:
    return any(side.truncated for side in record_sides(record))


def record_sides(record: Any) -> list[TokenizedExample]:
    """The tokenized texts a record is made of: a pair's two sides, an unpaired or labeled record's one."""
    if hasattr(record, "chosen"):
        return [record.chosen, record.rejected]
    return [record.example]


def pair_counts(examples: list[Any], lengths: list[Any], truncation: str) -> dict[str, Any]:
    """What can be wrong with preference pairs: identical sides (nothing to learn), empty sides, lengths per side
    (tokens after truncation), and how many were truncated and how."""
    return {
        "chosen_equals_rejected": sum(e.chosen == e.rejected for e in examples),
        "empty_sides": {"prompt": sum(not (e.prompt.strip() or e.messages) for e in examples),
                        "chosen": sum(not e.chosen.strip() for e in examples),
                        "rejected": sum(not e.rejected.strip() for e in examples)},
        "tokens": {"prompt": percentiles([n.prompt for n in lengths]),
                   "chosen": percentiles([n.answers[0] for n in lengths]),
                   "rejected": percentiles([n.answers[1] for n in lengths])},
        "truncated": sum(n.truncated for n in lengths),
        "truncation": truncation,
    }


def unpaired_counts(examples: list[Any], lengths: list[Any], truncation: str) -> dict[str, Any]:
    """Unpaired completions: how many are desirable, empty sides, lengths per side, truncation."""
    return {
        "desirable": sum(bool(e.label) for e in examples),
        "undesirable": sum(not e.label for e in examples),
        "empty_sides": {"prompt": sum(not (e.prompt.strip() or e.messages) for e in examples),
                        "completion": sum(not e.completion.strip() for e in examples)},
        "tokens": {"prompt": percentiles([n.prompt for n in lengths]),
                   "completion": percentiles([n.answers[0] for n in lengths])},
        "truncated": sum(n.truncated for n in lengths),
        "truncation": truncation,
    }


def build_record_report(
    *,
    tokenizer: PreTrainedTokenizerBase,
    files: list[dict[str, Any]],
    counts: dict[str, int],
    train: list[Any],
    validation: list[Any],
    empty_responses: dict[str, Any],
    tokenizer_changes: list[str],
    max_length: int,
    record_counts: dict[str, Any],
    tasks: list[str] | None = None,
    prompt_completion: str | None = None,
) -> dict[str, Any]:
    """The data report of preference pairs, unpaired completions or labeled texts: the same keys as SFT data's
    (files, counts, per-split lengths, truncation, warnings), plus ``record_counts`` under the format's name
    (pairs, unpaired, classes)."""
    formats: dict[str, int] = {}
    for info in files:
        formats[info["format"]] = formats.get(info["format"], 0) + info["records"]
    everything = train + validation
    sides = [side for record in train for side in record_sides(record)]
    first = sides[0] if sides and any(label != IGNORE for label in sides[0].labels) else None
    report: dict[str, Any] = {
        "files": files,
        "formats": formats,
        **counts,
        "zero_supervised_examples": 0,
        "zero_supervised_sources": [],
        "empty_responses": empty_responses,
        "tasks": task_counts(tasks or [], [record_sides(r)[0] for r in train], [record_sides(r)[0] for r in validation]),
        "train": _side_stats(train, sides, max_length),
        "validation": _side_stats(validation, [s for r in validation for s in record_sides(r)], max_length),
        "truncation_rate": round(sum(record_truncated(r) for r in everything) / len(everything), 4) if everything else 0.0,
        "missing_end_of_turn_supervision": 0,  # an answer's end is in its own tokens; a label has none to supervise
        "tokenizer_changes": tokenizer_changes,
        "prompt_completion": prompt_completion,
        **record_counts,
        "example": {"source": first.source, "segments": mask_segments(tokenizer, first)} if first else None,
    }
    report["warnings"] = report_warnings(report) + record_warnings(report)
    return report


def record_warnings(report: dict[str, Any]) -> list[str]:
    warnings = []
    pairs = report.get("pairs")
    if pairs and pairs["chosen_equals_rejected"]:
        warnings.append(f"{pairs['chosen_equals_rejected']} pairs have the same chosen and rejected answer: they "
                        "teach nothing and only dilute the loss")
    classes = report.get("classes")
    if classes:
        counts = [info["count"] for info in classes["train"].values()]
        empty = [name for name, info in classes["train"].items() if not info["count"]]
        if empty:
            warnings.append(f"classes with no training example: {', '.join(empty)}")
        elif max(counts) > 10 * min(counts):
            warnings.append(f"the classes are unbalanced (largest {max(counts)}, smallest {min(counts)} training "
                            "records): consider objective.class_weights, and compare with the majority-class baseline")
    return warnings
