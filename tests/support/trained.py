"""Tiny LoRA runs trained once per test session and shared by the generate/chat, serve and export tests.

Three adapters on the same tiny base, each taught a different answer, so that outputs differ per adapter and
a mixed batch that used the wrong adapter for a row would be caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.runs import tiny_config
from support.tiny import write_jsonl

_CACHE: dict[str, dict[str, Path]] = {}
ANSWERS = {"cats": "cat", "dogs": "dog", "owls": "owl"}


def answer_records(word: str, n: int = 32) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"say something {i}"},
                          {"role": "assistant", "content": f"{word} {word} {word}"}]} for i in range(n)]


def adapter_runs(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> dict[str, Path]:
    """{run name: run folder} for three LoRA runs on ``base_dir``; trained on first use only."""
    key = str(base_dir)
    if key not in _CACHE:
        from tunelab.training import train

        root = tmp_path_factory.mktemp("adapter-runs")
        runs = {}
        for name, word in ANSWERS.items():
            data = write_jsonl(root / f"{name}.jsonl", answer_records(word))
            config = tiny_config(
                base_dir,
                data={"train": [str(data)], "val_size": 4, "max_length": 48},
                technique={"name": "lora", "r": 4, "dropout": 0.0},
                training={"max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-2},
                eval={"num_samples": 1, "max_new_tokens": 4},
                output={"dir": str(root / "runs" / name)},
            )
            runs[name] = train(config, progress=False).run_dir
        _CACHE[key] = runs
    return _CACHE[key]
