"""Precision: which dtype the weights are loaded in, and how training keeps small updates.

Mixed precision here means: weights that train are float32 ("master weights"), the forward and backward run
under autocast in bfloat16/float16, and weights that do not train stay in the half-precision dtype they were
loaded in (memory). Training bfloat16 weights directly loses every update smaller than 2^-8 of the weight
(bfloat16 keeps 8 bits of mantissa), which at a learning rate of 1e-5 is most of them; float16 weights cannot be
trained at all without loss scaling, and a gradient scaler refuses float16 gradients.

- ``auto``: bfloat16 on a GPU that supports it. For training on a CPU: bfloat16 autocast (frozen weights stored in
  bfloat16, trainable ones float32) when the CPU computes bfloat16 natively (AMX or AVX512-BF16, read from
  /proc/cpuinfo, else oneDNN's check), float32 otherwise; the run's log and run_info.json say which and why.
  A bfloat16 matmul there takes about 0.43x the float32 time. Generation from a finished run (serve, generate,
  chat: ``generation_precision``) loads the weights in bfloat16 on such a CPU too, computed row by row
  (``invariance``); other inference stays float32.
- ``bfloat16``: on a CPU without native bfloat16 (no AVX512-BF16/AMX), bfloat16 is emulated and about 15x slower
  than float32, so float32 is used instead and the reason logged. A GPU without bfloat16 is refused.
- ``float16``: on a GPU, autocast with a gradient scaler (accelerate's) over float32 master weights. On a CPU it
  is refused: there is no scaler path there and float16 matmuls are emulated.
"""

from __future__ import annotations

import logging
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

CPU_BF16_FALLBACK = ("model.dtype bfloat16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bfloat16 "
                     "would be emulated, about 15x slower than float32; training in float32 instead")


@dataclass(frozen=True)
class Precision:
    load_dtype: torch.dtype  # the dtype weights are loaded in (frozen weights stay in it)
    mixed_precision: str  # accelerate's setting: "no", "bf16" or "fp16"
    note: str | None = None  # why the request was changed, logged once
    reason: str = field(default="", compare=False)  # why this precision, in the run's log and run_info.json


# Either flag means the CPU has bfloat16 dot-product instructions that oneDNN's matmuls use (AMX tiles or AVX512).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuBf16:
    native: bool
    reason: str  # how it was decided, for the log


def cpu_bf16_from_cpuinfo(text: str) -> CpuBf16 | None:
    """Native bfloat16 from /proc/cpuinfo's ``flags`` line, or None when there is none (not x86 Linux)."""
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            found = [flag for flag in NATIVE_BF16_FLAGS if flag in line.split(":", 1)[1].split()]
            if found:
                return CpuBf16(True, f"the CPU has native bfloat16 ({', '.join(found)} in /proc/cpuinfo)")
            return CpuBf16(False, "the CPU has no native bfloat16 (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo): "
                                  "bfloat16 would be emulated, about 15x slower than float32")
    return None


# Says what the CPU is taken to have ("0": no native bfloat16, "1": native), overriding detection: for a host whose
# flags are wrong (some VMs hide or fake them), and for the test suite, whose subprocesses (torchrun, the CLI) must
# give the same numbers on every host.
CPU_BF16_ENV = "TUNELAB_CPU_BF16"


def cpu_bf16_from_env(value: str | None) -> CpuBf16 | None:
    """The override in ``TUNELAB_CPU_BF16``, or None when it is unset; any other value than 0/1 is an error."""
    if value is None or not value.strip():
        return None
    if value.strip() not in ("0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV}={value!r}: expected 0 (no native bfloat16) or 1 (native bfloat16)")
    native = value.strip() == "1"
    return CpuBf16(native, f"{CPU_BF16_ENV}={value.strip()} says the CPU has {'' if native else 'no '}native bfloat16")


@functools.cache
def detect_cpu_bf16() -> CpuBf16:
    """Whether this CPU computes bfloat16 natively, and how that was found (read once per process)."""
    forced = cpu_bf16_from_env(os.environ.get(CPU_BF16_ENV))
    if forced is not None:
        return forced
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux
        text = ""
    found = cpu_bf16_from_cpuinfo(text)
    if found is not None:
        return found
    if _onednn_bf16():
        return CpuBf16(True, "oneDNN reports native bfloat16 on this CPU")
    return CpuBf16(False, "oneDNN reports no native bfloat16 on this CPU: bfloat16 would be emulated, about 15x "
                          "slower than float32")


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX)."""
    return detect_cpu_bf16().native


def _onednn_bf16() -> bool:
    """oneDNN's own check for AVX512-BF16 / AMX (where /proc/cpuinfo has no flags line)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or unusual build: assume emulation, the safe side
        return False


def load_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype to load weights in, for training or inference (never refuses; see ``training_precision``)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype == "bfloat16" and device.type == "cpu" and not native_cpu_bf16():
        return torch.float32
    return getattr(torch, dtype)


# What `tunelab serve --dtype` (and the generating commands) accept: auto follows the run's model.dtype.
GENERATION_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class GenerationPrecision:
    dtype: str  # the model.dtype a finished run is loaded with to generate: float32, bfloat16 (or float16)
    reason: str  # why, for the server's log, /health and /metrics


def generation_precision(requested: str, configured: str, device: torch.device) -> GenerationPrecision:
    """The dtype a finished run generates in, for every caller that generates from one (``tunelab serve``,
    ``generate``, ``chat``): one rule, so that a served answer equals the offline one.

    ``requested`` is the caller's choice (``--dtype``; auto: the run's own), ``configured`` the run's ``model.dtype``.
    auto on both, on a CPU: bfloat16 weights where the CPU computes bfloat16 natively, else float32. bfloat16 on a
    CPU is computed row by row (``invariance``: small products padded, attention per row; the loader checks the
    kernels on the model and falls back to float32 where they are not row-invariant), so that a served answer is
    the one the request gets alone whatever else shares its batch; plain bfloat16 batches changed 5 of 16 SmolLM2
    answers of a concurrent burst. It is the faster choice there: a burst's prefill through one MLP projection of
    SmolLM2, (270, 576) x (576, 1536), took 0.66 ms in bfloat16 against 3.4 ms in float32 on one core of an AMX
    host. On a CPU without native bfloat16 (emulated, about 15x slower) bfloat16 falls back to float32, said here."""
    if requested not in GENERATION_DTYPES:
        raise ConfigError(f"--dtype {requested}: expected one of {', '.join(GENERATION_DTYPES)}")
    chosen, why = requested, f"--dtype {requested}"
    if requested == "auto" and configured != "auto":
        chosen, why = configured, f"the run's model.dtype {configured}"
    if chosen == "auto" and device.type == "cpu":
        support = detect_cpu_bf16()
        if not support.native:
            return GenerationPrecision("float32", f"--dtype auto on a CPU: float32, as {support.reason}")
        return GenerationPrecision("bfloat16", f"--dtype auto on a CPU: bfloat16, as {support.reason}")
    if chosen == "bfloat16" and device.type == "cpu" and not native_cpu_bf16():
        return GenerationPrecision("float32", f"{why}: float32 instead, {detect_cpu_bf16().reason}")
    loaded = str(load_dtype(chosen, device)).removeprefix("torch.")
    return GenerationPrecision(loaded, f"{why}: {loaded} weights on {device.type}")


def training_precision(dtype: str, device: torch.device, fixed_base: str | None = None) -> Precision:
    """How a run trains with ``model.dtype``; raises ConfigError with the reason for a setting that cannot train.
    ``fixed_base`` says why the technique keeps float32 (it loads its base itself, e.g. quantized, or declares why):
    then ``auto`` stays float32 on a CPU."""
    if dtype == "auto" and device.type == "cpu":
        return _auto_on_cpu(fixed_base)
    loaded = load_dtype(dtype, device)
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("model.dtype float16 cannot train on a CPU: float16 needs loss scaling, which has no CPU "
                          "path, and its matmuls are emulated there; use float32 (or bfloat16 on a CPU with native "
                          "bfloat16)")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype bfloat16: this GPU does not support bfloat16; use float16 (trained with a "
                          "loss scaler) or float32")
    note = CPU_BF16_FALLBACK if dtype == "bfloat16" and loaded == torch.float32 else None
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(loaded, "no")
    return Precision(loaded, mixed, note, reason=note or f"model.dtype {dtype} on {device.type}")


def technique_precision(dtype: str, device: torch.device, base_load: Any, cpu_bf16_refusal: str | None) -> Precision:
    """How a run of a technique trains: ``training_precision`` with the technique's reason to keep float32, if any.
    ``base_load`` is the technique's ``models.BaseLoad`` for this device (a base it loads itself, quantized or in a
    dtype of its own, stays float32 under ``auto`` on a CPU); ``cpu_bf16_refusal`` is its declared reason not to
    train in bfloat16 on a CPU. The one place training and the memory plan ask (they must agree)."""
    fixed = base_load.quantization_config is not None or base_load.dtype is not None
    why_float32 = cpu_bf16_refusal or ((base_load.note or "quantized") if fixed else None)
    return training_precision(dtype, device, why_float32)


def _auto_on_cpu(fixed_base: str | None) -> Precision:
    """``model.dtype: auto`` for training on a CPU: bfloat16 autocast where the CPU has it natively."""
    if fixed_base:
        return Precision(torch.float32, "no", reason=f"model.dtype auto: float32 for this technique ({fixed_base})")
    support = detect_cpu_bf16()
    if support.native:
        return Precision(torch.bfloat16, "bf16", reason=f"model.dtype auto: bfloat16 autocast, frozen weights in "
                                                        f"bfloat16, trainable weights float32: {support.reason}")
    return Precision(torch.float32, "no", reason=f"model.dtype auto: float32, {support.reason}")


def keep_trainable_in_float32(model: nn.Module) -> int:
    """Make every trainable parameter float32 (the master weights; autocast computes in half precision).
    Returns how many parameters were converted."""
    converted = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            converted += 1
    return converted


def adapters_compute_in_autocast_dtype(model: nn.Module) -> int:
    """Stop PEFT's adapter layers from casting their bfloat16 input up to their float32 weights' dtype.

    Under autocast the adapter's matmuls run in bfloat16 anyway, so that cast (and its backward), the dropout and the
    scaling on a float32 copy of every adapted layer's input are pure memory traffic: ~25% of a bf16 LoRA step's
    CPU time went to copies, dropout and their backward in a profile (SmolLM2, 4 x 256). The weights stay float32.
    Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", False):  # PEFT's flag (peft.helpers.disable_input_dtype_casting)
            module.cast_input_dtype_enabled = False
            switched += 1
    return switched
