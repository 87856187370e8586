"""Reading data files and checking every record against one of the four formats.

Files are read through ``datasets`` (JSONL, JSON, CSV, Parquet). When a read fails, or a record has the wrong
shape, the error names the file, the line (or row) and the expected shapes, instead of an opaque Arrow error.
Every record becomes an :class:`Example`: either a chat (``messages``) or a prompt/completion pair of plain text.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("messages", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
EXPECTED_SHAPES = (
    "messages: {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": str}, ...]}; "
    "alpaca: {\"instruction\": str, \"input\"?: str, \"output\": str, \"system\"?: str}; "
    "prompt_completion: {\"prompt\": str, \"completion\": str}; "
    "text: {\"text\": str}"
)
SUFFIX_TO_BUILDER = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file or record that cannot be used: the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class Example:
    """One training example in canonical form.

    ``messages`` is set for chats (messages and alpaca formats); ``prompt``/``completion`` for plain text
    (prompt_completion, and text with an empty prompt). ``source`` is 'file:line' for error messages and reports.
    """

    format: str
    source: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""

    def key(self) -> str:
        """Identity for de-duplication and train/validation overlap (format and content, not the source)."""
        return json.dumps([self.format, self.messages, self.prompt, self.completion], ensure_ascii=False)


@dataclass
class LoadedFile:
    path: Path
    format: str
    examples: list[Example] = field(default_factory=list)


def _location(path: Path, row: int, line_of_row: list[int] | None) -> str:
    if line_of_row is not None:
        return f"{path}:{line_of_row[row]}"
    if path.suffix == ".csv":
        return f"{path}: row {row + 1} (after the header)"
    return f"{path}: record {row + 1}"


def _jsonl_lines(path: Path) -> list[int]:
    """1-based line number of each non-blank line: datasets skips blank lines, so row i is on line lines[i]."""
    lines = []
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                lines.append(number)
    return lines


def _diagnose_json(path: Path) -> str | None:
    """Find the first line that is not a JSON object, for a clear message when datasets' reader fails."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    return f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
                if not isinstance(value, dict):
                    return f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}"
    except UnicodeDecodeError as exc:
        return f"{path}: not UTF-8 text ({exc})"
    return None


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a data file as dicts, plus the line number of each row when the file is JSON Lines."""
    import datasets

    builder = SUFFIX_TO_BUILDER.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected one of {', '.join(SUFFIX_TO_BUILDER)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    is_json_array = builder == "json" and path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("[")
    if is_json_array:  # a plain JSON array: rows are array items, no per-row line numbers
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: record {bad + 1}: expected a JSON object, got {type(items[bad]).__name__}")
        return items, None
    options: dict[str, Any] = {}
    if builder == "csv":  # CSV has no types: keep every cell as text, so "4" or "None" is not read as a number or null
        with path.open(encoding="utf-8-sig", newline="") as handle:  # utf-8-sig: pandas drops a BOM too
            header = next(csv.reader(handle), [])
        options = {"features": datasets.Features({name: datasets.Value("string") for name in header}),
                   "keep_default_na": False}
    previous = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # a failed read becomes one DataError below
    datasets.disable_progress_bars()
    try:
        # Dataset.from_json/from_csv/from_parquet run the same builders as load_dataset without its Hub round trip
        # (load_dataset sends a download-count request per call, which stalls for seconds on offline machines).
        dataset = getattr(datasets.Dataset, f"from_{builder}")(str(path), **options)
    except Exception as exc:  # datasets raises many types (Arrow, JSON, casting); turn them into one clear message
        detail = _diagnose_json(path) if builder == "json" else None
        if builder == "json" and detail is None:
            # Every line is a JSON object, but their value types differ (a string here, a list there), which Arrow
            # cannot hold in one table: read them as they are, so the record checks can name the bad line.
            with path.open(encoding="utf-8") as handle:
                return [json.loads(text) for text in handle if text.strip()], _jsonl_lines(path)
        raise DataError(detail or f"{path}: could not be read as {builder} ({type(exc).__name__}: {exc})") from None
    finally:
        datasets.utils.logging.set_verbosity(previous)
    lines = _jsonl_lines(path) if builder == "json" else None
    return dataset.to_list(), lines


def detect_format(record: dict[str, Any]) -> str | None:
    keys = {k for k, v in record.items() if v is not None}
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _require_str(record: dict[str, Any], key: str, where: str, fmt: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: '{key}' is {got}; the {fmt} format expects a string. Expected shapes: {EXPECTED_SHAPES}")
    return value


def _messages(record: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] is a {type(message).__name__}; expected {{\"role\", \"content\"}}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content is {type(content).__name__}; expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}] is a system message; only the first message may be one")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant message, so there is nothing to learn from this record")
    return tuple(turns)


def to_example(record: dict[str, Any], fmt: str, where: str) -> Example:
    """Check one record against `fmt` and return its canonical form (or raise DataError naming `where`)."""
    found = detect_format(record)
    if found != fmt:
        keys = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
        raise DataError(
            f"{where}: record does not match the '{fmt}' format of this file (its keys: {keys}). "
            f"Expected shapes: {EXPECTED_SHAPES}"
        )
    if fmt == "messages":
        return Example(fmt, where, messages=_messages(record, where))
    if fmt == "alpaca":
        instruction = _require_str(record, "instruction", where, fmt)
        extra = _require_str(record, "input", where, fmt, optional=True)
        system = _require_str(record, "system", where, fmt, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = ((("system", system),) if system else ()) + (("user", user), ("assistant", _require_str(record, "output", where, fmt)))
        return Example(fmt, where, messages=turns)
    if fmt == "prompt_completion":
        return Example(fmt, where, prompt=_require_str(record, "prompt", where, fmt),
                       completion=_require_str(record, "completion", where, fmt))
    return Example(fmt, where, completion=_require_str(record, "text", where, fmt))


def load_file(path: str | Path, fmt: str = "auto") -> LoadedFile:
    """Read a file and check every record against one format ('auto': the first record's)."""
    path = Path(path)
    records, lines = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    if fmt == "auto":
        fmt = detect_format(records[0]) or ""
        if not fmt:
            keys = ", ".join(sorted(records[0])) or "none"
            raise DataError(f"{_location(path, 0, lines)}: cannot tell the format (keys: {keys}). Expected shapes: {EXPECTED_SHAPES}")
    loaded = LoadedFile(path, fmt)
    for row, record in enumerate(records):
        loaded.examples.append(to_example(record, fmt, _location(path, row, lines)))
    return loaded
