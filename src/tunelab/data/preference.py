"""Tokenizing preference pairs and unpaired completions: prompt ids, then each answer's ids, the answer supervised.

The prompt and each answer are tokenized apart (as TRL does): a pair's two sides share the prompt's ids exactly,
so their log-probabilities differ only by the answers. A conversational prompt (or, with a chat template, a
string prompt as the user turn) is rendered with the generation prompt; an answer is what the template adds for
the assistant turn after it, end-of-turn marker included. A plain-text answer ends with EOS.

Past ``max_length`` a side is cut so that what decides the preference survives: the prompt keeps its END (the
question asked last) and each answer keeps its START (the first tokens are where two answers part ways). The
prompt gives up tokens first, down to half of ``max_length``; then the answers are cut to what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import DataError, Example
from tunelab.data.pairs import TokenizedCompletion, TokenizedPair
from tunelab.data.tokenize import IGNORE, TokenizedExample, render_chat

TRUNCATION_RULE = ("past data.max_length the prompt keeps its end and each answer keeps its start (the prompt is cut "
                   "first, down to half of max_length)")


@dataclass(frozen=True)
class SideLengths:
    """Token counts of one record after truncation, for the data report."""

    prompt: int
    answers: tuple[int, ...]  # (chosen, rejected) of a pair, (completion,) of an unpaired record
    truncated: bool


def _answer_text(tokenizer: PreTrainedTokenizerBase, example: Example, prompt_text: str, answer: str) -> str:
    """What the chat template adds after the prompt for this assistant answer (its end-of-turn marker included)."""
    full = render_chat(tokenizer, example.messages + (("assistant", answer),), add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise DataError(f"{example.source}: the chat template renders the prompt differently once an answer follows, "
                        "so the answer's tokens cannot be located. Set data.chat_template to a template without "
                        "history rewriting.")
    return full[len(prompt_text):].rstrip()  # trailing whitespace after the end-of-turn marker is no part of it


def prompt_and_answer_ids(tokenizer: PreTrainedTokenizerBase, example: Example,
                          answers: tuple[str, ...]) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each answer's, untruncated."""
    if example.messages:  # conversational, or a string prompt rendered as the user turn (prepare_data decides)
        prompt_text = render_chat(tokenizer, example.messages, add_generation_prompt=True)
        # The template already holds any BOS it wants; adding special tokens again would double it.
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        texts = [_answer_text(tokenizer, example, prompt_text, answer) for answer in answers]
        return list(prompt_ids), [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    answer_ids = []
    for answer in answers:
        ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        answer_ids.append(ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id])
    return prompt_ids, answer_ids


def fit_to_length(prompt: list[int], answers: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut prompt + longest answer to ``max_length``: the prompt keeps its end, each answer its start."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= max_length:
        return prompt, answers, False
    kept_prompt = min(len(prompt), max(max_length - longest, max_length // 2))
    room = max_length - kept_prompt
    return prompt[len(prompt) - kept_prompt:], [a[:room] for a in answers], True


def _side(prompt: list[int], answer: list[int], example: Example, truncated: bool) -> TokenizedExample:
    labels = [IGNORE] * len(prompt) + list(answer)
    if labels:  # no position predicts the first token (an empty prompt's first answer token takes no loss)
        labels[0] = IGNORE
    return TokenizedExample(prompt + answer, labels, example.source, truncated=truncated, task=example.task)


def _fitted(tokenizer: PreTrainedTokenizerBase, example: Example, answers: tuple[str, ...], max_length: int,
            overlong: str) -> tuple[list[int], list[list[int]], bool] | None:
    prompt, answer_ids = prompt_and_answer_ids(tokenizer, example, answers)
    longest = len(prompt) + max(len(a) for a in answer_ids)
    if longest > max_length and overlong == "error":
        raise DataError(f"{example.source}: prompt + answer is {longest} tokens, longer than data.max_length="
                        f"{max_length}. Raise max_length, or set data.overlong to 'truncate' or 'drop'.")
    if longest > max_length and overlong == "drop":
        return None
    return fit_to_length(prompt, answer_ids, max_length)


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int,
                  overlong: str = "truncate") -> tuple[TokenizedPair, SideLengths] | None:
    """A {prompt, chosen, rejected} record as two sides sharing the prompt's ids; None when dropped as overlong."""
    fitted = _fitted(tokenizer, example, (example.chosen, example.rejected), max_length, overlong)
    if fitted is None:
        return None
    prompt, (chosen, rejected), truncated = fitted
    pair = TokenizedPair(_side(prompt, chosen, example, truncated), _side(prompt, rejected, example, truncated))
    return pair, SideLengths(len(prompt), (len(chosen), len(rejected)), truncated)


def tokenize_unpaired(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int,
                      overlong: str = "truncate") -> tuple[TokenizedCompletion, SideLengths] | None:
    """A {prompt, completion, label} record: one side, and whether its completion is desirable."""
    fitted = _fitted(tokenizer, example, (example.completion,), max_length, overlong)
    if fitted is None:
        return None
    prompt, (completion,), truncated = fitted
    record = TokenizedCompletion(_side(prompt, completion, example, truncated), bool(example.label))
    return record, SideLengths(len(prompt), (len(completion),), truncated)
