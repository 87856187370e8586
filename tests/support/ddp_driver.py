"""Run under torchrun by tests/test_distributed.py (not a test module): in the same two processes, an
uninterrupted run, then the same run stopped after step 3 (as Ctrl-C would) and resumed, then any further runs
(uninterrupted) under "more", then under "resume_with" a config that resumes another run stopped after step 3 (the
same output.dir, e.g. another training.distributed). Every process gets the configs as JSON in argv[1]:
{"straight": {...}, "split": {...}, "more": {name: {...}}, "resume_with": {"first": {...}, "second": {...}}}
("more" and "resume_with" optional)."""

from __future__ import annotations

import json
import sys
from typing import Any

from tunelab.training import loop, session
from tunelab.config import build_config


class StopAfter:
    """Stand-in for loop._StopRequest: asks to stop before step ``after + 1`` (on every process)."""

    def __init__(self, after: int) -> None:
        self.after, self.checks = after, 0

    def __call__(self) -> "StopAfter":
        return self

    def __enter__(self) -> "StopAfter":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks > self.after


def stopped_then_resumed(first_config: dict[str, Any], second_config: dict[str, Any]) -> list[Any]:
    """Train ``first_config`` until it stops after step 3, then resume its folder with ``second_config``."""
    real_stop = loop._StopRequest
    loop._StopRequest = StopAfter(3)
    try:
        first = session.train(build_config(first_config), progress=False)
    finally:
        loop._StopRequest = real_stop
    second = session.train(build_config(second_config), resume=True, progress=False)
    return [first.status, first.step, second.status, second.step]


def main() -> None:
    configs = json.loads(sys.argv[1])
    straight = session.train(build_config(configs["straight"]), progress=False)
    first_status, first_step, second_status, second_step = stopped_then_resumed(configs["split"], configs["split"])
    outcomes = {"straight": [straight.status, straight.step], "first": [first_status, first_step],
                "second": [second_status, second_step]}
    for name, config in configs.get("more", {}).items():
        result = session.train(build_config(config), progress=False)
        outcomes[name] = [result.status, result.step]
    if "resume_with" in configs:
        outcomes["resume_with"] = stopped_then_resumed(configs["resume_with"]["first"], configs["resume_with"]["second"])
    print("DRIVER", json.dumps(outcomes), flush=True)


if __name__ == "__main__":
    main()
