"""Where a checkpointed run's memory goes beyond the plan: live tensors or glibc's heap (docs/choosing.md, the
solver section).

Trains one cell of the planner's grid (``plan_grid.py``: 256-token rows, or ``--length``) at a chosen micro-batch for 2 steps in this
process and prints, at every 5th decoder layer of the forward passes, the process's RSS and glibc's own account of
its heap (``mallinfo2``: the heap's size, the bytes in use, the bytes free inside it). Bytes in use are every live
allocation, tensors included; bytes free inside the heap are RSS no tensor holds. ``--fix`` tries a remedy and
reports its price in kernel time:

- ``mmap``: ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` before training (every chunk of 1 MiB or more its own mapping,
  returned when freed, zeroed by the kernel when made again);
- ``trim``: ``malloc_trim(0)`` after each checkpointed layer's forward (free pages inside the heap returned).

Training applies tunelab's heap policy itself (a fixed 1 MiB mmap threshold for checkpointed runs and quantized
loads on a CPU); ``--policy off`` trains without it (glibc's dynamic threshold), as before the policy. Huge pages
are asked for from outside, at process start: ``THP_MEM_ALLOC_ENABLE=1`` (torch reads it once, at its first CPU
allocation) or ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; the JSON line says which were set.

``--live`` runs it under torch's profiler and adds the most bytes of tensors alive at once (every CPU allocation and
free the profiler recorded, net of those alive before training; the profiler's own records raise the RSS).

    python benchmarks/plan_heap.py --technique lora --micro-batch 14 [--length 256] [--checkpointing off] [--policy off]
        [--fix mmap|trim] [--threshold-mib 1] [--live]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import plan_grid as grid  # noqa: E402 - the grid's models, data and configs

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
MiB = 2**20
# Huge pages are asked for from outside, at process start: torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU
# allocation, glibc its tunables at start.
HUGE_PAGE_ENV = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--technique", default="lora")
    parser.add_argument("--micro-batch", type=int, default=14)
    parser.add_argument("--length", type=int, default=256, help="tokens per row (the grid's lengths: 64, 256)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on")
    parser.add_argument("--fix", choices=("none", "mmap", "trim"), default="none")
    parser.add_argument("--threshold-mib", type=float, default=1.0, help="the fixed mmap threshold of --fix mmap")
    parser.add_argument("--trim-threshold-mib", type=float, default=None,
                        help="with --fix mmap: glibc's trim threshold (a fixed mmap threshold also fixes it, at 128 KiB)")
    parser.add_argument("--policy", choices=("on", "off"), default="on", help="tunelab's heap policy")
    parser.add_argument("--live", action="store_true", help="also the live tensors' peak (torch's profiler)")
    parser.add_argument("--work", default="/tmp/tunelab-plan-heap")
    args = parser.parse_args()

    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tunelab.config import build_config
    from tunelab.plan import plan_memory, planner, resident_bytes
    from tunelab.run_info import own_peak_rss_bytes
    from tunelab.training import session, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = grid.cell_config(grid.model_dir(args.model, work), args.technique, args.checkpointing == "on", args.length, work,
                              work / "runs" / str(time.time_ns()))
    config["training"]["micro_batch_size"] = args.micro_batch
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    layers_seen = [0]
    trims = [0, 0.0]

    def show(tag: str) -> None:
        info = libc.mallinfo2()
        print(f"{tag:12s} RSS {resident_bytes() / MiB:6.0f} MiB  heap {info.arena / MiB:6.0f}  in use "
              f"{info.uordblks / MiB:6.0f}  free in the heap {info.fordblks / MiB:6.0f}  mapped chunks "
              f"{info.hblkhd / MiB:5.0f}", flush=True)

    def before_layer(module: torch.nn.Module, inputs: tuple) -> None:
        real = isinstance(module, GradientCheckpointingLayer) and inputs and not inputs[0].is_meta  # not the plan's
        if real:
            layers_seen[0] += 1
            if layers_seen[0] % 5 == 1:
                show(f"layer {layers_seen[0]}")

    def after_layer(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(module, GradientCheckpointingLayer) and inputs and not inputs[0].is_meta:
            started = time.perf_counter()
            libc.malloc_trim(0)
            trims[0] += 1
            trims[1] += time.perf_counter() - started

    torch.nn.modules.module.register_module_forward_pre_hook(before_layer)
    if args.fix == "trim":
        torch.nn.modules.module.register_module_forward_hook(after_layer)
    if args.fix == "mmap":
        libc.mallopt(M_MMAP_THRESHOLD, int(args.threshold_mib * MiB))
        if args.trim_threshold_mib is not None:
            libc.mallopt(M_TRIM_THRESHOLD, int(args.trim_threshold_mib * MiB))
    if args.policy == "off":  # neither applied nor planned
        session.heap_policy = lambda *args: None
        planner.heap_mmap_threshold = lambda *args: None
    built = build_config(config)
    planned = plan_memory(built, "cpu").peak_bytes
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    live_peak = None
    if args.live:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            train(built, progress=False)
        live_peak = peak_live_bytes(prof)
    else:
        train(built, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    show("end")
    print(json.dumps({"model": args.model, "technique": args.technique, "micro_batch": args.micro_batch,
                      "length": args.length,
                      "checkpointing": args.checkpointing, "policy": args.policy, "fix": args.fix,
                      "threshold_MiB": args.threshold_mib if args.fix == "mmap" else None,
                      "trim_threshold_MiB": args.trim_threshold_mib if args.fix == "mmap" else None,
                      "env": {k: os.environ[k] for k in HUGE_PAGE_ENV if k in os.environ},
                      "anon_huge_MiB": anon_huge_bytes() // MiB, "planned_MiB": round(planned / MiB),
                      "peak_rss_MiB": round(own_peak_rss_bytes() / MiB), "wall_s": round(time.time() - started, 1),
                      "user_s": round(after.ru_utime - before.ru_utime, 1),
                      "sys_s": round(after.ru_stime - before.ru_stime, 1),
                      "minor_faults": after.ru_minflt - before.ru_minflt, "trims": trims[0],
                      "trim_s": round(trims[1], 2),
                      "live_tensors_peak_MiB": None if live_peak is None else round(live_peak / MiB)}))


def anon_huge_bytes() -> int:
    """The process's memory in transparent huge pages now (/proc/self/smaps' AnonHugePages, summed)."""
    with open("/proc/self/smaps") as smaps:
        return sum(int(line.split()[1]) * 1024 for line in smaps if line.startswith("AnonHugePages:"))


def peak_live_bytes(prof: object) -> int:
    """The most bytes of tensors alive at once in a profile: its allocations and frees, in time order."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


if __name__ == "__main__":
    main()
