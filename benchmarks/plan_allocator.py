"""Is a grid cell's gap to its plan a tensor the plan misses, or the C allocator? (docs/choosing.md, the grid's
known gaps.)

Trains one cell of the planner's grid (``plan_grid.py``) for 2 steps in a fresh process under each allocator
asked for, and prints its own peak RSS (VmHWM) against the plan, with the child's user and kernel time:

- ``glibc``: the process as ``tunelab train`` runs it;
- ``aligned-malloc``: glibc, with ``posix_memalign`` (torch's CPU allocation call, 64-byte alignment) served by
  plain ``malloc`` (``alignshim.c``, compiled here with ``cc`` and preloaded): the same heap without glibc's
  padded aligned requests, whose freed blocks cannot serve the same request again before glibc 2.38-2.39;
- ``no-tcache``: glibc with its per-thread cache off (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``, read at
  process start): before glibc 2.39 the remainders ``posix_memalign`` cuts off its padded chunk went into that
  cache, where the heap cannot merge them with the block beside when it is freed (glibc bug 30723);
- ``jemalloc``: a different allocator (``--jemalloc PATH`` to its ``libjemalloc.so.2``), preloaded.

Tensors are the same under all of them; what differs is what the heap keeps. A peak that falls to the plan under the
other allocators is the heap's, not a missing term.

    python benchmarks/plan_allocator.py --cell smollm2,qlora,on,64 [--allocators glibc,aligned-malloc,no-tcache,jemalloc]
        [--jemalloc /usr/lib/x86_64-linux-gnu/libjemalloc.so.2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import plan_grid as grid  # noqa: E402 - the grid's models, data, configs and child

MiB = 2**20


def shim(folder: Path) -> Path:
    """alignshim.c compiled into ``folder`` (a shared object to preload)."""
    target = folder / "alignshim.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(target), str(Path(__file__).parent / "alignshim.c")],
                   check=True)
    return target


# the environment each allocator's training process starts with (besides LD_PRELOAD)
TUNABLES = {"no-tcache": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}}


def run_child(config: dict, preload: Path | None, extra_env: dict[str, str] | None = None) -> dict:
    """One training process (the grid's child) with ``preload`` in LD_PRELOAD and ``extra_env``: its peak and
    times."""
    env = dict(os.environ, **(extra_env or {}))
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    done = subprocess.run([sys.executable, "-c", grid.CHILD, json.dumps(config)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"peak_MiB": round(int(done.stdout.split()[-1]) / MiB), "wall_s": round(time.time() - started, 1),
            "user_s": round(after.ru_utime - before.ru_utime, 1), "sys_s": round(after.ru_stime - before.ru_stime, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="smollm2,qlora,on,64", help="model,technique,checkpointing on|off,length")
    parser.add_argument("--allocators", default="glibc,aligned-malloc")
    parser.add_argument("--jemalloc", default=None, help="libjemalloc.so.2, for the jemalloc allocator")
    parser.add_argument("--work", default="/tmp/tunelab-plan-allocator")
    args = parser.parse_args()

    from tunelab.config import build_config
    from tunelab.plan import plan_memory

    model, technique, checkpointing, length = args.cell.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        preloads = {"glibc": None, "no-tcache": None, "aligned-malloc": shim(Path(tmp)),
                    "jemalloc": Path(args.jemalloc) if args.jemalloc else None}
        for allocator in args.allocators.split(","):
            if allocator == "jemalloc" and preloads["jemalloc"] is None:
                raise SystemExit("jemalloc: give --jemalloc PATH")
            config = grid.cell_config(grid.model_dir(model, work), technique, checkpointing == "on", int(length),
                                      work, work / "runs" / str(time.time_ns()))
            planned = plan_memory(build_config(config), "cpu")
            measured = run_child(config, preloads[allocator], TUNABLES.get(allocator))
            print(json.dumps({"cell": [model, technique, checkpointing, int(length)], "allocator": allocator,
                              "libc": " ".join(platform.libc_ver()), "planned_MiB": round(planned.peak_bytes / MiB),
                              "planned_phase": planned.phase, **measured,
                              "planned_over_measured": round(planned.peak_bytes / MiB / measured["peak_MiB"], 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
