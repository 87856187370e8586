"""Several processes, one run: what the trainer needs beyond accelerate's DDP to train on 2+ processes.

Launched as ``torchrun --nproc_per_node N .venv/bin/tunelab train CONFIG``, every process runs the same program.
accelerate's ``PartialState`` reads torchrun's environment; on a machine without CUDA it must be told to use the
CPU (``cpu=True``), else it reports one process and every rank trains alone (gloo is then the backend).

- The run folder is claimed, and the data tokenized, by the main process only; the others receive the result
  (``main_decides``), so two processes never race on one folder and tokenization happens once.
- Each process has its own random stream (dropout): checkpoints keep every rank's RNG state so a resume is exact.
- The run records its ``world_size`` (status.json); resuming with another number of processes would change the
  global batch and the data order, so it is refused.
- A stop request (Ctrl-C) is acted on only when every process agrees, at the same step (``any_process``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from tunelab.console import console
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def process_state() -> PartialState:
    """The process group (created on first use): CPU processes talk through gloo, GPUs through NCCL."""
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(mixed_precision: str) -> Accelerator:
    """accelerate's Accelerator on this process group. Its state is process-wide and refuses another precision;
    a single process training twice with another model.dtype (a notebook) starts that state afresh."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision and process_state().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def main_decides(compute: Callable[[], T]) -> T:
    """Run ``compute`` on the main process only and hand its result (or its error) to every process.

    The result travels pickled through the process group, between processes of the same run: it is never read
    from a file. An error is raised on every process, so all of them stop with the same message.
    """
    state = process_state()
    if state.num_processes == 1:
        return compute()
    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome[0] = ("ok", compute())
        except Exception as exc:  # noqa: BLE001 - re-raised on every process just below
            outcome[0] = ("error", exc)
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def quiet_other_processes() -> None:
    """Only the main process prints results and logs tunelab's messages; the others would repeat each line."""
    if not process_state().is_main_process:
        console.quiet = True
        logging.getLogger("tunelab").setLevel(logging.ERROR)


def any_process(flag: bool) -> bool:
    """True on every process when it is true on any: a decision all of them must take at the same step."""
    state = process_state()
    if state.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=state.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def all_rng_states(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's RNG state, by rank (collective: every process calls it)."""
    state = process_state()
    return [local] if state.num_processes == 1 else gather_object([local])


def rank_rng_state(states: dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint's rng.pt (one saved before ranks were kept: the main's state)."""
    ranks = states.get("ranks")
    return ranks[rank] if ranks and rank < len(ranks) else states


def check_world_size(recorded: int | None, world: int, run_dir: Path) -> None:
    """A resume needs the number of processes the run started with: it sets the global batch and data order."""
    recorded = recorded or 1
    if recorded != world:
        raise ConfigError(f"--resume: {run_dir} was trained on {recorded} process(es) and this launch has {world}; "
                          f"resume with the same number (torchrun --nproc_per_node {recorded} ...), since it sets "
                          "the global batch and the order of the data")


def launcher_prefix() -> str:
    """``torchrun --nproc_per_node N `` when this process was started by torchrun with several processes (a printed
    resume command must start as many again), else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return ""
    beside = Path(sys.executable).with_name("torchrun")  # .venv/bin/torchrun is not on PATH in the README's workflow
    found = shutil.which("torchrun")
    program = "torchrun" if found and Path(found).resolve() == beside.resolve() else str(beside)
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    return f"{program} {'--nnodes ' + str(nodes) + ' ' if nodes > 1 else ''}--nproc_per_node {per_node} "
