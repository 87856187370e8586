"""The training loop: optimizer steps until the plan's last one, on accelerate (one process or DDP).

Each step takes ``grad_accum`` micro-batches (the window), counts their supervised tokens first over every
process, and scales each micro-batch's *summed* loss by ``world_size / total_tokens``. DDP averages gradients over
the processes, so the world size cancels: the step's gradient is exactly the gradient of the token-mean loss over
the whole window, as if it were one big batch. A step whose loss or gradient is not finite is skipped (no update,
no schedule step); ``training.max_consecutive_nonfinite`` of them in a row abort the run. Ctrl-C stops at the next
step boundary with a resumable checkpoint.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from accelerate import Accelerator

from tunelab import distributed
from tunelab.errors import TrainingAborted
from tunelab.models import release_freed_heap
from tunelab.objectives import ObjectiveSpec
from tunelab.training.context import LoopState, TrainingContext
from tunelab.training.plan import Row

log = logging.getLogger(__name__)


class _StopRequest:
    """Ctrl-C asks the loop to stop at the next step boundary and save; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_StopRequest":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler, Ctrl-C raises as usual
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step, then saving a resumable checkpoint (Ctrl-C again to quit now)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_loop(ctx: TrainingContext, state: LoopState) -> str:
    """Train from ``state.step`` to the plan's last step; returns "completed", "early_stopped" or "interrupted"."""
    config, accelerator, plan = ctx.config, ctx.accelerator, ctx.plan
    micro = plan.micro_batches(state.step * config.training.grad_accum)
    trainable = [p for p in ctx.model.parameters() if p.requires_grad]
    clip = config.training.max_grad_norm or float("inf")
    started, tokens_at_start = time.time(), state.tokens_seen
    with ctx.progress(plan.total_steps, state.step) as advance, _StopRequest() as stop:
        while state.step < plan.total_steps:
            if distributed.any_process(stop.requested):  # every process stops at the same step
                ctx.save_checkpoint(state)
                return "interrupted"
            # one optimizer step: the window's gradients, clipped, applied unless any of it is not finite
            stats: dict[str, float] = {}  # the objective's own figures (e.g. preference accuracy), per unit
            if ctx.rollouts is None:
                rows = [next(micro) for _ in range(config.training.grad_accum)]
                window = [{k: v.to(accelerator.device) for k, v in ctx.objective.collate(r, ctx.pad_id).items()} for r in rows]
            else:  # an online objective: the step's prompts, continued by the policy and scored (timed apart)
                rows, window, rollout_figures = ctx.rollouts.window(ctx.inner_model, ctx.objective.prepare, plan, state.step)
                stats.update(rollout_figures)
            loss_sum, units, penalty = accumulate_gradients(ctx.model, window, ctx.objective, accelerator, ctx.penalty, stats,
                                                            release_heap=returns_heap_between_micro_batches(ctx))
            grad_norm = (distributed.clip_sharded_gradients(trainable, clip) if ctx.sharded
                         else accelerator.clip_grad_norm_(trainable, clip))
            lr = ctx.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler then moves on)
            finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
            step_metrics = _apply_or_skip(ctx, state, finite)
            state.step += 1
            state.tokens_seen += _tokens_on_all_processes(rows, accelerator)
            # what the step did: progress bar, metrics line, the non-finite rule
            loss = (loss_sum / max(units, 1)).item()  # the window's token-mean loss
            speed = (state.tokens_seen - tokens_at_start) / max(time.time() - started, 1e-9)
            advance(loss=loss, lr=lr, tokens_per_s=speed, note=ctx.progress_note)
            if state.step % config.training.log_every == 0 or not finite:
                ctx.write_status("running", state)  # status.json follows the run, never behind metrics.jsonl
                ctx.log_metrics({"kind": "train", "step": state.step, "loss": round(loss, 6), "lr": lr,
                                 "grad_norm": round(float(grad_norm), 6), "tokens": state.tokens_seen,
                                 "tokens_per_s": round(speed, 1), "skipped": not finite,
                                 "elapsed_s": round(time.time() - started, 2), **stats, **step_metrics,
                                 **({"penalty": round(penalty, 6)} if penalty is not None else {})})
            _stop_on_repeated_nonfinite(state, config.training.max_consecutive_nonfinite, finite)
            # evaluation (best checkpoint, early stopping) and the periodic checkpoint
            last = state.step == plan.total_steps
            if config.training.eval_every and (state.step % config.training.eval_every == 0 or last):
                decision = ctx.evaluate(state)
                advance.evaluated(ctx.progress_note)
                if decision == "early_stop":
                    return "early_stopped"
            if config.training.save_every and state.step % config.training.save_every == 0:
                ctx.save_checkpoint(state)
    return "completed"


def returns_heap_between_micro_batches(ctx: TrainingContext) -> bool:
    """Whether each micro-batch's forward starts with the heap's free pages given back to the system: an online
    objective's run on a CPU, unless ``training.return_freed_memory`` is false. Its steps interleave rollouts and
    forward passes of changing lengths whose activations (many just under 1 MiB: 8 x 93 x 576 bfloat16 on SmolLM2)
    stay in glibc's heap once freed; the next forward reused too little of them: GRPO's example peaked at 2825 MiB
    with 715 MiB of it free inside the heap (mallinfo2), the planned 2325 MiB being live tensors and the runtime."""
    return (ctx.rollouts is not None and ctx.accelerator.device.type == "cpu"
            and ctx.config.training.return_freed_memory is not False)


def accumulate_gradients(
    model: torch.nn.Module, window: list[dict[str, torch.Tensor]], objective: ObjectiveSpec, accelerator: Accelerator,
    penalty: Callable[[], torch.Tensor | None] | None = None, stats: dict[str, float] | None = None,
    release_heap: bool = False,
) -> tuple[torch.Tensor, int, float | None]:
    """Backward over a window of micro-batches (each a dict of (B, T) tensors); returns the summed loss () and the
    total units (supervised tokens, pairs: the objective's) over all processes, and the technique's penalty (added
    once, with the last micro-batch: one big batch would add it once too). ``stats``, when given, receives the
    window's mean of each figure the objective reports per unit. ``release_heap``: give the heap's free pages back
    to the system (``malloc_trim``) before each micro-batch's forward."""
    local_units = sum(objective.count_units(b) for b in window)
    total_units = int(accelerator.reduce(torch.tensor(local_units, device=accelerator.device), "sum").item())
    scale = accelerator.num_processes / max(total_units, 1)  # DDP's gradient mean divides by num_processes again
    loss_sum = torch.zeros((), device=accelerator.device)
    stat_sums: dict[str, torch.Tensor] = {}
    penalty_value = None
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        if release_heap:
            release_freed_heap()
        # Only the last backward syncs gradients across processes: the others accumulate locally. A sharded model
        # has no no_sync (accelerate gives a null context): each backward reduce-scatters its gradients into the
        # shards, whose sum over the window is the same mean, and no process ever holds a whole gradient.
        with (nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
            result = objective.loss_sum(model, batch)
        loss = result.loss_sum * scale
        extra = penalty() if last and penalty is not None else None
        if extra is not None:  # every process adds the same term; DDP's gradient mean keeps it once
            loss = loss + extra
            penalty_value = float(extra.detach())
        accelerator.backward(loss)
        loss_sum += result.loss_sum.detach().float()
        for name, value in result.stats.items():
            stat_sums[name] = stat_sums.get(name, 0) + value.detach().float()
    if stats is not None:  # every process's objective reports the same names, in the same order
        stats.update({name: round(float(accelerator.reduce(value, "sum")) / max(total_units, 1), 6)
                      for name, value in sorted(stat_sums.items())})
    return accelerator.reduce(loss_sum, "sum"), total_units, penalty_value


def _apply_or_skip(ctx: TrainingContext, state: LoopState, finite: bool) -> dict[str, Any]:
    """Apply the step's update (then the technique's per-step hook, whose figures it returns), or skip a non-finite
    step: no update, no schedule step, counted."""
    step_metrics: dict[str, Any] = {}
    if finite:
        ctx.optimizer.step()
        ctx.scheduler.step()
        step_metrics = ctx.technique_step(state.step + 1)
        state.consecutive_nonfinite = 0
    else:
        state.nonfinite_skipped += 1
        state.consecutive_nonfinite += 1
    ctx.optimizer.zero_grad(set_to_none=True)
    return step_metrics


def _tokens_on_all_processes(rows: list[list[Row]], accelerator: Accelerator) -> int:
    """Tokens in this step's window (padding excluded), summed over every process's own window."""
    local_tokens = torch.tensor(sum(len(e.input_ids) for r in rows for row in r for e in row), device=accelerator.device)
    return int(accelerator.reduce(local_tokens, "sum").item())


def _stop_on_repeated_nonfinite(state: LoopState, limit: int, finite: bool) -> None:
    """Give up after ``limit`` non-finite steps in a row; warn about each skipped one."""
    if state.consecutive_nonfinite >= limit:
        raise TrainingAborted(
            f"{state.consecutive_nonfinite} steps in a row had a non-finite loss or gradient (last at step "
            f"{state.step}). Lower training.learning_rate, check the data, or use float32."
        )
    if not finite:
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state.step, state.consecutive_nonfinite)
