"""Toy preference data built in tests: tokenized pairs and KTO completions on the tiny tokenizer, and a learnable
toy preference ('say cat 3' prefers 'cat cat cat' over another animal)."""

from __future__ import annotations

from typing import Any

from support.tiny import ANIMALS

from tunelab.data import Example, tokenize_example
from tunelab.data.pairs import TokenizedCompletion, TokenizedPair


def side(tokenizer: Any, prompt: str, answer: str, source: str) -> Any:
    """prompt + answer as raw text, the answer (and EOS) supervised."""
    return tokenize_example(tokenizer, Example("prompt_completion", source, prompt=prompt, completion=answer))


def pair(tokenizer: Any, prompt: str, chosen: str, rejected: str, source: str = "test:1") -> TokenizedPair:
    return TokenizedPair(side(tokenizer, prompt, chosen, source), side(tokenizer, prompt, rejected, source))


def toy_pair_texts(start: int, n: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): repeat the animal asked for, not the next one; answers of uneven length."""
    out = []
    for i in range(start, start + n):
        animal, other = ANIMALS[i % len(ANIMALS)], ANIMALS[(i + 1) % len(ANIMALS)]
        repeat = 1 + i % 3
        out.append((f"say {animal} {i}: ", " ".join([animal] * repeat), " ".join([other] * (4 - repeat))))
    return out


def toy_pairs(tokenizer: Any, start: int = 0, n: int = 12) -> list[TokenizedPair]:
    return [pair(tokenizer, p, c, r, f"toy:{start + k + 1}") for k, (p, c, r) in enumerate(toy_pair_texts(start, n))]


def toy_completions(tokenizer: Any, start: int = 0, n: int = 12) -> list[TokenizedCompletion]:
    """Unpaired KTO records from the toy pairs: even ones keep the chosen answer (desirable), odd ones the rejected."""
    out = []
    for k, (prompt, chosen, rejected) in enumerate(toy_pair_texts(start, n)):
        good = k % 2 == 0
        out.append(TokenizedCompletion(side(tokenizer, prompt, chosen if good else rejected, f"toy:{k + 1}"), good))
    return out
