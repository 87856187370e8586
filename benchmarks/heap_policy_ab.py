"""What an allocator policy costs on the speed bench's set-up (docs/choosing.md, the heap policy).

The bench's run (``profile_step.bench_config``: SmolLM2-135M, LoRA r16 on q/k/v/o, micro-batch 4, length 256, no
checkpointing) trains ``--steps`` steps in a fresh process per policy, the policies alternating (A B, B A, ...) so
that both see the same load drift; a policy is a process-wide setting (torch reads ``THP_MEM_ALLOC_ENABLE`` once,
at its first allocation), so it cannot be switched inside one process as ``ab_step.py`` does. Each child times its
steps after the first in process CPU seconds, user plus kernel (a descheduled process does not count; the kernel's
share is where page faults show), and counts its minor page faults.

    OMP_NUM_THREADS=1 python benchmarks/heap_policy_ab.py --a default --b mmap1+thp --rounds 4 [--steps 10]

Policies: ``default`` (glibc's dynamic mmap threshold), ``mmapN`` (a fixed threshold of N MiB), ``thp`` (torch's
huge pages for its allocations of 2 MiB or more), ``notcache`` (glibc's per-thread cache off,
``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``, as `tunelab train` restarts itself), ``onednnN`` (oneDNN's
primitive cache bounded to N primitives, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), joined with ``+``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import ctypes, json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
policy, steps, work = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
for part in policy.split("+"):
    if part.startswith("mmap"):
        ctypes.CDLL("libc.so.6").mallopt(-3, int(float(part[4:]) * 2**20))  # M_MMAP_THRESHOLD
import profile_step
from tunelab.training import loop, session
config = profile_step.bench_config(work, 4 * steps, [f"training.max_steps={steps}"])
marks = []
accumulate = loop.accumulate_gradients
def timed(*args, **kwargs):
    marks.append(resource.getrusage(resource.RUSAGE_SELF))
    return accumulate(*args, **kwargs)
loop.accumulate_gradients = timed
session.train(config, progress=False)
marks.append(resource.getrusage(resource.RUSAGE_SELF))  # after the last step (its optimizer step, a log line)
first, last = marks[1], marks[-1]
n = len(marks) - 2
print(json.dumps({"user_s": (last.ru_utime - first.ru_utime) / n, "sys_s": (last.ru_stime - first.ru_stime) / n,
                  "faults": (last.ru_minflt - first.ru_minflt) / n, "peak_rss_MiB": last.ru_maxrss / 1024}))
"""


def run(policy: str, steps: int) -> dict[str, float]:
    env = dict(os.environ)
    if "thp" in policy.split("+"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    for part in policy.split("+"):
        if part.startswith("onednn"):  # oneDNN reads it at its first primitive
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = part[len("onednn"):]
    if "notcache" in policy.split("+"):  # glibc reads its tunables only when a process starts
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), "glibc.malloc.tcache_count=0"]))
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), policy, str(steps), work],
                              capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{policy} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="default")
    parser.add_argument("--b", default="mmap1+thp")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {args.a: [], args.b: []}
    for round_ in range(args.rounds):
        order = (args.a, args.b) if round_ % 2 == 0 else (args.b, args.a)
        for policy in order:
            results[policy].append(run(policy, args.steps))
            print(policy, json.dumps(results[policy][-1]), flush=True)
    cpu = {p: [r["user_s"] + r["sys_s"] for r in rs] for p, rs in results.items()}
    ratios = sorted(b / a for a, b in zip(cpu[args.a], cpu[args.b]))
    print(json.dumps({
        "per_step_cpu_s": {p: round(statistics.median(v), 3) for p, v in cpu.items()},
        "per_step_sys_s": {p: round(statistics.median(r["sys_s"] for r in rs), 3) for p, rs in results.items()},
        "per_step_faults": {p: round(statistics.median(r["faults"] for r in rs)) for p, rs in results.items()},
        "peak_rss_MiB": {p: round(statistics.median(r["peak_rss_MiB"] for r in rs)) for p, rs in results.items()},
        "ratio_b_over_a": {"median": round(statistics.median(ratios), 3), "min": round(ratios[0], 3),
                           "max": round(ratios[-1], 3)}}))


if __name__ == "__main__":
    main()
