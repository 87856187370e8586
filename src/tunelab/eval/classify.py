"""Classification by label scoring: each candidate label is put in the answer's place and scored by its
log-likelihood under the model (summed over the label's tokens and its end-of-turn token); the prediction is
the most likely label. No free text is generated or parsed, so the model cannot answer outside the label set,
and the end-of-turn token keeps a label that is a prefix of another ("good" / "good enough") from winning by
being shorter.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import DataError, Example
from tunelab.data.tokenize import tokenize_example
from tunelab.eval.loss import example_losses


def answer_of(example: Example) -> str:
    """The reference: the last assistant turn of a chat, or the completion."""
    if example.messages:
        return example.messages[_last_answer(example)][1]
    return example.completion


def with_answer(example: Example, answer: str) -> Example:
    """The same example with its reference answer replaced by ``answer``."""
    if example.messages:
        last = _last_answer(example)
        return replace(example, messages=example.messages[:last] + (("assistant", answer),) + example.messages[last + 1:])
    return replace(example, completion=answer)


def _last_answer(example: Example) -> int:
    turns = [i for i, (role, _) in enumerate(example.messages) if role == "assistant"]
    if not turns:
        raise DataError(f"{example.source}: no assistant turn to score labels against")
    return turns[-1]


def check_labels(examples: list[Example], labels: list[str]) -> list[int]:
    """Index of each example's reference label; a reference outside the label set is an error at its line."""
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise DataError(f"classification needs at least two distinct labels, got {labels}")
    index = {label: i for i, label in enumerate(labels)}
    truth = []
    for example in examples:
        reference = answer_of(example)
        if reference not in index:
            raise DataError(f"{example.source}: the reference answer {reference!r} is not one of the labels "
                            f"{labels}")
        truth.append(index[reference])
    return truth


def label_log_likelihoods(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                          labels: list[str], pad_id: int, batch_size: int, device: torch.device) -> list[list[float]]:
    """(examples, labels) log-likelihoods. Earlier assistant turns are scored too, but they are the same for
    every label, so they shift all of an example's scores equally and never change the ranking."""
    variants = [tokenize_example(tokenizer, with_answer(e, label)) for e in examples for label in labels]
    losses = [loss for loss, _ in example_losses(model, variants, pad_id, batch_size, device)]
    return [[-x for x in losses[i * len(labels) : (i + 1) * len(labels)]] for i in range(len(examples))]
