"""Precision: mixed precision trains float32 master weights (small updates survive), a CPU without native bfloat16
trains in float32 and says why, and float16 on a CPU is refused before anything is written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.runs import tiny_config
from support.tiny import toy_chat_records, write_jsonl
from transformers import AutoModelForCausalLM

from tunelab import precision
from tunelab.config import ConfigError
from tunelab.training import train

CPU = torch.device("cpu")


def _config(model_dir: Path, tmp_path: Path, dtype: str, **technique: Any):
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(16))
    return tiny_config(
        model_dir, model={"dtype": dtype},
        data={"train": [str(data)], "val_size": 0, "max_length": 64},
        technique=technique or {"name": "lora", "r": 4},
        training={"max_steps": 1, "micro_batch_size": 2, "learning_rate": 1e-5, "schedule": "constant",
                  "warmup_ratio": 0.0, "max_grad_norm": None},
        eval={"before_after": False},
        output={"dir": str(tmp_path / "run")},
    )


def test_precision_rules_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    assert precision.training_precision("bfloat16", CPU) == precision.Precision(torch.float32, "no",
                                                                                precision.CPU_BF16_FALLBACK)
    assert precision.training_precision("auto", CPU) == precision.Precision(torch.float32, "no")
    assert precision.training_precision("float32", CPU) == precision.Precision(torch.float32, "no")
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
    assert precision.training_precision("bfloat16", CPU) == precision.Precision(torch.bfloat16, "bf16")
    with pytest.raises(ConfigError, match="float16 cannot train on a CPU"):
        precision.training_precision("float16", CPU)


def test_bfloat16_on_a_cpu_without_native_bf16_trains_in_float32_and_says_why(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        run = train(_config(tiny_model_dir, tmp_path, "bfloat16"), progress=False)
    assert run.status == "completed"
    assert any(r.getMessage() == precision.CPU_BF16_FALLBACK for r in caplog.records), "the reason must be logged"
    weights = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_float16_on_a_cpu_is_refused_before_anything_is_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="float16 cannot train on a CPU: float16 needs loss scaling"):
        train(_config(tiny_model_dir, tmp_path, "float16"), progress=False)
    assert not (tmp_path / "run").exists()


def test_mixed_precision_keeps_float32_master_weights(tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One AdamW step moves every weight by about the learning rate (1e-5). Weights of size ~0.1 are spaced
    ~5e-4 apart in bfloat16, so bfloat16 master weights would drop ~98% of the updates; float32 keeps them."""
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)  # bf16 autocast on this CPU (emulated: slow)
    run = train(_config(tiny_model_dir, tmp_path, "bfloat16", name="full"), progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    trained = load_file(str(run.run_dir / "model" / "model.safetensors"))
    changed = total = 0
    for name, value in trained.items():
        assert value.dtype == torch.float32, f"{name}: master weights must be float32"
        changed += int((value != base[name].float()).sum())  # unused embedding rows (20%) get no gradient
        total += value.numel()
    assert changed / total > 0.7, f"only {changed / total:.1%} of the weights moved: small updates were lost"
