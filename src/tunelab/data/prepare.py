"""From data files to tokenized train/validation sets and the data report, cached by content hash."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from tunelab import fs
from tunelab.data.config import DataConfig
from tunelab.data import labels as labeled, preference, prompts
from tunelab.data.formats import RECORD_KINDS, SFT_FORMATS, DataError, Example, LoadedFile, load_file as load_data_file
from tunelab.data.report import (build_record_report, build_report, empty_response_summary, empty_response_warning,
                                 pair_counts, unpaired_counts)
from tunelab.data.tokenize import TokenizedExample, apply_length_policy, prepare_tokenizer, tokenize_example
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)
CACHE_WRITER = "tunelab data cache"  # the ownership record of a cache entry
CACHE_VERSION = "5"  # bump when tokenization, masking or the report's keys change, so stale caches are not reused


@dataclass
class PreparedData:
    # TokenizedExample for SFT data; TokenizedPair, TokenizedCompletion or TokenizedLabeled for the other kinds
    train: list[Any]
    validation: list[Any]
    validation_examples: list[Example]  # the raw validation records, for sample generations
    report: dict[str, Any]
    from_cache: bool = False

    @property
    def tasks(self) -> list[str]:
        """Task names of multi-task data, sorted; an example's ``task_id`` indexes this list. Empty: no tasks."""
        return list(self.report.get("tasks") or {})

    @property
    def records(self) -> str:
        """What the records are: 'sft' (chats, prompt/completion, text) or the format of the others."""
        return self.report.get("record_kind", "sft")

    @property
    def classes(self) -> list[str]:
        """Class names of labeled data, in label-id order (empty for other data)."""
        return list((self.report.get("classes") or {}).get("names", []))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [vocab, str(tokenizer.chat_template), str(tokenizer.special_tokens_map), type(tokenizer).__name__]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def records_fingerprint(records: list[Any]) -> str:
    """Hash of prepared records (tokenized examples, pairs, labeled texts: dataclasses) as the model sees them, so
    anything that changes them (the files, the template, max_length, the split) changes it."""
    payload = json.dumps([asdict(record) for record in records], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def data_file_hashes(config: DataConfig) -> list[dict[str, str]]:
    """Each data file's role (train, validation), path and content hash, in the config's order: saved with a run
    (data_report.json), so a refusal to mix two datasets can name the files that changed, not all of them."""
    return [{"role": role, "path": str(path), "sha256": file_sha256(Path(path))}
            for role, paths in (("train", config.train), ("validation", config.validation)) for path in paths]


def fingerprint_of(hashes: list[dict[str, str]]) -> str:
    """One hash over the files of ``data_file_hashes``, in order: the run's data fingerprint (a resumed run checks
    it trains on the same data) and part of the cache key."""
    contents = [[h["sha256"] for h in hashes if h["role"] == role] for role in ("train", "validation")]
    return hashlib.sha256(json.dumps(contents).encode()).hexdigest()[:24]


def cache_key(config: DataConfig, tokenizer: PreTrainedTokenizerBase, fingerprint: str) -> str:
    """``fingerprint``: ``fingerprint_of(data_file_hashes(config))``, computed once per run (hashing large files
    takes time)."""
    relevant = config.model_dump(exclude={"packing", "cache"})
    # Paths too, not only contents: cached examples carry their file:line sources for error messages and reports.
    relevant["contents"] = fingerprint
    payload = json.dumps([CACHE_VERSION, relevant, tokenizer_fingerprint(tokenizer)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# ---------------------------------------------------------------- cache (safetensors + JSON, no pickle)


def _save_split(examples: list[TokenizedExample], path: Path) -> list[dict[str, Any]]:
    lengths = [len(e.input_ids) for e in examples]
    flat_ids = [t for e in examples for t in e.input_ids]
    flat_labels = [t for e in examples for t in e.labels]
    save_file(
        {"input_ids": torch.tensor(flat_ids, dtype=torch.int64), "labels": torch.tensor(flat_labels, dtype=torch.int64),
         "lengths": torch.tensor(lengths, dtype=torch.int64)},
        str(path),
    )
    return [{"source": e.source, "truncated": e.truncated, "task": e.task, "task_id": e.task_id} for e in examples]


def _load_split(path: Path, meta: list[dict[str, Any]]) -> list[TokenizedExample]:
    tensors = load_file(str(path))
    ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    out, start = [], 0
    for length, info in zip(tensors["lengths"].tolist(), meta):
        out.append(TokenizedExample(ids[start : start + length], labels[start : start + length], info["source"],
                                    info["truncated"], info["task"], info["task_id"]))
        start += length
    return out


def save_cache(directory: Path, data: PreparedData) -> None:
    """Write a cache entry as a folder tunelab owns whole, put in place only once complete. An entry there that
    tunelab did not record writing (the user's, or a damaged one from an older tunelab, which wrote no record) is
    left alone, and this data is simply not cached."""
    try:
        with fs.owned_folder(directory, CACHE_WRITER) as tmp:
            _fill_cache(tmp, data)
    except ConfigError as exc:
        log.warning("tokenized data not cached: %s", exc)


def _fill_cache(tmp: Path, data: PreparedData) -> None:
    meta = {
        "train": _save_split(data.train, tmp / "train.safetensors"),
        "validation": _save_split(data.validation, tmp / "validation.safetensors"),
        "validation_examples": [asdict(e) for e in data.validation_examples],
        "report": data.report,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))


def load_cache(directory: Path) -> PreparedData | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        validation_examples = [
            Example(e["format"], e["source"], tuple(tuple(m) for m in e["messages"]), e["prompt"], e["completion"],
                    tuple(e["untrained_turns"]), e["task"])
            for e in meta["validation_examples"]
        ]
        return PreparedData(
            _load_split(directory / "train.safetensors", meta["train"]),
            _load_split(directory / "validation.safetensors", meta["validation"]),
            validation_examples, meta["report"], from_cache=True,
        )
    except (OSError, KeyError, ValueError, SafetensorError):  # missing or damaged: tokenize again
        return None


# ---------------------------------------------------------------- the pipeline


def _dedup(examples: list[Example]) -> tuple[list[Example], int]:
    seen: set[str] = set()
    kept = []
    for example in examples:
        key = example.key()
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept, len(examples) - len(kept)


def _split(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded train/validation split; with multi-task data, stratified so each task keeps its share."""
    count = int(val_size) if val_size >= 1 else round(len(examples) * val_size)
    if val_size > 0 and count == 0 and len(examples) > 1:
        count = 1
    if count >= len(examples):
        raise DataError(f"data.val_size={val_size} leaves no training examples out of {len(examples)}")
    rng = random.Random(seed)
    if examples and examples[0].task is not None:
        chosen = _stratified_choice(examples, count, rng)
    else:
        order = list(range(len(examples)))
        rng.shuffle(order)
        chosen = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen]


def _stratified_choice(examples: list[Example], count: int, rng: random.Random) -> set[int]:
    """Indices of ``count`` validation examples, spread over tasks in proportion to their sizes.

    Quotas are the largest-remainder rounding of count * n_task / n; a task with at least two examples gets at
    least one validation example while the total allows it (so every task is measured), and never all of them
    (so every task is trained)."""
    by_task: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_task.setdefault(example.task or "", []).append(index)
    names = sorted(by_task)
    exact = {t: count * len(by_task[t]) / len(examples) for t in names}
    quota = {t: min(int(exact[t]), len(by_task[t]) - 1) for t in names}
    for t in sorted(names, key=lambda t: (-(exact[t] - int(exact[t])), t)):  # largest remainders first
        if sum(quota.values()) < count and quota[t] < len(by_task[t]) - 1:
            quota[t] += 1
    for t in names:  # an unmeasured task takes one from the largest quota
        donor = max(names, key=lambda d: (quota[d], d))
        if quota[t] == 0 and len(by_task[t]) > 1 and quota[donor] > 1:
            quota[t], quota[donor] = 1, quota[donor] - 1
    chosen: set[int] = set()
    for t in names:
        members = list(by_task[t])
        rng.shuffle(members)
        chosen.update(members[: quota[t]])
    return chosen


def _check_tasks(examples: list[Example]) -> list[str]:
    """The sorted task names; multi-task data needs a task on every record (a record without one could not be
    counted, stratified or routed)."""
    with_task = next((e for e in examples if e.task is not None), None)
    if with_task is None:
        return []
    without = next((e for e in examples if e.task is None), None)
    if without is not None:
        raise DataError(f"{without.source}: no 'task', but {with_task.source} has one ({with_task.task!r}); in "
                        "multi-task data every record needs a task name")
    return sorted({e.task for e in examples if e.task is not None})


def _tokenize_all(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, config: DataConfig, counts: dict[str, int], zero: list[str]
) -> list[TokenizedExample]:
    out = []
    for example in examples:
        tokenized = apply_length_policy(tokenize_example(tokenizer, example, config.train_on_prompt), config.max_length, config.overlong)
        if tokenized is None:
            counts["dropped_overlong"] += 1
        elif tokenized.num_supervised == 0:
            zero.append(tokenized.source)
        else:
            out.append(tokenized)
    return out


def _with_task_ids(examples: list[TokenizedExample], task_ids: dict[str, int]) -> list[TokenizedExample]:
    if not task_ids:
        return examples
    return [replace(e, task_id=task_ids[e.task]) for e in examples]


def _load_all(paths: list[str], fmt: str, columns: dict[str, str], prompts: bool) -> list[LoadedFile]:
    return [load_data_file(path, fmt, columns, prompts) for path in paths]


PROMPT_COMPLETION_RENDERING = {
    "chat": "chat template (prompt = user turn, completion = assistant turn)",
    "raw": "raw text (prompt and completion laid end to end, no separator)",
}


def prompt_completion_mode(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """'chat' or 'raw': how prompt_completion records are rendered (data.prompt_completion, 'auto' resolved).

    A chat model is prompted through its template at inference, so by default it is trained through it too;
    training it on glued raw text would teach a prompt format nobody will use.
    """
    if config.prompt_completion != "auto":
        return config.prompt_completion
    return "chat" if config.chat_template is not None or tokenizer.chat_template else "raw"


def as_chat(example: Example) -> Example:
    """A prompt/completion pair as a two-turn conversation; the format stays prompt_completion in reports. The
    string prompt of a preference pair or unpaired completion becomes the user turn (its answers stay apart)."""
    if example.format == "prompt_completion":
        return replace(example, messages=(("user", example.prompt), ("assistant", example.completion)))
    if example.format in STRING_PROMPT_FORMATS and not example.messages:
        return replace(example, messages=(("user", example.prompt),))
    return example


STRING_PROMPT_FORMATS = ("prompt_completion", "preference", "unpaired_preference", "prompt")  # rendered per prompt_completion


def record_kind(files: list[LoadedFile]) -> str:
    """'sft' for the four SFT formats, else the one other format of every file (pairs cannot mix with chats)."""
    kinds = {"sft" if f.format in SFT_FORMATS else f.format: f for f in files}
    if len(kinds) > 1:
        named = "; ".join(f"{f.path} is {f.format}" for f in kinds.values())
        raise DataError(f"the data files hold different kinds of records ({named}): a run trains on one kind, SFT "
                        "records (messages, alpaca, prompt_completion, text), preference pairs, unpaired completions "
                        "or labeled texts")
    return next(iter(kinds), "sft")


def _empty_responses(files: list[LoadedFile]) -> dict[str, Any]:
    """Records with a blank answer, counted in every loaded file (duplicates too: each is a line to fix) and logged
    on every call, cache hit or not, because they are kept and train the model to answer nothing."""
    empty = empty_response_summary([e.source for f in files for e in f.examples if e.has_empty_response])
    if empty["count"]:
        log.warning("data: %s", empty_response_warning(empty))
    return empty


def _no_training_examples_message(config: DataConfig, train: list[Example], counts: dict[str, int], zero: list[str]) -> str:
    reasons = []
    if counts["overlap_removed"]:
        reasons.append(f"{counts['overlap_removed']} removed because the validation data holds them too")
    if counts["dropped_overlong"]:
        reasons.append(f"{counts['dropped_overlong']} dropped as longer than data.max_length={config.max_length}")
    if zero:
        reasons.append(f"{len(zero)} with no supervised token left (e.g. {zero[0]}): the answer was truncated away "
                       f"at data.max_length={config.max_length}, or is empty")
    if not train:
        reasons.append("none left after de-duplication and the validation split")
    return f"no usable training examples in {', '.join(config.train)}: " + "; ".join(reasons or ["the files are empty"])


def prepare_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, cache_dir: Path | None = None,
                 class_names_given: list[str] | None = None, prompts: bool = False) -> PreparedData:
    """Load, check, de-duplicate, split and tokenize; reuse the cached result when nothing changed.

    ``class_names_given``: the class list of labeled data in label-id order (else the labels seen, sorted).
    ``prompts``: the run reads prompt records (an online objective), which data.format 'auto' then detects."""
    if not config.train:
        raise DataError("data.train is empty: give at least one training file (.jsonl, .json, .csv or .parquet)")
    train_files = _load_all(config.train, config.format, config.columns, prompts)
    val_files = _load_all(config.validation, config.format, config.columns, prompts)
    kind = record_kind(train_files + val_files)
    has_pairs = any(e.format in STRING_PROMPT_FORMATS and not e.messages for f in train_files + val_files
                    for e in f.examples)
    pair_mode = prompt_completion_mode(config, tokenizer) if has_pairs else None
    needs_chat = pair_mode == "chat" or any(e.messages for f in train_files + val_files for e in f.examples)
    changes = prepare_tokenizer(tokenizer, config.chat_template, needs_chat)
    if pair_mode:
        log.info("data: prompt_completion records rendered as %s", PROMPT_COMPLETION_RENDERING[pair_mode])
    empty = _empty_responses(train_files + val_files)

    hashes = data_file_hashes(config)
    fingerprint = fingerprint_of(hashes)
    # Only SFT data is cached: pairs and labels are few and quick to tokenize (a cache entry holds SFT rows only).
    key = cache_key(config, tokenizer, fingerprint) if config.cache and cache_dir and kind == "sft" else None
    if key:
        cached = load_cache(cache_dir / key)
        if cached is not None:
            log.info("tokenized data loaded from cache %s", cache_dir / key)
            cached.report["tokenizer_changes"] = changes
            cached.report.update(data_fingerprint=fingerprint, data_file_hashes=hashes)  # an older entry lacks them
            return cached

    render = as_chat if pair_mode == "chat" else (lambda e: e)
    train = [render(e) for f in train_files for e in f.examples]
    validation = [render(e) for f in val_files for e in f.examples]
    task_ids = {name: index for index, name in enumerate(_check_tasks(train + validation))}
    counts = {"records": len(train) + len(validation), "duplicates_removed": 0, "overlap_removed": 0,
              "overlap_kept": 0, "dropped_overlong": 0}
    if config.dedup:
        train, dup_train = _dedup(train)
        validation, dup_val = _dedup(validation)
        counts["duplicates_removed"] = dup_train + dup_val
    if not config.validation and config.val_size > 0:
        train, validation = _split(train, config.val_size, config.seed)
    if validation:  # a validation record seen in training flatters the validation loss: removed, or counted
        val_keys = {e.key() for e in validation}
        overlapping = sum(e.key() in val_keys for e in train)
        if config.dedup:
            train = [e for e in train if e.key() not in val_keys]
            counts["overlap_removed"] = overlapping
        else:
            counts["overlap_kept"] = overlapping

    files = [{"path": str(f.path), "format": f.format, "records": len(f.examples), "role": role}
             for role, group in (("train", train_files), ("validation", val_files)) for f in group]
    if kind != "sft":
        return _prepare_records(kind, config, tokenizer, train, validation, task_ids, counts, files, empty, changes,
                                pair_mode, hashes, class_names_given)
    zero: list[str] = []
    train_tok = _with_task_ids(_tokenize_all(train, tokenizer, config, counts, zero), task_ids)
    val_tok = _with_task_ids(_tokenize_all(validation, tokenizer, config, counts, zero), task_ids)
    if not train_tok:
        raise DataError(_no_training_examples_message(config, train, counts, zero))
    kept_val_sources = {e.source for e in val_tok}
    report = build_report(tokenizer=tokenizer, files=files, counts=counts, train=train_tok, validation=val_tok,
                          zero_supervised=zero, empty_responses=empty, tokenizer_changes=changes,
                          max_length=config.max_length, tasks=list(task_ids),
                          prompt_completion=PROMPT_COMPLETION_RENDERING[pair_mode] if pair_mode else None)
    report.update(data_fingerprint=fingerprint, data_file_hashes=hashes)
    data = PreparedData(train_tok, val_tok, [e for e in validation if e.source in kept_val_sources], report)
    if key:
        save_cache(cache_dir / key, data)
    return data


def _tokenize_records(kind: str, examples: list[Example], tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                      counts: dict[str, int]) -> tuple[list[Any], list[Example], list[Any]]:
    """Tokenized records of one split, the examples they came from, and each one's side lengths (pairs, unpaired)."""
    tokenize = {"preference": preference.tokenize_pair, "unpaired_preference": preference.tokenize_unpaired,
                "labeled": labeled.tokenize_labeled, "prompt": prompts.tokenize_prompt}[kind]
    records, kept, lengths = [], [], []
    for example in examples:
        result = tokenize(tokenizer, example, config.max_length, config.overlong)
        if result is None:
            counts["dropped_overlong"] += 1
            continue
        record, length = result if isinstance(result, tuple) else (result, None)
        records.append(record)
        kept.append(example)
        lengths.append(length)
    return records, kept, lengths


def tokenize_records(examples: list[Example], tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                     kind: str) -> tuple[list[Any], list[Example], int]:
    """Records of one kind other than SFT (``kind``: preference, unpaired_preference, labeled) tokenized as a run
    with data section ``config`` tokenizes them, for evaluating its result: string prompts rendered as it rendered
    them (data.prompt_completion), cut or dropped past its max_length. Returns the records, the examples they came
    from, and how many were dropped as overlong. Labeled records get their class ids from the caller."""
    wrong = next((e for e in examples if ("sft" if e.format in SFT_FORMATS else e.format) != kind), None)
    if wrong is not None:
        raise DataError(f"{wrong.source}: a {wrong.format} record, but this evaluation reads {RECORD_KINDS[kind]}")
    has_pairs = any(e.format in STRING_PROMPT_FORMATS and not e.messages for e in examples)
    render = as_chat if has_pairs and prompt_completion_mode(config, tokenizer) == "chat" else (lambda e: e)
    counts = {"dropped_overlong": 0}
    records, kept, _ = _tokenize_records(kind, [render(e) for e in examples], tokenizer, config, counts)
    return records, kept, counts["dropped_overlong"]


def _prepare_records(kind: str, config: DataConfig, tokenizer: PreTrainedTokenizerBase, train: list[Example],
                     validation: list[Example], task_ids: dict[str, int], counts: dict[str, int],
                     files: list[dict[str, Any]], empty: dict[str, Any], changes: list[str], pair_mode: str | None,
                     hashes: list[dict[str, str]], class_names_given: list[str] | None) -> PreparedData:
    """Preference pairs, unpaired completions or labeled texts after the split: tokenized, counted, reported."""
    train_rec, train_kept, train_len = _tokenize_records(kind, train, tokenizer, config, counts)
    val_rec, val_kept, val_len = _tokenize_records(kind, validation, tokenizer, config, counts)
    if not train_rec:
        raise DataError(_no_training_examples_message(config, train, counts, []))
    if task_ids:
        train_rec, val_rec = ([_record_with_task_id(r, task_ids) for r in group] for group in (train_rec, val_rec))
    examples, lengths = train_kept + val_kept, train_len + val_len
    if kind == "labeled":
        names = labeled.class_names([r.label for r in train_rec + val_rec], class_names_given)
        train_rec, val_rec = labeled.with_label_ids(train_rec, names), labeled.with_label_ids(val_rec, names)
        record_counts = {"classes": {"names": names, "train": labeled.class_balance(names, train_rec),
                                     "validation": labeled.class_balance(names, val_rec),
                                     "truncation": labeled.TRUNCATION_RULE}}
    elif kind == "prompt":
        record_counts = {"prompts": prompts.prompt_counts(examples, train_rec + val_rec)}
    elif kind == "preference":
        record_counts = {"pairs": pair_counts(examples, lengths, preference.TRUNCATION_RULE)}
    else:
        record_counts = {"unpaired": unpaired_counts(examples, lengths, preference.TRUNCATION_RULE)}
    report = build_record_report(tokenizer=tokenizer, files=files, counts=counts, train=train_rec, validation=val_rec,
                                 empty_responses=empty, tokenizer_changes=changes, max_length=config.max_length,
                                 record_counts=record_counts, tasks=list(task_ids),
                                 prompt_completion=PROMPT_COMPLETION_RENDERING[pair_mode] if pair_mode else None)
    report["record_kind"] = kind
    report.update(data_fingerprint=fingerprint_of(hashes), data_file_hashes=hashes)
    return PreparedData(train_rec, val_rec, val_kept, report)


def _record_with_task_id(record: Any, task_ids: dict[str, int]) -> Any:
    if hasattr(record, "chosen"):
        return replace(record, chosen=replace(record.chosen, task_id=task_ids[record.chosen.task]),
                       rejected=replace(record.rejected, task_id=task_ids[record.rejected.task]))
    return replace(record, example=replace(record.example, task_id=task_ids[record.example.task]))


def tokenized_sides(example: Example, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> list[tuple[str, TokenizedExample]]:
    """One record as training tokenizes it, for showing it: (name, tokens) of each side (a pair has two: chosen
    and rejected; other records one, named ''). Call after ``prepare_data`` (it sets the tokenizer's template)."""
    if example.format in SFT_FORMATS:
        return [("", tokenize_example(tokenizer, example, config.train_on_prompt))]
    if example.format in STRING_PROMPT_FORMATS and prompt_completion_mode(config, tokenizer) == "chat":
        example = as_chat(example)
    if example.format == "preference":
        pair = preference.tokenize_pair(tokenizer, example, config.max_length)
        return [("chosen", pair[0].chosen), ("rejected", pair[0].rejected)] if pair else []
    if example.format == "unpaired_preference":
        record = preference.tokenize_unpaired(tokenizer, example, config.max_length)
        return [("desirable" if example.label else "undesirable", record[0].example)] if record else []
    if example.format == "prompt":
        prompt = prompts.tokenize_prompt(tokenizer, example, config.max_length)
        return [("prompt", prompt.example)] if prompt else []
    record = labeled.tokenize_labeled(tokenizer, example, config.max_length)
    return [(f"label {example.label}", record.example)] if record else []
