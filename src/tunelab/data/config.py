"""The ``data`` section of the run config: which files, their format, and how they become training rows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from tunelab.data.formats import CANONICAL_KEYS
from tunelab.settings import Settings


class DataConfig(Settings):
    train: list[str] = Field(
        default_factory=list,
        description="Training file(s): .jsonl, .json, .csv or .parquet. Relative paths are relative to the config "
        "file, or to the working directory when given with --set.",
    )
    validation: list[str] = Field(
        default_factory=list,
        description="Explicit validation file(s). When empty, a seeded split of `val_size` is taken from `train`.",
    )
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text", "preference", "unpaired_preference",
                    "labeled", "prompt"] = Field(
        "auto",
        description="Record shape. 'messages': OpenAI chat {messages: [{role, content, weight?}]}, where an assistant "
        "turn with weight 0 is context only (no loss); 'alpaca': "
        "{instruction, input?, output, system?}; 'prompt_completion': {prompt, completion}; 'text': {text} for "
        "continued pre-training; 'preference': {prompt, chosen, rejected} pairs; 'unpaired_preference': {prompt, "
        "completion, label: true|false}; 'labeled': {text, label} or {messages, label} for classification; 'prompt': {prompt} or {messages} ending in a user turn, for online "
        "objectives (grpo), any other key a reference column the rewards read (given explicitly, 'prompt' also reads a chat "
        "ending in an answer: the turns before it are the prompt, the answer its 'reference' column). A pair's "
        "prompt may be a list of messages, its answers then lists holding one assistant message (TRL's "
        "conversational format). 'auto' detects it from the first record and checks every record against it. Any "
        "format may add a 'task' name (multi-task data: counted per task, validation split stratified by task).",
    )
    val_size: float = Field(
        0.05, ge=0, description="Validation split taken from `train` when `validation` is empty: a fraction (<1) or a whole count of records."
    )
    max_length: int = Field(1024, gt=8, description="Maximum tokens per example (and per packed row).")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with examples longer than `max_length`: cut the end, drop them, or stop."
    )
    train_on_prompt: bool = Field(
        False,
        description="Also take the loss on system/user/prompt tokens. By default only assistant turns (all of them) "
        "and completions are supervised, each with its end-of-turn token.",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template that replaces the tokenizer's. When None, the tokenizer's own template is "
        "used; a tokenizer without one gets tunelab's documented ChatML fallback (roles in <|im_start|>...\\n, each "
        "turn closed by the EOS token), and that choice is logged and saved with the run's tokenizer.",
    )
    packing: bool = Field(
        True,
        description="Pack several examples per row without padding. Position ids restart for each example and no "
        "example attends to another. When off, batches are grouped by length to limit padding.",
    )
    prompt_completion: Literal["auto", "chat", "raw"] = Field(
        "auto",
        description="How prompt_completion records are rendered. 'chat': through the tokenizer's chat template, the "
        "prompt as the user turn and the completion as the assistant turn (what a chat model sees at inference); "
        "'raw': prompt and completion as plain text laid end to end, with no separator added. 'auto': 'chat' when "
        "the tokenizer has a chat template (or data.chat_template is set), else 'raw'. The data report says which.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename keys (JSON) or columns (CSV, Parquet) of the data files to the canonical ones, as "
        "{file name: canonical name}, e.g. {question: prompt, response: completion}. Canonical names: "
        "messages, instruction, input, output, system, prompt, completion, text, task, chosen, rejected, label.",
    )
    dedup: bool = Field(True, description="Drop exact duplicate records and train records that also appear in "
                        "validation. When off, such overlap is kept but still counted and warned about.")
    cache: bool = Field(True, description="Cache tokenized data by content hash so a second run does not tokenize again.")
    seed: int = Field(0, description="Seed of the train/validation split.")

    @model_validator(mode="before")
    @classmethod
    def _single_path_to_list(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("train", "validation"):
                if isinstance(values.get(key), str):
                    values[key] = [values[key]]
        return values

    @field_validator("train", "validation")
    @classmethod
    def _paths_not_empty(cls, paths: list[str]) -> list[str]:
        # An empty path would resolve to the config's folder and fail later as a confusing "not a file".
        if any(not p.strip() for p in paths):
            raise ValueError("empty path: give a data file")
        return paths

    @field_validator("val_size")
    @classmethod
    def _a_count_or_a_fraction(cls, value: float) -> float:
        """A count (1 or more) is a whole number of records, held as an int: 32.0 (YAML, --set) is the count 32 and
        is echoed as 32. A count such as 2.5 was cut to 2 without a word: refused instead."""
        if 0 < value < 1:
            return value  # a fraction of the train records
        if value != int(value):
            raise ValueError("expected a fraction below 1 or a whole count of records")
        return int(value)

    @field_serializer("val_size")
    def _count_kept_whole(self, value: float) -> int | float:
        # as a float (this field's type) pydantic would write the count as 32.0 in config.yaml and `config show`
        return value

    @field_validator("columns")
    @classmethod
    def _columns_map_to_canonical_names(cls, columns: dict[str, str]) -> dict[str, str]:
        for source, target in columns.items():
            if not source.strip():
                raise ValueError("an empty column name: give the name used in the data file")
            if target not in CANONICAL_KEYS:
                raise ValueError(f"'{source}' is mapped to '{target}', which is not a canonical name; expected one of "
                                 f"{', '.join(CANONICAL_KEYS)}")
        targets = list(columns.values())
        doubled = sorted({t for t in targets if targets.count(t) > 1})
        if doubled:
            raise ValueError(f"several columns are mapped to {', '.join(repr(t) for t in doubled)}; map one column to each name")
        return columns

    @field_validator("chat_template")
    @classmethod
    def _template_is_jinja(cls, template: str | None) -> str | None:
        # The field holds the template text itself; a name such as 'chatml' would render as that literal word.
        if template is not None and "{{" not in template and "{%" not in template:
            raise ValueError("expected the Jinja template text itself (with {{ ... }} or {% ... %}), not a name")
        return template
