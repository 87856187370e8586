"""A separable labeled toy set and a tiny classification run config, shared by the classification tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.runs import TINY_RUN, tiny_config
from support.tiny import ANIMALS, write_jsonl

CLASSES = ANIMALS[:3]  # cat, dog, fox: the class is the animal the text names, so the set is separable


def toy_labeled(n: int = 48) -> list[dict[str, str]]:
    verbs = ["jumps over the lazy", "is quick and brown", "says hello to the", "counts from one to five"]
    return [{"text": f"the {CLASSES[i % 3]} {verbs[(i // 3) % 4]} {ANIMALS[3 + i % 3]} {i}", "label": CLASSES[i % 3]}
            for i in range(n)]


def classification_config(model_dir: Path, tmp_path: Path, name: str = "run", **sections: dict[str, Any]):  # noqa: ANN201
    data = write_jsonl(tmp_path / "labeled.jsonl", toy_labeled())
    merged: dict[str, dict[str, Any]] = {
        "objective": {"name": "classification"}, "data": {"train": [str(data)], **TINY_RUN["data"], "packing": False},
        "technique": TINY_RUN["technique"], "training": TINY_RUN["training"],
        "eval": {"num_samples": 0, "before_after": False}, "output": {"dir": str(tmp_path / name)}}
    for section, values in sections.items():
        merged[section] = values if section == "technique" else {**merged[section], **values}
    return tiny_config(model_dir, **merged)
