"""Run under torchrun by tests/test_fsdp.py (not a test module): set up the run of the config given as JSON in
argv[1] and stop it before its first step (as Ctrl-C would), then print this process's rank, its peak resident
memory (ru_maxrss, KiB) before the run and at its end, on a line of its own. The set-up is what differs between
processes that load the base and processes that receive their shards."""

from __future__ import annotations

import json
import os
import resource
import sys

from ddp_driver import StopAfter  # this script's folder is first on sys.path

from tunelab.config import build_config
from tunelab.training import loop, session


def main() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: torch and transformers imported
    loop._StopRequest = StopAfter(0)
    result = session.train(build_config(json.loads(sys.argv[1])), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAK", os.environ["RANK"], result.status, before, peak, flush=True)


if __name__ == "__main__":
    main()
