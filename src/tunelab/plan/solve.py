"""The largest micro-batch or sequence length that fits a memory budget, and the set-ups that fit, ranked."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import ConfigError
from tunelab.plan.memory import MemoryPlan, Shape
from tunelab.plan.planner import plan_memory
from tunelab import precision
from tunelab.techniques import TECHNIQUES, Technique, TechniqueError

SOLVABLE = ("micro_batch_size", "max_length")


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest value in [low, high] for which ``fits`` holds (memory grows with the value), or None."""
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def solve(config: TunelabConfig, shape: Shape, budget: int, knob: str, device: str = "cpu",
          ceiling: int = 4096, processes: int = 1) -> tuple[int | None, MemoryPlan | None]:
    """The largest ``knob`` (micro_batch_size, or max_length with every row that long) whose planned peak fits
    ``budget`` bytes, with its plan; (None, None) when even 1 (or 16 tokens) does not fit."""
    if knob not in SOLVABLE:
        raise ConfigError(f"--solve {knob}: expected one of {', '.join(SOLVABLE)}")
    plans: dict[int, MemoryPlan] = {}

    def fits(value: int) -> bool:
        changed = {"micro_batch_size": value} if knob == "micro_batch_size" else {"length": value}
        plans[value] = plan_memory(config, device, dataclasses.replace(shape, **changed), processes=processes)
        return plans[value].peak_bytes <= budget

    best = largest_fitting(fits, 1 if knob == "micro_batch_size" else 16, ceiling)
    return best, plans.get(best) if best is not None else None


@dataclass
class SetUp:
    technique: str
    checkpointing: bool
    dtype: str
    plan: MemoryPlan
    seconds_per_step: float

    @property
    def why(self) -> str:
        trains = f"trains {self.plan.trainable_parameters:,} parameters"
        spare = "; ".join(self.plan.notes[:1])
        return (f"{trains}; peak {self.plan.peak_bytes / 2**30:.2f} GiB ({self.plan.phase}); "
                f"~{self.seconds_per_step:.2f} s/step" + (f"; {spare}" if spare else ""))


def matmul_flops_per_second(device: str = "cpu", size: int = 512, repeats: int = 5,
                            dtype: torch.dtype = torch.float32) -> float:
    """The device's measured matmul throughput in ``dtype`` (the short calibration behind the time per step: a
    bfloat16 set-up's matmuls run in bfloat16 under autocast)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, a)  # warm-up: kernels chosen, threads started
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    if device == "cuda":
        torch.cuda.synchronize()
    return repeats * 2 * size**3 / max(time.perf_counter() - started, 1e-9)


def step_seconds(plan: MemoryPlan, total_parameters: int, checkpointing: bool, flops: float) -> float:
    """Forward 2·P·tokens, backward 2·P·tokens for the inputs' gradients plus 2·P_trainable·tokens for the weights',
    plus one more forward when activations are recomputed, at the measured throughput."""
    tokens = plan.shape.rows * plan.shape.length
    passes = (2 + 2 + (2 if checkpointing else 0)) * total_parameters + 2 * plan.trainable_parameters
    return passes * tokens / flops


def recommend_dtypes(device: str = "cpu") -> tuple[list[str], str]:
    """The dtypes ``recommend`` ranks set-ups in, and why. float32 everywhere; bfloat16 on CUDA, and on a CPU with
    native bfloat16, found as ``model.dtype: auto`` finds it (``precision.detect_cpu_bf16``: the CPU's flags, or
    ``TUNELAB_CPU_BF16``), where auto trains in bfloat16 autocast. Without it bfloat16 is emulated, so auto, and
    the ranking, stay float32."""
    if device == "cuda":
        return ["float32", "bfloat16"], "CUDA: float32 and bfloat16 (autocast) set-ups"
    support = precision.detect_cpu_bf16()  # through the module: the test suite's override reaches it
    if support.native:
        return ["float32", "bfloat16"], ("float32 and the bfloat16 set-ups model.dtype: auto trains here (bfloat16 "
                                         f"autocast, frozen weights in bfloat16): {support.reason}")
    return ["float32"], f"float32 only, as model.dtype: auto trains here: {support.reason}"


def auto_trains_in_bfloat16(technique: Technique, settings: object, device: str) -> bool:
    """Whether ``model.dtype: auto`` trains this technique in bfloat16 on ``device`` (a technique that loads its
    base itself, quantized, or declares a reason to keep float32 on a CPU, stays float32): the same decision
    training makes (``precision.technique_precision``)."""
    target = torch.device(device)
    trains = precision.technique_precision("auto", target, technique.base_load(settings, target),
                                           technique.cpu_bf16_refusal)
    return trains.load_dtype == torch.bfloat16


def recommend(config: TunelabConfig, shape: Shape, budget: int, device: str = "cpu", processes: int = 1) -> list[SetUp]:
    """Every registered technique (default settings) x checkpointing x the dtypes this device trains in
    (``recommend_dtypes``; on a CPU, bfloat16 only for the techniques ``model.dtype: auto`` trains in bfloat16),
    planned; those that fit ``budget``, most trainable parameters first (closest to full fine-tuning's quality),
    then fastest (each dtype's time from its own measured matmul throughput)."""
    dtypes, _ = recommend_dtypes(device)
    flops = {dtype: matmul_flops_per_second(device, dtype=getattr(torch, dtype)) for dtype in dtypes}
    found = []
    for name, technique in TECHNIQUES.items():
        try:  # a technique whose defaults cannot stand alone (adapter routing needs adapters) is skipped
            settings = technique.config_class()
        except (TechniqueError, ConfigError, ValueError):
            continue
        for dtype in dtypes:
            if dtype == "bfloat16" and device != "cuda" and not auto_trains_in_bfloat16(technique, settings, device):
                continue  # auto keeps it float32 on this CPU: its float32 set-up is the one auto would train
            for checkpointing in (False, True):
                try:
                    candidate = config.model_copy(update={
                        "technique": settings,
                        "model": config.model.model_copy(update={"dtype": dtype}),
                        "training": config.training.model_copy(update={"gradient_checkpointing": checkpointing})})
                    plan = plan_memory(candidate, device, shape, processes=processes)
                except (TechniqueError, ConfigError, ValueError):  # a technique that does not fit this model
                    continue
                if plan.peak_bytes <= budget:
                    found.append(SetUp(name, checkpointing, dtype, plan,
                                       step_seconds(plan, plan.total_parameters, checkpointing, flops[dtype])))
    return sorted(found, key=lambda s: (-s.plan.trainable_parameters, s.seconds_per_step))
