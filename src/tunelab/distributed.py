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

``training.distributed: fsdp`` shards the model instead (``shard_model``): each process keeps 1/N of every weight,
gradient and optimizer moment. Only the main process reads the base weights: the others build the same modules on
the meta device (no memory), apply the technique to them, and receive their shards from the main
(``receive_shards``), so a model larger than one process's memory still loads (it must fit the main's). Every forward is then a collective (each layer gathers its weights from all
processes), so every process must run the same forwards: evaluation and sample generation run in full on every
process. Checkpoints and the result are gathered into full (unsharded) state dicts and written by the main process
in the one-process format, so a sharded run's files are the files of any other run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

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


def first_launched_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is the launcher's first (torchrun's RANK 0) or was not launched by one: known from the
    environment torchrun sets, before any process group exists (a process's set-up logs, such as its restart,
    would otherwise be printed once per worker)."""
    return (os.environ if environ is None else environ).get("RANK", "0") == "0"


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


def sum_over_processes(values: list[float]) -> list[float]:
    """Each value summed over every process, in one collective (every process calls it, with as many values)."""
    state = process_state()
    if state.num_processes == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=state.device)
    torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
    return summed.tolist()


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


# ---------------------------------------------------------------- sharded training (training.distributed: fsdp)
#
# tunelab applies torch's FSDP2 (``fully_shard``) itself rather than through accelerate's FSDP plugin: accelerate
# 1.16 ignores that plugin on CPU processes (MULTI_CPU) and wraps the model in DDP instead, and on CUDA its plugin
# would also take over the optimizer and its own checkpoint format. One code path for CPU and CUDA keeps the
# checkpoints and results the same files as a one-process run; accelerate still provides the process group,
# autocast and the reductions. A sharded model is never given to ``accelerator.prepare`` (on CPU it would add DDP).

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on the main process's CPU only


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (under an adapter wrapper, the base it adapts)."""
    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise ConfigError(f"training.distributed: fsdp shards a transformers model, and {type(model).__name__} holds none; "
                          "use training.distributed: ddp")
    return found


def shard_model(model: nn.Module, compute_dtype: torch.dtype | None) -> int:
    """Shard ``model`` over the processes in place (FSDP2): one unit per decoder layer, then the root (embeddings,
    final norm, head). A layer's weights are gathered just before its forward and freed after it (and again in the
    backward), so a process holds its 1/N shard plus one layer at a time. ``compute_dtype`` (bf16 autocast) gathers
    and computes the weights in that dtype and reduces gradients in float32 into the float32 master shards.
    Returns the number of units (the layers and the root).

    Every trainable weight must sit inside the transformers model (the root unit): one outside it (a prompt
    encoder beside the model) would have no unit to reduce its gradient, so each process would train its own."""
    root = transformers_model(model)
    inside = {id(p) for p in root.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ConfigError(f"training.distributed: fsdp cannot shard trainable weights outside the model ({outside[0]}, "
                          f"{len(outside)} in all); use training.distributed: ddp")
    layer_types = set(getattr(root, "_no_split_modules", None) or ())  # transformers' name for its decoder layers
    layers = [m for m in root.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ConfigError(f"training.distributed: fsdp found no decoder layers in {type(root).__name__} (it declares "
                          "no _no_split_modules); use training.distributed: ddp")
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype is not None
              else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)  # the root keeps its weights gathered from forward to backward (FSDP2's rule)
    log.info("fsdp: %d decoder layers and the root sharded over %d processes", len(layers), process_state().num_processes)
    return len(layers) + 1


def structure(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
    """Each parameter's name, shape, dtype and whether it trains: what every process's model must agree on before
    it is sharded (each unit's all-gather joins the processes' shards of one flat buffer)."""
    return [(name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in model.named_parameters()]


def check_same_structure(model: nn.Module) -> None:
    """Raise on every process (never a hang in the first all-gather) when this process's model is not the main's:
    the twin the other processes built on the meta device must be the loaded model, parameter for parameter."""
    mine = structure(model)
    main = main_decides(lambda: mine)
    differs = next(((a, b) for a, b in zip(main, mine) if a != b), None)
    if differs is None and len(main) != len(mine):
        differs = (main[len(mine):] or [None])[0], (mine[len(main):] or [None])[0]
    if any_process(differs is not None):
        raise RuntimeError("training.distributed: fsdp: the model rebuilt on the meta device differs from the one "
                           f"the main process loaded (main: {differs[0] if differs else '?'}, here: "
                           f"{differs[1] if differs else '?'}); use training.distributed: ddp")


def receive_shards(model: nn.Module, full: dict[str, torch.Tensor] | None) -> None:
    """Fill a sharded model whose weights only the main process holds: ``full`` is the main's state dict taken
    before sharding (None elsewhere); the others' model was built on the meta device (``models.meta_twin``).
    Collective. Each tensor is broadcast from the main process one at a time and every process keeps its shard,
    so no process but the main ever holds the whole model. Buffers are not sharded and some are in no state dict
    (rotary inv_freq is non-persistent): every buffer is broadcast from the main as it is."""
    state = process_state()
    if not state.is_main_process:
        model.to_empty(device=state.device)  # the meta shards and buffers get (uninitialised) memory here
    set_model_state_dict(model, full if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, buffer in model.named_buffers():
        torch.distributed.broadcast(buffer, src=0)


def _reshard(model: nn.Module) -> None:
    """Put every unit back to its shards (the root stays gathered after a forward until its backward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights gathered in full, by the names ``checkpoint.trainable_state`` gives them, on the main
    process's CPU (an empty dict elsewhere). Collective: every process calls it."""
    _reshard(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
    return {name: full[name].contiguous() for name in names if name in full}


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Full tensors (a checkpoint's, the same on every process) into the sharded weights: each keeps its shard.
    After an evaluation the root unit still holds its gathered weights, which take no shards: reshard first."""
    _reshard(model)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order: index i of a one-process optimizer state is names[i]."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state gathered in full and keyed as ``optimizer.state_dict()`` keys it in one process
    (parameter index), so a sharded run's optimizer.pt is any run's; on the main process (empty state elsewhere).
    Collective."""
    _reshard(model)  # the parameters the optimizer holds are the shards: the names below are looked up by them
    gathered = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    groups = optimizer.state_dict()["param_groups"]  # hyperparameters and parameter indices; no tensors
    return {"state": {index[name]: value for name, value in gathered.get("state", {}).items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A one-process-format optimizer state (full tensors by parameter index) into the sharded optimizer."""
    _reshard(model)
    names = _optimizer_names(model, optimizer)
    by_name = {"state": {names[int(i)]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def clip_sharded_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to ``max_norm`` by their global norm; returns that norm (a plain tensor ()).
    Each process's norm is of its shards only: the DTensor norm reduces the squares over the processes."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


@contextmanager
def full_weights_on_main(model: nn.Module) -> Iterator[None]:
    """Inside, the main process's ``model`` holds its full weights (on the CPU) instead of its shards, so a
    technique saves it exactly as it saves a one-process model; the shards come back after. Collective on entry;
    the other processes only wait. Weights tied in the model (embeddings and head) stay one tensor."""
    _reshard(model)
    full = get_model_state_dict(model, options=GATHERED)  # every weight: a saved full model needs the frozen ones
    if not process_state().is_main_process:
        yield
        return
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    replacement: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replacement:
                replacement[id(param)] = nn.Parameter(full[f"{prefix}.{name}" if prefix else name],
                                                      requires_grad=param.requires_grad)
            swapped.append((module, name, param))
            module._parameters[name] = replacement[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
