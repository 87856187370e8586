"""The forgetting check: loss on general held-out text before and after training.

Fine-tuning on a narrow task can erase general ability ("catastrophic forgetting"; Kirkpatrick et al. 2017,
"Overcoming catastrophic forgetting in neural networks"). The cheapest sign of it is a rise of the loss on
ordinary text that is in no training set. tunelab ships such text (``assets/heldout_text``: public-domain
prose, see its README and LICENSE) and scores the first ``max_tokens`` tokens of it with the untouched model
and with the fine-tuned one; a relative rise above the threshold flags the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import DataError, Example
from tunelab.data.tokenize import TokenizedExample, pad_token_id, tokenize_example
from tunelab.eval.loss import example_losses, loss_summary

HELDOUT_TEXT = Path(__file__).resolve().parent.parent / "assets" / "heldout_text" / "alice.txt"


def heldout_paragraphs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(source, paragraph) pairs of a plain-text file whose paragraphs are separated by blank lines."""
    path = Path(path) if path is not None else HELDOUT_TEXT
    if not path.is_file():
        raise DataError(f"eval.forgetting_text {path}: no such file (expected plain text, paragraphs separated by "
                        "blank lines)")
    paragraphs, line, start = [], 0, 1
    block: list[str] = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], start=1):
        if text.strip():
            if not block:
                start = line
            block.append(text.strip())
        elif block:
            paragraphs.append((f"{path}:{start}", " ".join(block)))
            block = []
    if not paragraphs:
        raise DataError(f"eval.forgetting_text {path}: no text")
    return paragraphs


def heldout_examples(tokenizer: PreTrainedTokenizerBase, max_tokens: int, path: str | Path | None = None,
                     ) -> list[TokenizedExample]:
    """Whole paragraphs (every token supervised, as continued pre-training scores text) up to ``max_tokens``
    tokens in all; the last one is cut to fit."""
    examples, used = [], 0
    for source, paragraph in heldout_paragraphs(path):
        tokenized = tokenize_example(tokenizer, Example("text", source, completion=paragraph))
        room = max_tokens - used
        if room < 8:  # a few tokens carry no signal about the text
            break
        if len(tokenized.input_ids) > room:
            tokenized = TokenizedExample(tokenized.input_ids[:room], tokenized.labels[:room], source, truncated=True)
        examples.append(tokenized)
        used += len(tokenized.input_ids)
    return examples


@torch.no_grad()
def heldout_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_tokens: int, device: torch.device,
                 path: str | Path | None = None, batch_size: int = 4) -> dict[str, float]:
    """Token-weighted loss and perplexity of ``model`` on the held-out text."""
    examples = heldout_examples(tokenizer, max_tokens, path)
    pad_id = pad_token_id(tokenizer)
    total, tokens = 0.0, 0
    for loss_sum, count in example_losses(model, examples, pad_id, batch_size, device):
        total, tokens = total + loss_sum, tokens + count
    return loss_summary(total, tokens)


def forgetting_check(base: dict[str, float], tuned: dict[str, float], threshold: float,
                     text: str | Path | None = None) -> dict[str, Any]:
    """Compare held-out loss before and after; ``flagged`` when it rose by more than ``threshold`` (relative)."""
    rise = (tuned["loss"] - base["loss"]) / base["loss"] if base["loss"] else 0.0
    return {"text": str(text or HELDOUT_TEXT.name), "tokens": tuned["tokens"], "base_loss": base["loss"],
            "tuned_loss": tuned["loss"], "base_perplexity": base["perplexity"],
            "tuned_perplexity": tuned["perplexity"], "relative_change": round(rise, 6), "threshold": threshold,
            "flagged": rise > threshold}


def forgetting_message(check: dict[str, Any]) -> str:
    return (f"forgetting check: loss on general held-out text rose {check['relative_change']:+.1%} "
            f"({check['base_loss']:.4f} -> {check['tuned_loss']:.4f}), past the {check['threshold']:.0%} threshold: "
            "the model may have lost general ability (lower the learning rate or the step count, or use a "
            "parameter-efficient technique)")
