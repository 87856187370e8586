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
from tunelab.techniques import TECHNIQUES, TechniqueError

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


def matmul_flops_per_second(device: str = "cpu", size: int = 512, repeats: int = 5) -> float:
    """The device's measured float32 matmul throughput (the short calibration behind the time per step)."""
    a = torch.randn(size, size, device=device)
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


def recommend(config: TunelabConfig, shape: Shape, budget: int, device: str = "cpu", processes: int = 1) -> list[SetUp]:
    """Every registered technique (default settings) x checkpointing x the dtypes this device trains in, planned;
    those that fit ``budget``, most trainable parameters first (closest to full fine-tuning's quality), then fastest."""
    flops = matmul_flops_per_second(device)
    dtypes = ["float32", "bfloat16"] if device == "cuda" or config.model.dtype == "bfloat16" else ["float32"]
    found = []
    for name, technique in TECHNIQUES.items():
        for dtype in dtypes:
            for checkpointing in (False, True):
                try:  # a technique whose defaults cannot stand alone (adapter routing needs adapters) is skipped
                    candidate = config.model_copy(update={
                        "technique": technique.config_class(),
                        "model": config.model.model_copy(update={"dtype": dtype}),
                        "training": config.training.model_copy(update={"gradient_checkpointing": checkpointing})})
                    plan = plan_memory(candidate, device, shape, processes=processes)
                except (TechniqueError, ConfigError, ValueError):  # a technique that does not fit this model
                    continue
                if plan.peak_bytes <= budget:
                    found.append(SetUp(name, checkpointing, dtype, plan,
                                       step_seconds(plan, plan.total_parameters, checkpointing, flops)))
    return sorted(found, key=lambda s: (-s.plan.trainable_parameters, s.seconds_per_step))
