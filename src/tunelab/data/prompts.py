"""Tokenizing prompt records, the data of online objectives (GRPO, PPO): the prompt's ids alone, to be continued by
the policy during training, and the record's other fields (its reference columns) for the rewards.

A string prompt is rendered through the chat template as the user's turn when there is one (as a prompt/completion
record is, ``data.prompt_completion``); a conversation ending in the user's turn is rendered with the assistant's
turn opened. Past ``data.max_length`` the prompt keeps its END (the question asked last); the completions are
generated on top, up to the objective's ``max_completion_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import DataError, Example
from tunelab.data.tokenize import IGNORE, TokenizedExample, WrapsExample, render_chat

TRUNCATION_RULE = "past data.max_length a prompt keeps its end (the completions are generated on top)"


@dataclass(frozen=True)
class TokenizedPrompt(WrapsExample):
    example: TokenizedExample  # the prompt's ids, nothing supervised (IGNORE labels): what the plan lays out
    prompt: Any  # as the record gave it, for reward functions: a string, or a list of {role, content} messages
    columns: Mapping[str, Any]  # the record's reference columns ({name: value}), passed to reward functions


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """The prompt's token ids, untruncated: rendered by the chat template (its BOS included) when it is a
    conversation, else the plain text with the tokenizer's own special tokens."""
    if example.messages:
        text = render_chat(tokenizer, example.messages, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int,
                    overlong: str = "truncate") -> TokenizedPrompt | None:
    """A prompt record as its ids (the end kept past ``max_length``) and its columns; None when dropped."""
    ids = prompt_ids(tokenizer, example)
    if not ids:
        raise DataError(f"{example.source}: the prompt is empty, so there is nothing to continue")
    truncated = len(ids) > max_length
    if truncated and overlong == "error":
        raise DataError(f"{example.source}: the prompt is {len(ids)} tokens, longer than data.max_length={max_length}. "
                        "Raise max_length, or set data.overlong to 'truncate' or 'drop'.")
    if truncated and overlong == "drop":
        return None
    ids = ids[len(ids) - max_length:] if truncated else ids
    given = example.prompt if example.prompt or not example.messages else \
        [{"role": role, "content": content} for role, content in example.messages]
    tokenized = TokenizedExample(ids, [IGNORE] * len(ids), example.source, truncated=truncated, task=example.task)
    return TokenizedPrompt(tokenized, given, dict(example.columns))


def prompt_counts(examples: list[Example], records: list[TokenizedPrompt]) -> dict[str, Any]:
    """Prompts: how many, their reference columns (and how many records lack each), empty prompts, truncation."""
    names = list(dict.fromkeys(name for e in examples for name, _ in e.columns))
    return {
        "count": len(records),
        "columns": {name: {"missing": sum(name not in dict(e.columns) for e in examples)} for name in names},
        "empty_prompts": sum(not (e.prompt.strip() or e.messages) for e in examples),
        "truncated": sum(r.example.truncated for r in records),
        "truncation": TRUNCATION_RULE,
    }
