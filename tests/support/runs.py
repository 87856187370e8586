"""Configs on the tiny model: any sections (`tiny_config`), or the tiny run most training tests start from
(`tiny_run_config`); and reading what a run saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from support.tiny import toy_chat_records, write_jsonl
from tunelab import checkpoint as ckpt
from tunelab.config import build_config


def tiny_config_dict(model_dir: Path, model: dict[str, Any] | None = None,
                     **sections: dict[str, Any]) -> dict[str, Any]:
    """A config mapping for the tiny model at `model_dir` (plus any `model` settings) with exactly `sections`:
    what a YAML file would hold (the torchrun tests write it, or pass it as JSON)."""
    return {"model": {"name": str(model_dir), **(model or {})}, **sections}


def tiny_config(model_dir: Path, model: dict[str, Any] | None = None, **sections: dict[str, Any]):  # noqa: ANN201
    """`tiny_config_dict` validated: a TunelabConfig with the defaults for every section not given."""
    return build_config(tiny_config_dict(model_dir, model, **sections))


# 10 LoRA steps of 2 x 2 toy examples with dropout on, one short sample before and after.
TINY_RUN: dict[str, dict[str, Any]] = {
    "data": {"val_size": 8, "max_length": 64},
    "technique": {"name": "lora", "r": 4, "dropout": 0.1},
    "training": {"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2, "learning_rate": 3e-3},
    "eval": {"num_samples": 1, "max_new_tokens": 4},
}


def tiny_run_config(model_dir: Path, tmp_path: Path, data: Path | None = None, **sections: dict[str, Any]):  # noqa: ANN201
    """The tiny run on `model_dir`, training on `data` (48 toy records written under `tmp_path` when None) into
    `tmp_path/run`. Each of `sections` is merged over the tiny run's section, except `technique`, which replaces
    it (its keys depend on the technique's name)."""
    data = data or write_jsonl(tmp_path / "train.jsonl", toy_chat_records(48))
    base: dict[str, Any] = {
        "data": {"train": [str(data)], **TINY_RUN["data"]},
        "technique": TINY_RUN["technique"],
        "training": TINY_RUN["training"],
        "eval": TINY_RUN["eval"],
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        base[section] = values if section == "technique" else {**base.get(section, {}), **values}
    model = base.pop("model", None)
    return tiny_config(model_dir, model, **base)  # build_config deep-copies: TINY_RUN is never edited


def checkpoint_tensors(run_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, optimizer state) of the run's checkpoint at `step`."""
    path = run_dir / "checkpoints" / ckpt.checkpoint_name(step)
    return load_file(str(path / "trainable.safetensors")), torch.load(path / "optimizer.pt", weights_only=True)
