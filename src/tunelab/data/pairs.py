"""Tokenized records of the preference objectives: a pair (one prompt, a chosen and a rejected answer) and an
unpaired completion with a desirable/undesirable label (KTO).

Each side is a ``TokenizedExample`` of prompt + answer whose labels supervise the answer only (the prompt is
IGNORE), so a side's log-probability is the sum over its supervised tokens, exactly as SFT's loss sees them. A
pair is one row of a batch and is never packed with another example: its two sides are scored side by side.
``reference`` holds the reference policy's log-probs of the two sides when they were computed once before
training (``objective.reference: precomputed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.tokenize import TokenizedExample, WrapsExample


@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedExample
    rejected: TokenizedExample
    reference: tuple[float, float] | None = None  # (chosen, rejected) summed log-probs under the reference policy

    @property
    def input_ids(self) -> list[int]:
        """Both sides' tokens: what the plan counts (lengths, tokens seen) for a pair."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def source(self) -> str:
        return self.chosen.source


@dataclass(frozen=True)
class TokenizedCompletion(WrapsExample):
    example: TokenizedExample  # prompt + completion, the completion supervised
    desirable: bool  # KTO's label: a good (True) or a bad (False) completion for its prompt
    reference: tuple[float, float] | None = None  # (completion, mismatched completion) log-probs, see objectives.kto
