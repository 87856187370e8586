"""Restart `tunelab train` with glibc's per-thread cache off, for the runs that need it (docs/choosing.md, the heap
policy).

On glibc before 2.39, torch's CPU allocations (``posix_memalign(64, n)``) leave remainders in glibc's per-thread
cache (tcache) where the heap cannot merge them with their neighbours when those are freed (glibc bug 30723): a
freed block then cannot serve the next identical request, and the heap grows past the plan (SmolLM2 QLoRA at
2 x 64 tokens: 1426 MiB against 1280 planned; with the cache off 1277-1315). glibc reads GLIBC_TUNABLES only
when a process starts, so the CLI replaces its own process (``os.execve``: the same pid, so Ctrl-C, a compare's
wait and torchrun's watch of its workers all see one process) by the same command with the tunable added, before
anything is trained. Every torchrun worker restarts itself the same way, each with its own environment.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, Sequence

from tunelab.config import TunelabConfig
from tunelab.distributed import first_launched_process
from tunelab.models import default_device
from tunelab.plan.memory import (BOUNDED_ONEDNN_CACHE, BOUNDED_ONEDNN_CACHE_BY, ONEDNN_CACHE_VARIABLES,
                                 RESTARTED_WITHOUT_TCACHE, onednn_cache_capacity, tunables_without_tcache)
from tunelab.plan.planner import onednn_cache_bound, tcache_off_reason

log = logging.getLogger(__name__)


def restart_command(executable: str, orig_argv: Sequence[str], environ: Mapping[str, str], tunables: str,
                    reason: str) -> tuple[str, list[str], dict[str, str]]:
    """(program, argv, environment) that run this same command again with GLIBC_TUNABLES=``tunables``:
    ``orig_argv`` is the interpreter's whole command line (``sys.orig_argv``: ``python -m tunelab ...`` keeps its
    ``-m``, a console script its path, torchrun's ``-u``), its program named by ``executable`` (the same
    interpreter, found without PATH); the environment is this one plus the tunables and the marker that says why
    (a restarted process never restarts again)."""
    env = dict(environ)
    env["GLIBC_TUNABLES"] = tunables
    env[RESTARTED_WITHOUT_TCACHE] = reason
    return executable, [executable, *orig_argv[1:]], env


def bound_onednn_cache(config: TunelabConfig, process_is_the_command: bool) -> None:
    """Bound oneDNN's primitive cache (``BOUNDED_ONEDNN_CACHE``) for a run whose shapes change at every step
    (``onednn_cache_bound``), by setting its variable in this process's environment, which a restart keeps; logged.
    Not where the environment sets a capacity (the user's stands), nor in a process that is not the command
    itself: oneDNN reads the variable once, at its first primitive, which there may have come before."""
    if not process_is_the_command or onednn_cache_capacity() is not None:
        return
    reason = onednn_cache_bound(config, default_device().type)
    if reason is None:
        return
    os.environ[ONEDNN_CACHE_VARIABLES[0]] = str(BOUNDED_ONEDNN_CACHE)
    os.environ[BOUNDED_ONEDNN_CACHE_BY] = reason
    if first_launched_process():  # each torchrun worker sets it; the first says so
        log.info("oneDNN's primitive cache bounded to %d primitives (%s) because of %s: each new shape (a "
                 "micro-batch length, a micro-batch's count of supervised tokens) adds primitives, which oneDNN's "
                 "default (1024) keeps, raising the peak above the plan (set %s yourself to choose)",
                 BOUNDED_ONEDNN_CACHE, ONEDNN_CACHE_VARIABLES[0], reason, ONEDNN_CACHE_VARIABLES[0])


def restart_without_tcache(config: TunelabConfig, process_is_the_command: bool) -> None:
    """Replace this process by the same command with glibc's per-thread cache off when ``config`` is a run that
    trains with it off (``tcache_off_reason``) and this process has it on (``tunables_without_tcache``); else
    return. Logs why first. Never twice: a restarted process carries the marker. Only when
    ``process_is_the_command`` (started as `tunelab`, `python -m tunelab` or a torchrun worker): called in-process
    (a test's CliRunner, a notebook), execve would start the calling program over, its output still redirected;
    there the run keeps the cache and the session warns."""
    if not process_is_the_command or os.environ.get(RESTARTED_WITHOUT_TCACHE) is not None:
        return
    reason = tcache_off_reason(config, default_device().type)
    tunables = tunables_without_tcache() if reason else None
    if tunables is None:
        return
    program, argv, env = restart_command(sys.executable, sys.orig_argv, os.environ, tunables, reason)
    if first_launched_process():  # each torchrun worker restarts; the first says so
        log.info("restarting with GLIBC_TUNABLES=%s because of %s: glibc before 2.39 keeps freed aligned blocks out "
                 "of reach with its per-thread cache on (glibc bug 30723), which raises the peak above the plan "
                 "(training.glibc_tcache_off: false keeps this process)", tunables, reason)
    for stream in (sys.stdout, sys.stderr):  # execve drops what Python has not written yet
        stream.flush()
    os.execve(program, argv, env)


def prepare_training_process(config: TunelabConfig, process_is_the_command: bool) -> None:
    """What the process must hold before anything is computed, in this order: oneDNN's primitive cache bounded
    (``bound_onednn_cache``: an environment variable, which the restart then keeps), then glibc's per-thread cache
    off (``restart_without_tcache``: may replace the process). Both only in the command's own process."""
    bound_onednn_cache(config, process_is_the_command)
    restart_without_tcache(config, process_is_the_command)
