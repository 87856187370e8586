"""Precision: mixed precision trains float32 master weights (small updates survive), a CPU without native bfloat16
trains in float32 and says why, ``auto`` picks bfloat16 autocast only where the CPU has it natively (detected from
/proc/cpuinfo, frozen weights then stored in bfloat16, the loss in float32), and float16 on a CPU is refused before
anything is written."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
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
from tunelab.training import loop, train

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


NATIVE = precision.CpuBf16(True, "test: native")
EMULATED = precision.CpuBf16(False, "test: emulated")
FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\nbugs\t\t: spectre_v1\n"


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert precision.cpu_bf16_from_cpuinfo(FLAGS.format("avx512_bf16 avx512_vnni")).native
    assert precision.cpu_bf16_from_cpuinfo(FLAGS.format("amx_tile amx_bf16")).native
    without = precision.cpu_bf16_from_cpuinfo(FLAGS.format("avx512_vnni avx512_fp16"))
    assert without is not None and not without.native and "emulated" in without.reason
    assert precision.cpu_bf16_from_cpuinfo("Features\t: fp asimd bf16\n") is None  # no x86 flags: oneDNN decides


DETECT = precision.detect_cpu_bf16  # the real detector, taken at import (the suite's fixture replaces it later)


def test_tunelab_cpu_bf16_overrides_the_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """TUNELAB_CPU_BF16 decides over the CPU flags (the suite sets 0, so its torchrun and CLI processes train in
    float32 on every host); any value but 0 or 1 is an error naming the variable."""
    for value, native in (("0", False), ("1", True)):
        monkeypatch.setenv(precision.CPU_BF16_ENV, value)
        found = DETECT.__wrapped__()
        assert found.native is native and precision.CPU_BF16_ENV in found.reason
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="TUNELAB_CPU_BF16"):
        DETECT.__wrapped__()
    monkeypatch.delenv(precision.CPU_BF16_ENV)
    assert precision.CPU_BF16_ENV not in DETECT.__wrapped__().reason  # unset: the flags decide


def test_precision_rules_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: EMULATED)
    assert precision.training_precision("bfloat16", CPU) == precision.Precision(torch.float32, "no",
                                                                                precision.CPU_BF16_FALLBACK)
    auto = precision.training_precision("auto", CPU)
    assert auto == precision.Precision(torch.float32, "no") and "test: emulated" in auto.reason
    assert precision.training_precision("float32", CPU) == precision.Precision(torch.float32, "no")
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: NATIVE)
    assert precision.training_precision("bfloat16", CPU) == precision.Precision(torch.bfloat16, "bf16")
    auto = precision.training_precision("auto", CPU)
    assert auto == precision.Precision(torch.bfloat16, "bf16") and "test: native" in auto.reason
    quantized = precision.training_precision("auto", CPU, fixed_base="4-bit NF4")
    assert quantized == precision.Precision(torch.float32, "no") and "4-bit NF4" in quantized.reason
    assert precision.load_dtype("auto", CPU) == torch.float32  # inference on a CPU stays float32
    with pytest.raises(ConfigError, match="float16 cannot train on a CPU"):
        precision.training_precision("float16", CPU)


def test_a_finished_run_generates_in_bfloat16_on_a_cpu_that_computes_it_natively(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`tunelab serve`, `generate` and `chat` load a run by one rule: --dtype auto follows the run's model.dtype,
    and auto on both is bfloat16 weights on a CPU with native bfloat16 (computed row by row: the loader's part,
    tests/test_invariance.py), float32 on any other; --dtype bfloat16 (or a run's pinned bfloat16) loads bfloat16
    only where native."""
    rule = precision.generation_precision
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: NATIVE)
    chosen = rule("auto", "auto", CPU)
    assert chosen.dtype == "bfloat16" and "test: native" in chosen.reason
    assert rule("bfloat16", "auto", CPU).dtype == "bfloat16" and rule("auto", "bfloat16", CPU).dtype == "bfloat16"
    assert rule("auto", "float32", CPU).dtype == "float32"  # the run pinned float32
    assert rule("float32", "auto", CPU).dtype == "float32" and rule("bfloat16", "float32", CPU).dtype == "bfloat16"
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: EMULATED)
    emulated = rule("auto", "auto", CPU)
    assert emulated.dtype == "float32" and "test: emulated" in emulated.reason
    fallback = rule("bfloat16", "auto", CPU)  # emulated bfloat16 is about 15x slower: float32, and why
    assert fallback.dtype == "float32" and "test: emulated" in fallback.reason
    with pytest.raises(ConfigError, match="--dtype float16"):
        rule("float16", "auto", CPU)


def test_bfloat16_on_a_cpu_without_native_bf16_trains_in_float32_and_says_why(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: EMULATED)
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
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: NATIVE)  # bf16 autocast on this CPU (maybe emulated: slow)
    run = train(_config(tiny_model_dir, tmp_path, "bfloat16", name="full"), progress=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    trained = load_file(str(run.run_dir / "model" / "model.safetensors"))
    changed = total = 0
    for name, value in trained.items():
        assert value.dtype == torch.float32, f"{name}: master weights must be float32"
        changed += int((value != base[name].float()).sum())  # unused embedding rows (20%) get no gradient
        total += value.numel()
    assert changed / total > 0.7, f"only {changed / total:.1%} of the weights moved: small updates were lost"


def test_auto_on_a_native_bf16_cpu_stores_frozen_weights_in_bf16_and_computes_the_loss_in_float32(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: NATIVE)
    seen: dict[str, set] = {"frozen": set(), "trainable": set(), "loss": set(), "adapter input cast": set()}
    accumulate = loop.accumulate_gradients

    def observed(model, window, objective, *args, **kwargs):  # noqa: ANN001, ANN202 - the loop's own signature
        for param in model.parameters():
            seen["trainable" if param.requires_grad else "frozen"].add(param.dtype)
        seen["adapter input cast"].update(m.cast_input_dtype_enabled for m in model.modules()
                                          if hasattr(m, "cast_input_dtype_enabled"))  # PEFT's layers: no fp32 copy
        loss_sum = objective.loss_sum

        def recorded(model, batch):  # noqa: ANN001, ANN202
            result = loss_sum(model, batch)
            seen["loss"].add(result.loss_sum.dtype)
            return result

        return accumulate(model, window, replace(objective, loss_sum=recorded), *args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", observed)
    with caplog.at_level(logging.INFO, logger="tunelab"):
        run = train(_config(tiny_model_dir, tmp_path, "auto"), progress=False)
    assert seen == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}, "loss": {torch.float32},
                    "adapter input cast": {False}}
    recorded = json.loads((run.run_dir / "run_info.json").read_text())["precision"]
    assert recorded["dtype"] == "bfloat16" and recorded["autocast"] == "bf16" and "test: native" in recorded["reason"]
    assert any("test: native" in r.getMessage() for r in caplog.records), "the reason must be logged"


def test_auto_on_a_cpu_without_native_bf16_trains_in_float32_and_says_why(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: EMULATED)
    run = train(_config(tiny_model_dir, tmp_path, "auto"), progress=False)
    recorded = json.loads((run.run_dir / "run_info.json").read_text())["precision"]
    assert recorded == {"dtype": "float32", "autocast": "no", "reason": "model.dtype auto: float32, test: emulated"}
