"""benchmarks/plan_solver.py: the environment its training processes start with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import plan_solver  # noqa: E402 - a script beside the package, not part of it

from tunelab.plan import memory  # noqa: E402


@pytest.mark.parametrize("kept, technique, expected", [
    ("glibc 2.36", "qlora", {"GLIBC_TUNABLES": memory.NO_TCACHE}),  # glibc keeps aligned blocks: every CPU run
    ("glibc 2.36", "lora", {"GLIBC_TUNABLES": memory.NO_TCACHE}),
    (None, "qlora", {}),                                               # glibc 2.39 or later: nothing to avoid
])
def test_runs_start_without_glibc_tcache_as_tunelab_trains_them(monkeypatch, tmp_path, kept, technique, expected):
    """Every cell runs as tunelab's remedy for glibc bug 30723 has it (the per-thread cache off on a CPU), so the
    solver's measured peaks are the ones a user's run gets; ``on`` keeps the cache, by a tcache_count tunelab
    leaves as the user's (the process would otherwise restart itself with it off)."""
    monkeypatch.setattr(memory, "aligned_blocks_kept", lambda *args, **kwargs: kept)
    config = plan_solver._solver_config("smollm2", technique, False, 2, tmp_path)
    assert plan_solver.child_env(config) == expected
    assert plan_solver.child_env(config, "off") == {"GLIBC_TUNABLES": memory.NO_TCACHE}
    assert plan_solver.child_env(config, "on") == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
    assert memory.tunables_without_tcache(("glibc", "2.36"), plan_solver.child_env(config, "on")["GLIBC_TUNABLES"]) is None
