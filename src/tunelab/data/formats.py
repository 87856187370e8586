"""Reading data files and checking every record against one of the formats.

Files are read through ``datasets`` (JSONL, JSON, CSV, Parquet). When a read fails, or a record has the wrong
shape, the error names the file, the line (or row) and the expected shape (its file's format's, or every format's
when the format cannot be told), instead of an opaque Arrow error.
Every record becomes an :class:`Example`: either a chat (``messages``) or a prompt/completion pair of plain text
(the four SFT formats); a preference pair (a prompt, a chosen and a rejected answer); an unpaired completion with a
desirable/undesirable label; a text (or chat) with a class label; or a prompt alone (a string, or messages ending
in the user's turn), whose other fields are reference columns for the rewards of online objectives. The prompt of a pair or an unpaired
completion is a string, or a list of messages as in TRL's conversational format, whose answers are then lists
holding the one assistant turn.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import DataError as DataError  # defined in tunelab.errors; importable from here too

FORMATS = ("messages", "alpaca", "prompt_completion", "text", "preference", "unpaired_preference", "labeled", "prompt")
# The record kinds a run trains on: one per run (a file of pairs cannot be mixed with chats).
SFT_FORMATS = ("messages", "alpaca", "prompt_completion", "text")
# PreparedData.records: the kinds of record a run can train on (an objective declares the one it needs)
RECORD_KINDS = {
    "sft": "SFT records (messages, alpaca, prompt_completion or text)",
    "preference": "preference pairs {prompt, chosen, rejected}",
    "unpaired_preference": "unpaired completions {prompt, completion, label: true|false}",
    "labeled": "labeled texts {text, label} (or {messages, label})",
    "prompt": "prompts {prompt} (or {messages} ending in a user turn), plus any reference columns",
}
ROLES = ("system", "user", "assistant")
# What each format's records look like, for errors: a record of a file whose format is known is told its own
# format's shape; the list of them all is for a record whose format cannot be told.
SHAPES: dict[str, str] = {
    "messages": "{\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": str, \"weight\"?: 0|1}, ...]}",
    "alpaca": "{\"instruction\": str, \"input\"?: str, \"output\": str, \"system\"?: str}",
    "prompt_completion": "{\"prompt\": str, \"completion\": str}",
    "text": "{\"text\": str}",
    "preference": "{\"prompt\": str, \"chosen\": str, \"rejected\": str} (or prompt: [messages], chosen/rejected: "
                  "[{\"role\": \"assistant\", \"content\": str}])",
    "unpaired_preference": "{\"prompt\", \"completion\", \"label\": true|false} (strings or messages, as preference)",
    "labeled": "{\"text\": str, \"label\": str|int} (or \"messages\" plus \"label\")",
    "prompt": "{\"prompt\": str or [messages]} or {\"messages\": [..., {\"role\": \"user\", ...}]} (ending in a user "
              "turn), any other key a reference column (e.g. \"reference\": str)",
}
TASK_KEY_NOTE = "any format may add \"task\": str (multi-task data)"
EXPECTED_SHAPES = "; ".join(f"{fmt}: {shape}" for fmt, shape in SHAPES.items()) + "; " + TASK_KEY_NOTE


def expected_shape(fmt: str) -> str:
    """What a record of format ``fmt`` looks like, as an error about a record of a file of that format ends."""
    return f"The {fmt} format expects {SHAPES[fmt]}; {TASK_KEY_NOTE}"


SUFFIX_TO_BUILDER = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
GIVE_A_DATA_FILE = "give a data file (.jsonl, .json, .csv or .parquet)"


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
    untrained_turns: tuple[int, ...] = ()  # indices of assistant messages with OpenAI's "weight": 0 (context only)
    task: str | None = None  # the optional "task" field of multi-task data (any format); None: no task given
    # Preference pairs: the prompt is ``prompt`` or, conversational, ``messages`` (ending before the answer);
    # ``chosen``/``rejected`` are the answers' text. Unpaired preference: the answer is ``completion``.
    chosen: str = ""
    rejected: str = ""
    label: str | bool | None = None  # unpaired preference: desirable (True) or not; labeled: the class name
    # A prompt record's other fields ({name: value}, in the file's order): the reference columns rewards read.
    columns: tuple[tuple[str, Any], ...] = ()

    @property
    def has_empty_response(self) -> bool:
        """An assistant turn or completion that is blank: valid, but it teaches the model to answer nothing."""
        if self.messages:
            return any(role == "assistant" and not content.strip() and i not in self.untrained_turns
                       for i, (role, content) in enumerate(self.messages))  # a weight-0 turn is only context
        if self.format == "preference":
            return not self.chosen.strip() or not self.rejected.strip()
        return self.format in ("prompt_completion", "unpaired_preference") and not self.completion.strip()

    def key(self) -> str:
        """Identity for de-duplication and train/validation overlap (format and content, not the source)."""
        # The task is part of the identity: the same text under two tasks is two examples, not a duplicate.
        return json.dumps([self.format, self.messages, self.prompt, self.completion, self.untrained_turns, self.task,
                           self.chosen, self.rejected, self.label, self.columns], ensure_ascii=False, default=str)


@dataclass
class LoadedFile:
    path: Path
    format: str
    examples: list[Example] = field(default_factory=list)


def record_location(path: Path, row: int, line_of_row: list[int] | None) -> str:
    """Where record ``row`` of ``path`` is, for a message: its line, or its row or record number."""
    if line_of_row is not None:
        return f"{path}:{line_of_row[row]}"
    if path.suffix == ".csv":
        return f"{path}: row {row + 1} (after the header)"
    return f"{path}: record {row + 1}"


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line, line ending kept, raising DataError on the first line that is not UTF-8.

    Lines are decoded one by one, from bytes, so a bad byte is reported with its line (a text-mode read fails on
    whichever buffer holds it, with no line). UTF-8 never uses the newline byte inside a character, so splitting
    on it first is safe, even inside a quoted multi-line CSV cell.
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = exc.object[exc.start]
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {byte:#04x} at column {exc.start + 1}); "
                                "the file must be UTF-8: save it again with UTF-8 encoding") from None


def _jsonl_lines(path: Path) -> list[int]:
    """1-based line number of each non-blank line: datasets skips blank lines, so row i is on line lines[i]."""
    return [number for number, text in _text_lines(path) if text.strip()]


def _json_reason(exc: json.JSONDecodeError) -> str:
    # json's messages end in "at" when it appends the position itself ("Unterminated string starting at")
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _diagnose_json(path: Path) -> str | None:
    """Find the first line that is not a JSON object, for a clear message when datasets' reader fails."""
    for number, text in _text_lines(path):
        if not text.strip():
            continue
        try:
            # without its line ending: with it, an unclosed string reads as an "invalid control character"
            value = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            return f"{path}:{number}: not valid JSON ({_json_reason(exc)})"
        if not isinstance(value, dict):
            return f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}"
    return None


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, cells) of each non-blank CSV row, the header included."""
    reader = csv.reader(text.removeprefix("\ufeff") if number == 1 else text  # a BOM, as pandas drops it
                        for number, text in _text_lines(path))
    start = 1
    for row in reader:
        if row:  # pandas skips blank lines
            yield start, row
        start = reader.line_num + 1


def _csv_header(path: Path) -> tuple[list[str], bool]:
    """The header's cells, and whether any row follows it (read from the top, not the whole file)."""
    rows = _csv_rows(path)
    try:
        return next(rows, (0, []))[1], next(rows, None) is not None
    finally:
        rows.close()


def _diagnose_csv(path: Path, header: list[str]) -> str | None:
    """Find the first row with more cells than the header (the only shape pandas' reader refuses)."""
    for line, row in _csv_rows(path):
        if len(row) > len(header):
            return (f"{path}:{line}: {len(row)} columns, but the header has {len(header)}; a cell holding a comma "
                    "must be in double quotes")
    return None


def _root_cause(exc: BaseException) -> BaseException:
    # datasets wraps the reader's own error (e.g. pandas' ParserError) in a generic DatasetGenerationError
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    """Items of a plain JSON array file: rows are array items, no per-row line numbers."""
    try:
        items = json.loads("".join(text for _, text in _text_lines(path)))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({_json_reason(exc)})") from None
    bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad + 1}: expected a JSON object, got {type(items[bad]).__name__}")
    return items


def _starts_with_bracket(path: Path) -> bool:
    """A JSON array rather than JSON Lines; only the file's start is read (data files can be gigabytes)."""
    with path.open("rb") as handle:
        head = handle.read(1 << 16).decode("utf-8", errors="replace")
    return head.lstrip("\ufeff \t\r\n").startswith("[")


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a data file as dicts, plus the line number of each row when the file is JSON Lines or CSV."""
    import datasets

    if path.is_dir():  # checked first: a directory has no suffix, and a "data.jsonl" folder is not "not found"
        raise DataError(f"{path}: is a directory: {GIVE_A_DATA_FILE}")
    builder = SUFFIX_TO_BUILDER.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected one of {', '.join(SUFFIX_TO_BUILDER)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if builder == "json" and _starts_with_bracket(path):
        return _read_json_array(path), None
    options: dict[str, Any] = {}
    header: list[str] = []
    if builder == "csv":  # CSV has no types: keep every cell as text, so "4" or "None" is not read as a number or null
        header, has_rows = _csv_header(path)
        if not has_rows:  # pandas fails on a header-only file; load_file reports it as having no records
            return [], None
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
        detail = _diagnose_csv(path, header) if builder == "csv" else _diagnose_json(path) if builder == "json" else None
        if builder == "json" and detail is None:
            # Every line is a JSON object, but their value types differ (a string here, a list there), which Arrow
            # cannot hold in one table: read them as they are, so the record checks can name the bad line.
            return [json.loads(text) for _, text in _text_lines(path) if text.strip()], _jsonl_lines(path)
        cause = _root_cause(exc)
        raise DataError(detail or f"{path}: could not be read as {builder} ({type(cause).__name__}: {cause})") from None
    finally:
        datasets.utils.logging.set_verbosity(previous)
    lines = _jsonl_lines(path) if builder == "json" else None  # first: it names a line that is not UTF-8
    records = dataset.to_list()
    return records, _csv_lines(path, len(records)) if builder == "csv" else lines


def _csv_lines(path: Path, records: int) -> list[int] | None:
    """1-based line where each CSV row starts (a quoted cell may span lines), or None where csv's reading disagrees
    with pandas' about the rows (then a row is named by its number)."""
    starts = [line for line, _ in _csv_rows(path)][1:]  # the header's line left out
    return starts if len(starts) == records else None


# The keys each format needs, for naming what is missing when a record fits none (optional keys left out).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
    "text": ("text",), "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"), "labeled": ("text", "label"),
}  # not the prompt format: any record with a prompt fits it, so it is never the "nearest" to a broken one
CANONICAL_KEYS = ("messages", "instruction", "input", "output", "system", "prompt", "completion", "text", "task",
                  "chosen", "rejected", "label")


def _present_keys(record: dict[str, Any]) -> set[str]:
    return {k for k, v in record.items() if v is not None}


def nearest_format(record: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The format whose required keys the record holds the largest share of, and the ones it lacks (None when it
    holds none of any format's keys). Ties go to the earlier format in FORMATS."""
    keys = _present_keys(record)
    share = {fmt: sum(k in keys for k in need) / len(need) for fmt, need in REQUIRED_KEYS.items()}
    best = max(REQUIRED_KEYS, key=lambda fmt: share[fmt])
    if share[best] == 0:
        return None
    return best, [k for k in REQUIRED_KEYS[best] if k not in keys]


def _unknown_format_message(record: dict[str, Any], where: str, column_word: str) -> str:
    keys = ", ".join(sorted(_present_keys(record))) or "none"
    nearest = nearest_format(record)
    hint = ("; if the data uses other names, map them with data.columns (for example {response: completion})")
    if nearest is None:
        return f"{where}: cannot tell the format ({column_word}s: {keys}){hint}. Expected shapes: {EXPECTED_SHAPES}"
    fmt, missing = nearest
    named = ", ".join(f"'{k}'" for k in missing)
    return (f"{where}: cannot tell the format: missing {column_word} {named} of the {fmt} format ({column_word}s: "
            f"{keys}){hint}. Expected shapes: {EXPECTED_SHAPES}")


def rename_columns(record: dict[str, Any], columns: dict[str, str], where: str) -> dict[str, Any]:
    """``data.columns`` ({file key: canonical key}) applied to one record; a record holding both names is an error
    (which one is meant would be a guess)."""
    if not columns:
        return record
    renamed = dict(record)
    for source, target in columns.items():
        if source not in renamed:
            continue
        if renamed.get(target) is not None and source != target:
            raise DataError(f"{where}: holds both '{source}' and '{target}', and data.columns maps '{source}' to "
                            f"'{target}'; remove one of them or the mapping")
        renamed[target] = renamed.pop(source)
    return renamed


def _check_mapped_columns(path: Path, records: list[dict[str, Any]], columns: dict[str, str], column_word: str) -> None:
    """Every column that data.columns names must be somewhere in the file (a typo would otherwise go unseen)."""
    seen = {key for record in records for key in record}
    absent = [source for source in columns if source not in seen]
    if absent:
        keys = ", ".join(sorted(seen)) or "none"
        raise DataError(f"{path}: data.columns names {column_word} {', '.join(repr(a) for a in absent)}, which the file "
                        f"does not have ({column_word}s: {keys})")


def detect_format(record: dict[str, Any], prompts: bool = False) -> str | None:
    """The format a record has. ``prompts``: the run reads prompt records (an online objective), so a prompt with
    other keys, or a chat ending in the user's turn, is a prompt record; otherwise the same record would be an
    incomplete prompt/completion pair or a chat, and is reported as one."""
    keys = _present_keys(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired_preference"
    if "label" in keys and keys & {"text", "messages"}:
        return "labeled"
    if "messages" in keys:
        return "prompt" if prompts and _ends_with_user_turn(record["messages"]) else "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if prompts and "prompt" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    return None


def _ends_with_user_turn(messages: Any) -> bool:
    """A conversation waiting for the assistant's answer: a prompt record rather than an SFT chat."""
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "user"


def _require_str(record: dict[str, Any], key: str, where: str, fmt: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: '{key}' is {got}; the {fmt} format expects a string. {expected_shape(fmt)}")
    return value


def _messages(record: dict[str, Any], where: str, need_assistant: bool = True,
              key: str = "messages") -> tuple[tuple[tuple[str, str], ...], tuple[int, ...]]:
    """The (role, content) turns, and the indices of assistant turns with "weight": 0 (OpenAI's fine-tuning
    format: such a turn is context for later turns but takes no loss)."""
    raw = record.get(key)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects")
    turns, untrained = [], []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{i}] is a {type(message).__name__}; expected {{\"role\", \"content\"}}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content is {type(content).__name__}; expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: {key}[{i}] is a system message; only the first message may be one")
        if _untrained(message, role, f"{where}: {key}[{i}]"):
            untrained.append(i)
        turns.append((role, content))
    if need_assistant and not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant message, so there is nothing to learn from this record")
    return tuple(turns), tuple(untrained)


def _untrained(message: dict[str, Any], role: str, where: str) -> bool:
    weight = message.get("weight")
    if weight is None:
        return False
    if role != "assistant":
        raise DataError(f"{where}: 'weight' is only for assistant messages (it says whether the turn is trained)")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(f"{where}: weight is {weight!r}; expected 0 (context only, no loss) or 1 (trained)")
    return weight == 0


def _task(record: dict[str, Any], where: str) -> str | None:
    """The record's task name, or None when it has none. A CSV cell cannot be absent, so an empty cell is "none"."""
    task = record.get("task")
    if task is None or task == "":
        return None
    if not isinstance(task, str) or not task.strip():
        got = f"a {type(task).__name__}" if not isinstance(task, str) else "blank"
        raise DataError(f"{where}: 'task' is {got}; expected a task name (a non-empty string), or leave it out")
    return task


def to_example(record: dict[str, Any], fmt: str, where: str, detected: bool = False) -> Example:
    """Check one record against `fmt` and return its canonical form (or raise DataError naming `where`).
    ``detected``: `fmt` was told from the file's first record (data.format 'auto'), not configured."""
    return replace(_content(record, fmt, where, detected), task=_task(record, where))


def _content(record: dict[str, Any], fmt: str, where: str, detected: bool = False) -> Example:
    if fmt == "prompt":  # any record with a prompt: its other keys (even 'completion') are reference columns
        return _prompt_record(record, where)
    found = detect_format(record)
    if found != fmt:
        raise DataError(_mismatch_message(record, fmt, where, detected))
    if fmt == "messages":
        turns, untrained = _messages(record, where)
        return Example(fmt, where, messages=turns, untrained_turns=untrained)
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
    if fmt == "preference":
        prompt, turns = _prompt(record, where, fmt)
        conversational = bool(turns)
        return Example(fmt, where, messages=turns, prompt=prompt,
                       chosen=_answer(record, "chosen", where, conversational),
                       rejected=_answer(record, "rejected", where, conversational))
    if fmt == "unpaired_preference":
        prompt, turns = _prompt(record, where, fmt)
        return Example(fmt, where, messages=turns, prompt=prompt,
                       completion=_answer(record, "completion", where, bool(turns)), label=_desirable(record, where))
    if fmt == "labeled":
        label = _class_label(record, where)
        if record.get("messages") is not None:
            turns, _ = _messages(record, where, need_assistant=False)
            return Example(fmt, where, messages=turns, label=label)
        return Example(fmt, where, prompt=_require_str(record, "text", where, fmt), label=label)
    return Example(fmt, where, completion=_require_str(record, "text", where, fmt))


def _mismatch_message(record: dict[str, Any], fmt: str, where: str, detected: bool) -> str:
    """A record that is not of its file's format: the format, how it was chosen, what the record lacks, and that
    format's shape alone (the file's format is known: the other formats' shapes would only bury it)."""
    keys = ", ".join(sorted(_present_keys(record))) or "none"
    missing = [k for k in REQUIRED_KEYS[fmt] if k not in _present_keys(record)]
    lacks = f"it lacks {', '.join(repr(k) for k in missing)}; " if missing else ""
    how = "detected from its first record" if detected else "configured"
    return (f"{where}: record does not match the '{fmt}' format of this file ({how}; {lacks}its keys: {keys}). "
            f"{expected_shape(fmt)}")


PROMPT_KEYS = ("prompt", "messages", "task")  # what a prompt record is made of; its other keys are columns


def _prompt_record(record: dict[str, Any], where: str) -> Example:
    """A prompt alone: a string, or messages (under 'messages' or, as in TRL, under 'prompt') ending in the
    user's turn; every other field is kept as a reference column."""
    key = "messages" if record.get("messages") is not None else "prompt"
    if record.get(key) is None:
        keys = ", ".join(sorted(_present_keys(record))) or "none"
        raise DataError(f"{where}: a prompt record needs 'prompt' (a string or messages) or 'messages' ending in the "
                        f"user's turn (its keys: {keys}); data.columns can rename a key to 'prompt'")
    if key == "prompt" and isinstance(record.get("prompt"), str):
        prompt, turns = record["prompt"], ()
    else:
        if not isinstance(record.get(key), list):
            _prompt(record, where, "prompt")  # raises the usual message about the prompt's type
        turns, _ = _messages(record, where, need_assistant=False, key=key)
        prompt = ""
        answered = key == "messages" and turns[-1][0] == "assistant" and len(turns) > 1
        if answered:  # an SFT chat read as a prompt (data.format: prompt): its last answer is the reference column
            if record.get("reference") is not None:
                raise DataError(f"{where}: the chat ends with an answer, which would be its 'reference' column, but "
                                "the record has a 'reference' already; remove one of them")
            record = {**record, "reference": turns[-1][1]}
            turns = turns[:-1]
        if turns[-1][0] != "user":
            raise DataError(f"{where}: a prompt's messages must end with the user's turn (the model answers it); "
                            f"the last one is a {turns[-1][0]} turn")
    columns = tuple((k, v) for k, v in record.items() if k not in PROMPT_KEYS and v is not None)
    return Example("prompt", where, messages=turns, prompt=prompt, columns=columns)


def _prompt(record: dict[str, Any], where: str, fmt: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A pair's prompt: a string, or (TRL's conversational format) the messages before the answer."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt, ()
    if isinstance(prompt, list):
        turns, _ = _messages({"prompt": prompt}, where, need_assistant=False, key="prompt")
        if turns[-1][0] == "assistant":
            raise DataError(f"{where}: the prompt's last message is an assistant turn; it should end with the user's "
                            "turn (the answers are in 'chosen'/'rejected' or 'completion')")
        return "", turns
    got = "missing" if prompt is None else f"a {type(prompt).__name__}"
    raise DataError(f"{where}: 'prompt' is {got}; expected a string or a list of {{role, content}} messages. "
                    f"{expected_shape(fmt)}")


def _answer(record: dict[str, Any], key: str, where: str, conversational: bool) -> str:
    """An answer's text: a string after a string prompt, a list holding one assistant message after a message list
    (TRL's conversational format)."""
    value = record.get(key)
    if not conversational:
        if not isinstance(value, str):
            got = "missing" if value is None else f"a {type(value).__name__}"
            raise DataError(f"{where}: '{key}' is {got}; after a string prompt it must be a string")
        return value
    shape = '[{"role": "assistant", "content": str}]'
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)):
        raise DataError(f"{where}: '{key}' must be a list with one assistant message, {shape}, after a prompt of "
                        f"messages; got {json.dumps(value, ensure_ascii=False)[:80]}")
    role, content = value[0].get("role"), value[0].get("content")
    if role != "assistant" or not isinstance(content, str):
        raise DataError(f"{where}: {key}[0] must be an assistant message with string content, {shape}; got role "
                        f"{role!r} and content of type {type(content).__name__}")
    return content


BOOLEAN_TEXT = {"true": True, "false": False, "1": True, "0": False}  # CSV cells are text: how a boolean reads there


def _desirable(record: dict[str, Any], where: str) -> bool:
    label = record.get("label")
    if isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lower() in BOOLEAN_TEXT:
        return BOOLEAN_TEXT[label.strip().lower()]
    raise DataError(f"{where}: 'label' is {label!r}; an unpaired completion's label says whether it is desirable: "
                    "true or false")


def _class_label(record: dict[str, Any], where: str) -> str:
    """A class label as its name: a string, or an integer (kept as its decimal text, so '2' sorts before '10')."""
    label = record.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if isinstance(label, str) and label.strip():
        return label
    got = "blank" if isinstance(label, str) else f"{label!r}"
    raise DataError(f"{where}: 'label' is {got}; expected a class name (a non-empty string) or an integer class")


def load_file(path: str | Path, fmt: str = "auto", columns: dict[str, str] | None = None,
              prompts: bool = False) -> LoadedFile:
    """Read a file and check every record against one format ('auto': the first record's), after renaming its
    keys with ``columns`` ({file key: canonical key}, the config's data.columns). ``prompts``: the run reads
    prompt records, so 'auto' takes a record with a prompt and no answer as one (see ``detect_format``)."""
    if not str(path).strip():  # Path("") is ".", which would be reported as the current directory
        raise DataError(f"the data file path is empty: {GIVE_A_DATA_FILE}")
    path = Path(path)
    records, lines = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    column_word = "column" if path.suffix.lower() in (".csv", ".parquet") else "key"
    columns = columns or {}
    if columns:
        _check_mapped_columns(path, records, columns, column_word)
        records = [rename_columns(r, columns, record_location(path, row, lines)) for row, r in enumerate(records)]
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(records[0], prompts) or ""
        if not fmt:
            raise DataError(_unknown_format_message(records[0], record_location(path, 0, lines), column_word))
    loaded = LoadedFile(path, fmt)
    for row, record in enumerate(records):
        loaded.examples.append(to_example(record, fmt, record_location(path, row, lines), detected))
    return loaded
