"""A/B of two ways to compute a training step, in one process, on one window: for deciding a speed change on a
shared machine.

Whole-run tokens/s on a host that other processes share moves by about 10% from run to run, more than most single
changes are worth. Here the bench's set-up (``profile_step.bench_config``: SmolLM2-135M, LoRA r16 on q/k/v/o,
micro-batch 4, length 256) trains until its second step, and that step's forward and backward run ``--rounds`` times
per variant on the same window, the variants alternating (A B, B A, ...), so both see the same load drift. Each pass
is timed in process CPU seconds (not wall: a descheduled process does not count), and the report gives each
variant's median, the paired ratio A/B of every round (its median and range: the spread to report) and, with
``--profile``, the ops whose self CPU time differs most between the two (what the change actually moved; the
profiler inflates small ops, so read it for where, not for how much).

A variants file is a Python module with ``VARIANTS = ["a", "b"]`` (the first is the baseline) and
``use(name, model)``, which switches the live model (or the modules it calls) to that variant::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ab_step.py my_variants.py --rounds 8 [--profile]

Run at one thread (``OMP_NUM_THREADS=1``): at two, a thread descheduled by another process stalls every parallel
region and the CPU time of the waiting thread counts too (``--wall`` times wall seconds instead, for the bench's two
threads on a quiet host). Speed is measured here, never in a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def load_variants(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("ab_variants", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if len(getattr(module, "VARIANTS", ())) != 2 or not callable(getattr(module, "use", None)):
        raise SystemExit(f"{path}: expected VARIANTS = [baseline, other] and use(name, model)")
    return module


def measure(variants: ModuleType, rounds: int, profiled: bool, overrides: list[str],
            clock: Any = time.process_time) -> dict[str, Any]:
    """Train the bench's run to its second step and time that step's passes per variant (see module doc)."""
    sys.path.insert(0, str(HERE))
    from profile_step import bench_config

    from tunelab.training import loop, session

    names: list[str] = list(variants.VARIANTS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    ops: dict[str, dict[str, float]] = {name: defaultdict(float) for name in names}
    accumulate, calls = loop.accumulate_gradients, [0]

    def one_pass(name: str, model: Any, window: Any, args: tuple, kwargs: dict) -> None:
        from torch.profiler import ProfilerActivity, profile

        variants.use(name, model)
        model.zero_grad(set_to_none=True)
        prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None
        if prof is not None:
            prof.__enter__()
        start = clock()
        accumulate(model, window, *args, **kwargs)
        seconds[name].append(clock() - start)
        if prof is not None:
            prof.__exit__(None, None, None)
            for event in prof.key_averages():
                ops[name][event.key] += event.self_cpu_time_total / 1e3 / rounds  # ms per pass

    def alternating(model: Any, window: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # the first step warmed up; this one's window is timed
            for index in range(rounds):
                for name in names if index % 2 == 0 else names[::-1]:
                    one_pass(name, model, window, args, kwargs)
            variants.use(names[0], model)
            model.zero_grad(set_to_none=True)
        return accumulate(model, window, *args, **kwargs)

    loop.accumulate_gradients = alternating
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = bench_config(Path(tmp), 128, ["training.max_steps=2", "training.log_every=1", *overrides])
            session.train(config, progress=False)
    finally:
        loop.accumulate_gradients = accumulate
    result = report(names, seconds, ops if profiled else None)
    if clock is not time.process_time:
        result["median_wall_s"] = result.pop("median_cpu_s")
    return result


def report(names: list[str], seconds: dict[str, list[float]], ops: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    import torch

    base, other = names
    ratios = [a / b for a, b in zip(seconds[base], seconds[other])]  # > 1: the other variant is faster
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "rounds": len(ratios),
                              "median_cpu_s": {n: round(statistics.median(seconds[n]), 3) for n in names},
                              "paired_speedup_median": round(statistics.median(ratios), 4),
                              "paired_speedup_range": [round(min(ratios), 4), round(max(ratios), 4)]}
    if ops is not None:
        keys = sorted(set(ops[base]) | set(ops[other]), key=lambda k: -abs(ops[other][k] - ops[base][k]))
        result["ops_ms_per_pass"] = [{"op": k, base: round(ops[base][k], 1), other: round(ops[other][k], 1)}
                                     for k in keys[:15]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", type=Path, help="a module with VARIANTS = [baseline, other] and use(name, model)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also list the ops whose self CPU time moved most")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--wall", action="store_true", help="time wall seconds (for several threads, quiet host only)")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    print(json.dumps(measure(load_variants(args.variants), args.rounds, args.profile, args.overrides, clock), indent=1))


if __name__ == "__main__":
    main()
