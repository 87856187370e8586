"""Launching a real `torchrun` of two CPU processes (gloo) from a test: the distributed tests share it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")
DRIVER = Path(__file__).parent / "ddp_driver.py"


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` in ``cwd`` (its own model and data cache there); an error
    shows each rank's own first (a crash on one rank shows as "closed by peer" on the other)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_CACHE": str(cwd / "cache")}  # never the user's cache
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("[rank") and "Error" in line]
        raise AssertionError("\n".join(errors) + "\n" + result.stdout[-3000:] + result.stderr[-6000:])
    return result
