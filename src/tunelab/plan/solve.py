"""The largest micro-batch or sequence length that fits a memory budget, and the set-ups that fit, ranked."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tunelab.config import TunelabConfig
from tunelab.errors import ConfigError
from tunelab.models import load_model_config
from tunelab.plan import speed
from tunelab.plan.memory import MemoryPlan, Shape
from tunelab.plan.planner import plan_memory
from tunelab import precision
from tunelab.techniques import TECHNIQUES, Technique, TechniqueError

SOLVABLE = ("micro_batch_size", "max_length")
SOLVE_CEILING = 4096  # the largest micro_batch_size --solve tries: a value found there may be exceeded (said so)


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest value in [low, high] for which ``fits`` holds (memory grows with the value), or None."""
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def solve(config: TunelabConfig, shape: Shape, budget: int, knob: str, device: str = "cpu",
          ceiling: int | None = None, processes: int = 1) -> tuple[int | None, MemoryPlan | None]:
    """The largest ``knob`` (micro_batch_size, or max_length with every row that long) whose planned peak fits
    ``budget`` bytes, up to ``ceiling`` (by default ``solve_ceiling``), with its plan; when even 1 (or 16 tokens)
    does not fit, None with that smallest value's plan (what the budget would have to hold)."""
    if knob not in SOLVABLE:
        raise ConfigError(f"--solve {knob}: expected one of {', '.join(SOLVABLE)}")
    plans: dict[int, MemoryPlan] = {}

    def fits(value: int) -> bool:
        if value not in plans:  # the smallest value is planned first, for the ceiling, and asked for again
            changed = {"micro_batch_size": value} if knob == "micro_batch_size" else {"length": value}
            plans[value] = plan_memory(config, device, dataclasses.replace(shape, **changed), processes=processes)
        return plans[value].peak_bytes <= budget

    smallest = 1 if knob == "micro_batch_size" else 16
    if not fits(smallest):
        return None, plans[smallest]
    best = largest_fitting(fits, smallest, ceiling or solve_ceiling(knob, plans[smallest]))
    return best, plans[best]  # the smallest fits, so the search found one


def solve_ceiling(knob: str, plan: MemoryPlan) -> int:
    """The largest value ``solve`` tries: for max_length the longest row the model's context takes
    (``context_ceiling``), where its config says one, since a longer row is one the model cannot take (a fixed 4096
    cut a model of 8192 short); else ``SOLVE_CEILING``, where more may fit (said so, not hidden)."""
    ceiling = context_ceiling(plan) if knob == "max_length" else None
    return ceiling if ceiling is not None else SOLVE_CEILING


def context_ceiling(plan: MemoryPlan) -> int | None:
    """The longest max_length the model's context (``plan.context_length``: its config's max_position_embeddings)
    takes, less the virtual tokens the technique adds before every row (``plan.virtual_tokens``: prompt learning's),
    which take positions too: the full context, solved for prompt tuning, was a length the run cannot take. None
    where the config says no context."""
    if plan.context_length is None:
        return None
    return max(plan.context_length - plan.virtual_tokens, 1)


@dataclass
class SetUp:
    technique: str
    checkpointing: bool
    dtype: str
    plan: MemoryPlan
    seconds_per_step: float | None  # None: not timed (another technique than the probe's, or no probe here)

    @property
    def why(self) -> str:
        trains = f"trains {self.plan.trainable_parameters:,} parameters"
        time = f"; ~{self.seconds_per_step:.2f} s/step" if self.seconds_per_step is not None else ""
        return f"{trains}; peak {self.plan.peak_bytes / 2**30:.2f} GiB ({self.plan.phase}){time}"


@dataclass
class Recommendation:
    """The set-ups that fit, ranked, and how their time per step was found (``speed.measure_step_times``)."""

    set_ups: list[SetUp]
    timing: str


def recommend_dtypes(device: str = "cpu") -> tuple[list[str], str]:
    """The dtypes ``recommend`` ranks set-ups in, and why. float32 everywhere; bfloat16 on CUDA, and on a CPU with
    native bfloat16, found as ``model.dtype: auto`` finds it (``precision.detect_cpu_bf16``: the CPU's flags, or
    ``TUNELAB_CPU_BF16``), where auto trains in bfloat16 autocast. Without it bfloat16 is emulated, so auto, and
    the ranking, stay float32."""
    if device == "cuda":
        return ["float32", "bfloat16"], "CUDA trains both (bfloat16 as autocast)"
    support = precision.detect_cpu_bf16()  # through the module: the test suite's override reaches it
    if support.native:
        return ["float32", "bfloat16"], ("model.dtype: auto trains in bfloat16 autocast here, frozen weights in "
                                         f"bfloat16, because {support.reason}")
    return ["float32"], f"float32 only: model.dtype: auto trains in float32 here, because {support.reason}"


def auto_trains_in_bfloat16(technique: Technique, settings: object, device: str) -> bool:
    """Whether ``model.dtype: auto`` trains this technique in bfloat16 on ``device`` (a technique that loads its
    base itself, quantized, or declares a reason to keep float32 on a CPU, stays float32): the same decision
    training makes (``precision.technique_precision``)."""
    target = torch.device(device)
    trains = precision.technique_precision("auto", target, technique.base_load(settings, target),
                                           technique.cpu_bf16_refusal)
    return trains.load_dtype == torch.bfloat16


def timed_techniques(config: TunelabConfig, requested: list[str] | None) -> list[str]:
    """The techniques whose set-ups --recommend times: the config's, then those ``requested`` (``--time``: names,
    or "all" for every registered technique), each once; its own answer given again is the same answer. Raises
    ConfigError for a name no technique has: the one check of --time's names, which ``recommend`` and the CLI
    make before any planning (a misspelt name was refused after the minute --recommend spends planning)."""
    names = [config.technique.name]
    for name in requested or []:
        if name != "all" and name not in TECHNIQUES:
            raise ConfigError(f"--time {name}: no such technique; expected all or names from: {', '.join(TECHNIQUES)}")
        names += list(TECHNIQUES) if name == "all" else [name]
    return list(dict.fromkeys(names))


# What --recommend leaves of the budget: a set-up it recommends must fit when trained, and the planner is measured
# to under-predict by up to 4.4% (the 90-cell grid's lowest planned/measured, 0.958; docs/choosing.md). Without it a
# set-up planned at 0.65 GiB was recommended for a 0.65 GiB budget and peaked at 0.66 (llama-narrow p-tuning,
# checkpointed). --solve answers the plan itself (the largest value the plan fits), which is what it is checked on.
RECOMMEND_HEADROOM = 0.05


def fits_with_headroom(peak_bytes: int, budget: int) -> bool:
    """Whether a planned peak leaves ``RECOMMEND_HEADROOM`` of ``budget`` free."""
    return peak_bytes <= (1 - RECOMMEND_HEADROOM) * budget


def recommend(config: TunelabConfig, shape: Shape, budget: int, device: str = "cpu",
              processes: int = 1, time: list[str] | None = None) -> Recommendation:
    """Every registered technique (default settings) x checkpointing x the dtypes this device trains in
    (``recommend_dtypes``; on a CPU, bfloat16 only for the techniques ``model.dtype: auto`` trains in bfloat16),
    planned; those that fit ``budget`` with ``RECOMMEND_HEADROOM`` to spare, most trainable parameters first (closest to full fine-tuning's quality),
    then fastest. The config's technique, and those named in ``time`` (``timed_techniques``), are timed by the
    speed probe's measured steps in each setting that fits (``plan/speed.py``: one probe per technique, about a
    minute each on a CPU); the others are left untimed rather than guessed (a FLOP ratio from another technique's
    probe came out 1.5-1.7 times off)."""
    timed_names = timed_techniques(config, time)  # first: a misspelt name is refused before the set-ups are planned
    dtypes, _ = recommend_dtypes(device)
    found = _fitting(config, shape, budget, device, processes, dtypes)
    layers = load_model_config(config.model).num_hidden_layers
    measured, failed = [], []
    for name in timed_names:
        timed = [s for s in found if s.technique == name]
        try:
            if not timed:
                raise RuntimeError(f"no {name} set-up fits the budget")
            probe = config.model_copy(update={"technique": TECHNIQUES[name].config_class()})  # its defaults
            times = speed.measure_step_times(probe, shape, sorted({(s.dtype, s.checkpointing) for s in timed}), device)
        except RuntimeError as exc:  # the probe could not train here: no time rather than a guessed one
            failed.append(f"{name}: {exc}")
            continue
        measured.append(name)
        for setup in timed:
            if (step := times.get((setup.dtype, setup.checkpointing))) is not None:
                setup.seconds_per_step = step.predict(layers)
    untimed = float("inf")
    ranked = sorted(found, key=lambda s: (-s.plan.trainable_parameters,
                                          untimed if s.seconds_per_step is None else s.seconds_per_step))
    return Recommendation(ranked, _timing_line(config, shape, layers, measured, failed))


def _timing_line(config: TunelabConfig, shape: Shape, layers: int, measured: list[str], failed: list[str]) -> str:
    """How the ranked set-ups' time per step was found, and how to time the others."""
    parts = []
    if measured:
        which = f"{measured[0]} (the config's technique, its defaults)" if measured == [config.technique.name] \
            else f"{', '.join(measured)} (each with its default settings)"
        parts.append(f"time per step measured for {which} on {speed.PROBE_LAYERS[0]}- and {speed.PROBE_LAYERS[1]}-layer "
                     f"copies of the model at {shape.rows} x {shape.length} tokens, scaled to {layers} layers; to time "
                     "other techniques, add --time NAME,NAME (or --time all: about a minute each)")
    if failed:
        parts.append(f"time per step not measured: {'; '.join(failed)}")
    return "; ".join(parts)


@contextmanager
def _quiet_info() -> Iterator[None]:
    """While --recommend plans dozens of set-ups, tunelab's INFO lines (the data cache read again for a technique
    that tokenizes differently, a technique's note on its defaults) are not printed: they buried the ranking.
    Warnings still are."""
    logger = logging.getLogger("tunelab")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _fitting(config: TunelabConfig, shape: Shape, budget: int, device: str, processes: int,
             dtypes: list[str]) -> list[SetUp]:
    """The set-ups whose plan fits ``budget``, not yet timed."""
    with _quiet_info():
        return _planned(config, shape, budget, device, processes, dtypes)


def _planned(config: TunelabConfig, shape: Shape, budget: int, device: str, processes: int,
             dtypes: list[str]) -> list[SetUp]:
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
                if fits_with_headroom(plan.peak_bytes, budget):
                    found.append(SetUp(name, checkpointing, dtype, plan, None))
    return found
