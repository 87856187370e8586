"""Labeled records for sequence classification: a text (or a chat) and its class.

The class names come from the data: sorted (integers in numeric order, so '2' comes before '10'), or in the order
a caller gives them (the classification objective's ``labels``), and a record's ``label_id`` indexes that list.
Past ``max_length`` a text keeps its start. No token takes a language-model loss: every label is IGNORE.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import DataError, Example
from tunelab.data.tokenize import IGNORE, TokenizedExample, WrapsExample, render_chat

NO_LABEL = -1  # label_id before the class list is known
TRUNCATION_RULE = "past data.max_length a text keeps its start"


@dataclass(frozen=True)
class TokenizedLabeled(WrapsExample):
    example: TokenizedExample  # the text's tokens; no token supervised (labels all IGNORE)
    label: str  # the class name, as in the data
    label_id: int = NO_LABEL  # its index in the run's class list (PreparedData.classes)


def class_names(labels: list[str], given: list[str] | None = None) -> list[str]:
    """The class list: ``given`` as is, else the labels seen, sorted (numerically when all are integers)."""
    if given:
        return list(given)
    seen = set(labels)
    if all(name.lstrip("-").isdigit() for name in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def tokenize_labeled(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int,
                     overlong: str = "truncate") -> TokenizedLabeled | None:
    """The record's tokens (a chat through the template, else the text with the tokenizer's special tokens),
    cut to ``max_length`` from the end; None when dropped as overlong."""
    if example.messages:
        text = render_chat(tokenizer, example.messages, add_generation_prompt=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds any BOS it wants
    else:
        ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    truncated = len(ids) > max_length
    if truncated and overlong == "error":
        raise DataError(f"{example.source}: {len(ids)} tokens is longer than data.max_length={max_length}. Raise "
                        "max_length, or set data.overlong to 'truncate' or 'drop'.")
    if truncated and overlong == "drop":
        return None
    ids = ids[:max_length]
    tokenized = TokenizedExample(ids, [IGNORE] * len(ids), example.source, truncated=truncated, task=example.task)
    return TokenizedLabeled(tokenized, str(example.label))


def with_label_ids(records: list[TokenizedLabeled], classes: list[str]) -> list[TokenizedLabeled]:
    index = {name: i for i, name in enumerate(classes)}
    for record in records:
        if record.label not in index:
            raise DataError(f"{record.source}: label {record.label!r} is not one of the classes given "
                            f"({', '.join(classes)})")
    return [replace(r, label_id=index[r.label]) for r in records]


def class_balance(classes: list[str], records: list[TokenizedLabeled]) -> dict[str, dict[str, float]]:
    """Records per class, and each class's share of them."""
    counts = Counter(r.label for r in records)
    total = len(records)
    return {name: {"count": counts[name], "share": round(counts[name] / total, 4) if total else 0.0} for name in classes}
