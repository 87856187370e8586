"""A toy verifiable task for online objectives on the tiny model: prompts, and a reward the untrained policy
earns only sometimes (a completion starting with a vowel), so GRPO has something to learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.tiny import ANIMALS, write_jsonl

VOWELS = "aeiou"


def toy_prompt_records(n: int = 24) -> list[dict[str, Any]]:
    return [{"prompt": f"say {ANIMALS[i % len(ANIMALS)]} {i}", "reference": ANIMALS[i % len(ANIMALS)]} for i in range(n)]


def toy_prompts_file(tmp_path: Path, n: int = 24) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", toy_prompt_records(n))


def starts_with_a_vowel(prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
    """1 when the completion's first non-blank character is a vowel (about a fifth of the untrained policy's)."""
    return [float(c.strip()[:1].lower() in VOWELS and c.strip() != "") for c in completions]


def constant(prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
    return [1.0] * len(completions)


# oneDNN's cache variables (its name and the older one) and the marker `tunelab train` sets beside them
ONEDNN_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "TUNELAB_BOUNDED_ONEDNN_CACHE")


def without_onednn_bound(monkeypatch: Any) -> None:
    """Start the test with none of ``ONEDNN_VARIABLES`` set, and take back whatever the code under test sets in
    them (pytest's delenv records nothing for a variable that is absent, so each is set first)."""
    for name in ONEDNN_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
