"""The training loop (module `trainer`, so that `tunelab.train(...)` stays the API function): one visible function on accelerate, plus the small pieces it calls.

Reading order: set up the run folder, data and model (``train``), then ``_loop`` runs optimizer steps. Each step
takes ``grad_accum`` micro-batches, counts their supervised tokens first, and scales every micro-batch's summed
loss by ``world_size / total_tokens`` (DDP averages gradients over processes, so the world size cancels): the
step's gradient is exactly the gradient of the token-mean loss over the whole window.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from accelerate import Accelerator
from transformers import set_seed

from tunelab import checkpoint as ckpt
from tunelab import distributed
from tunelab.precision import keep_trainable_in_float32, training_precision
from tunelab.card import write_card
from tunelab.config import ConfigError, TunelabConfig
from tunelab.data import PreparedData, collate, epoch_batches, pack_rows, prepare_data, single_rows
from tunelab.eval import generate_samples, sample_prompts, validation_loss
from tunelab.eval.forgetting import forgetting_check, forgetting_message, heldout_loss
from tunelab.eval.training import (OverfittingSignal, compare_samples, is_better, metric_direction, progress_note,
                                   sample_scores)
from tunelab.models import cache_root, default_device, load_model, load_tokenizer, model_skeleton
from tunelab.objectives import OBJECTIVES, ObjectiveSpec
from tunelab.run_info import RunInfo
from tunelab import runs
from tunelab.runs import check_same_data, prepare_run_dir, read_json, truncate_metrics, write_run_json
from tunelab.schedule import make_scheduler
from tunelab.techniques import TECHNIQUES, RunContext, TechniqueError, count_parameters

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """The run stopped on an error the user must fix (repeated non-finite steps, ...)."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed, early_stopped, interrupted
    step: int
    evaluation: dict[str, Any] | None = None


@dataclass
class LoopState:
    """Counters saved in every checkpoint's state.json; together with the weights, optimizer, scheduler and RNG
    states they are everything needed to continue bit for bit."""

    step: int = 0
    tokens_seen: int = 0
    best_step: int | None = None
    best_eval: dict[str, Any] | None = None  # {step, loss, perplexity, tokens} of the best evaluation so far
    evals_without_improvement: int = 0
    nonfinite_skipped: int = 0
    consecutive_nonfinite: int = 0
    last_eval: dict[str, Any] | None = None
    history: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # validation - training loss at each evaluation (overfitting signal)


@dataclass
class Plan:
    rows: list[list[Any]]  # each row: the TokenizedExamples laid end to end in it
    batches_per_epoch: int  # micro-batches per epoch on this process
    total_steps: int
    seed: int
    micro_batch_size: int
    group_by_length: bool
    rank: int
    world: int

    def epoch(self, epoch: int) -> list[list[int]]:
        lengths = [sum(len(e.input_ids) for e in row) for row in self.rows]
        batches = epoch_batches(lengths, self.micro_batch_size, self.seed, epoch, self.group_by_length)
        usable = len(batches) - len(batches) % self.world  # every process gets the same number of batches
        return batches[:usable][self.rank :: self.world]

    def micro_batches(self, start: int) -> Iterator[list[list[Any]]]:
        """Rows of each micro-batch from global micro-batch index ``start`` on: resuming needs only the step."""
        index, cached_epoch, batches = start, -1, []
        while True:
            epoch, position = divmod(index, self.batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, self.epoch(epoch)
            yield [self.rows[r] for r in batches[position]]
            index += 1


def make_plan(config: TunelabConfig, data: PreparedData, rank: int, world: int) -> Plan:
    lengths = [len(e.input_ids) for e in data.train]
    row_indices = pack_rows(lengths, config.data.max_length) if config.data.packing else single_rows(len(lengths))
    rows = [[data.train[i] for i in row] for row in row_indices]
    per_epoch = len(rows) // config.training.micro_batch_size + bool(len(rows) % config.training.micro_batch_size)
    per_epoch = per_epoch // world
    if per_epoch < 1:
        raise ConfigError(f"{len(rows)} training rows are fewer than one micro-batch per process; lower training.micro_batch_size")
    steps = config.training.max_steps or math.ceil(config.training.epochs * per_epoch / config.training.grad_accum)
    return Plan(rows, per_epoch, steps, config.training.seed, config.training.micro_batch_size,
                not config.data.packing, rank, world)


# ---------------------------------------------------------------- one optimizer step


def accumulate_gradients(
    model: torch.nn.Module, window: list[dict[str, torch.Tensor]], objective: ObjectiveSpec, accelerator: Accelerator,
    penalty: Callable[[], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, int, float | None]:
    """Backward over a window of micro-batches; returns (summed loss, total units) over all processes, and the
    technique's penalty (added once, with the last micro-batch: one big batch would add it once too)."""
    local_units = sum(objective.count_units(b) for b in window)
    total_units = int(accelerator.reduce(torch.tensor(local_units, device=accelerator.device), "sum").item())
    scale = accelerator.num_processes / max(total_units, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    penalty_value = None
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with (nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
            result = objective.loss_sum(model, batch)
        loss = result.loss_sum * scale
        extra = penalty() if last and penalty is not None else None
        if extra is not None:  # every process adds the same term; DDP's gradient mean keeps it once
            loss = loss + extra
            penalty_value = float(extra.detach())
        accelerator.backward(loss)
        loss_sum += result.loss_sum.detach().float()
    return accelerator.reduce(loss_sum, "sum"), total_units, penalty_value


def make_optimizer(model: torch.nn.Module, config: TunelabConfig) -> torch.optim.Optimizer:
    """AdamW over the technique's parameter groups (by default: weight decay on matrices only)."""
    technique = TECHNIQUES[config.technique.name]
    groups = technique.param_groups(model, config.technique, config.learning_rate, config.training.weight_decay)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.training.adam_betas)


# ---------------------------------------------------------------- the loop


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


def _loop(ctx: "_Context", state: LoopState) -> str:
    config, accelerator, model, plan = ctx.config, ctx.accelerator, ctx.model, ctx.plan
    micro = plan.micro_batches(state.step * config.training.grad_accum)
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = config.training.max_grad_norm or float("inf")
    started, tokens_at_start = time.time(), state.tokens_seen
    with ctx.progress(plan.total_steps, state.step) as advance, _StopRequest() as stop:
        while state.step < plan.total_steps:
            if distributed.any_process(stop.requested):  # every process stops at the same step
                ctx.save_checkpoint(state)
                return "interrupted"
            rows = [next(micro) for _ in range(config.training.grad_accum)]
            window = [{k: v.to(accelerator.device) for k, v in collate(r, ctx.pad_id).items()} for r in rows]
            loss_sum, units, penalty = accumulate_gradients(model, window, ctx.objective, accelerator, ctx.penalty)
            grad_norm = accelerator.clip_grad_norm_(trainable, clip)
            lr = ctx.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler then moves on)
            finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
            step_metrics: dict[str, Any] = {}
            if finite:
                ctx.optimizer.step()
                ctx.scheduler.step()
                step_metrics = ctx.technique_step(state.step + 1)
                state.consecutive_nonfinite = 0
            else:  # skip: no update, no schedule step; count it and give up after K in a row
                state.nonfinite_skipped += 1
                state.consecutive_nonfinite += 1
            ctx.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            local_tokens = torch.tensor(sum(len(e.input_ids) for r in rows for row in r for e in row), device=accelerator.device)
            state.tokens_seen += int(accelerator.reduce(local_tokens, "sum").item())  # every process's own count
            loss = (loss_sum / max(units, 1)).item()
            speed = (state.tokens_seen - tokens_at_start) / max(time.time() - started, 1e-9)
            advance(loss=loss, lr=lr, tokens_per_s=speed, note=ctx.progress_note)
            if state.step % config.training.log_every == 0 or not finite:
                ctx.log_metrics({"kind": "train", "step": state.step, "loss": round(loss, 6), "lr": lr,
                                 "grad_norm": round(float(grad_norm), 6), "tokens": state.tokens_seen,
                                 "tokens_per_s": round(speed, 1), "skipped": not finite,
                                 "elapsed_s": round(time.time() - started, 2), **step_metrics,
                                 **({"penalty": round(penalty, 6)} if penalty is not None else {})})
            if state.consecutive_nonfinite >= config.training.max_consecutive_nonfinite:
                raise TrainingAborted(
                    f"{state.consecutive_nonfinite} steps in a row had a non-finite loss or gradient (last at step "
                    f"{state.step}). Lower training.learning_rate, check the data, or use float32."
                )
            if not finite:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state.step, state.consecutive_nonfinite)
            last = state.step == plan.total_steps
            if config.training.eval_every and (state.step % config.training.eval_every == 0 or last):
                if ctx.evaluate(state) == "early_stop":
                    return "early_stopped"
            if config.training.save_every and state.step % config.training.save_every == 0:
                ctx.save_checkpoint(state)
    return "completed"


# ---------------------------------------------------------------- set-up and wrap-up


class _Context:
    """Everything the loop needs, built once. Methods are the loop's side effects (logging, eval, saving)."""

    # Set by `train` in the order it builds them (tokenizer and data first: the model needs the pad id).
    tokenizer: Any
    data: PreparedData
    pad_id: int
    model: torch.nn.Module
    plan: Plan | None = None
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def __init__(self, config: TunelabConfig, run_dir: Path, show_progress: bool) -> None:
        self.config, self.run_dir, self.show_progress = config, run_dir, show_progress
        self.saved_step: int | None = None  # the step of this process's last checkpoint
        self.precision = training_precision(config.model.dtype, default_device())
        self.accelerator = distributed.make_accelerator(self.precision.mixed_precision)
        self.device = self.accelerator.device
        self.objective = OBJECTIVES[config.objective.name]
        self.technique = TECHNIQUES[config.technique.name]
        self.info = RunInfo()  # run_info.json: phases, parameters, memory, versions
        self.samples: list[dict[str, str]] = []  # validation prompts generated at evaluations
        self.overfitting = OverfittingSignal()
        self.progress_note = ""  # the last evaluation, as the progress bar shows it
        self.trackers: Any = None  # training.report_to (TensorBoard, MLflow), main process only

    def technique_step(self, step: int) -> dict[str, Any]:
        """The technique's per-step hook (e.g. AdaLoRA's rank reallocation), after the update, gradients still set.
        What it returns (e.g. adapter routing's mean gates) goes into this step's metrics line."""
        if self.technique.on_step is None:
            return {}
        return self.technique.on_step(self.accelerator.unwrap_model(self.model), self.config.technique, step) or {}

    @property
    def penalty(self) -> Callable[[], torch.Tensor | None] | None:
        """The technique's own loss term as a thunk for accumulate_gradients, or None when it has none."""
        if self.technique.penalty is None:
            return None
        return lambda: self.technique.penalty(self.accelerator.unwrap_model(self.model), self.config.technique)

    def technique_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """What the technique keeps beyond its weights (saved in each checkpoint), or None."""
        if self.technique.state is None:
            return None
        return self.technique.state.save(self.accelerator.unwrap_model(self.model))

    def technique_evaluation(self) -> dict[str, Any]:
        """The technique's own figures for eval.json (e.g. how a router splits each task), or nothing."""
        if self.technique.evaluate is None or not self.is_main:
            return {}
        return self.technique.evaluate(self.accelerator.unwrap_model(self.model), self.data, self.pad_id, self.device,
                                       self.config.eval.max_examples)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log_metrics(self, record: dict[str, Any]) -> None:
        if record["kind"] == "train" and not record.get("skipped"):
            self.overfitting.observe_train(record["loss"])
        if self.is_main:
            runs.append_run_line(self.run_dir, "metrics.jsonl", _json_line(record))
            if self.trackers is not None:
                self.trackers.log(record)

    def progress(self, total: int, done: int):  # noqa: ANN201 - a context manager yielding an update function
        from tunelab.console import training_progress

        return training_progress(total, done, enabled=self.show_progress and self.is_main)

    def validation_loss(self) -> dict[str, float]:
        """Token-weighted loss on the first ``eval.max_examples`` validation examples (the same ones every time)."""
        examples = self.data.validation[: self.config.eval.max_examples]
        with self.accelerator.autocast():  # float32 trainable and half-precision frozen weights meet as in training
            return validation_loss(self.inner_model, examples, self.objective.loss_sum, self.pad_id,
                                   self.config.eval.batch_size, self.device, self.accelerator)

    @property
    def inner_model(self) -> torch.nn.Module:
        """The model without accelerate's DDP wrapper: evaluation, generation and saving use it (the wrapper has no
        ``generate``, and its forward syncs buffers across processes, which uneven evaluation shares would hang)."""
        return self.accelerator.unwrap_model(self.model)

    def sample_outputs(self) -> list[str]:
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            return generate_samples(model, self.tokenizer, self.samples, self.config.eval.max_new_tokens, self.device,
                                    plain_text=_plain_text(self.data), batch_size=self.config.eval.batch_size)

    def evaluate(self, state: LoopState) -> str | None:
        """Validation loss, the training.eval_metrics on the sample prompts, and the overfitting signal; then the
        best-checkpoint and early-stopping rule on training.best_metric."""
        training = self.config.training
        result = self.validation_loss()
        if training.eval_metrics:  # every process generates the same greedy outputs, so all agree on "best"
            result.update(sample_scores(training.eval_metrics, self.sample_outputs(), [s["reference"] for s in self.samples]))
        state.last_eval = {"step": state.step, **result}
        signal = self.overfitting.update(result["loss"])
        state.gaps = self.overfitting.gaps
        record = {"kind": "eval", "step": state.step, **{k: v for k, v in result.items() if k != "tokens"}, **signal}
        self.log_metrics(record)
        self.progress_note = progress_note(record, training.best_metric)
        if is_better(result, state.best_eval, training.best_metric, metric_direction(training.best_metric, training.best_mode)):
            state.best_eval, state.best_step, state.evals_without_improvement = state.last_eval, state.step, 0
            if self.config.training.save_every or self.config.training.early_stopping_patience or self.config.training.restore_best:
                self.save_checkpoint(state)  # the best checkpoint is what restore_best loads at the end
        else:
            state.evals_without_improvement += 1
        patience = self.config.training.early_stopping_patience
        return "early_stop" if patience and state.evals_without_improvement >= patience else None

    def save_checkpoint(self, state: LoopState) -> None:
        if state.step == self.saved_step:  # best and periodic checkpoint (or Ctrl-C) at one step: nothing changed since
            return
        self.accelerator.wait_for_everyone()
        rngs = distributed.all_rng_states(ckpt.rng_state())  # every process's dropout stream, for an exact resume
        if self.is_main:
            root = runs.run_entry(self.run_dir, "checkpoints")
            model = self.accelerator.unwrap_model(self.model)
            rng = rngs[0] if len(rngs) == 1 else {**rngs[0], "ranks": rngs}
            ckpt.save_checkpoint(root, state.step, model, self.optimizer, self.scheduler, state.__dict__, rng,
                                 self.technique_state())
            ckpt.rotate(root, {state.step} | ({state.best_step} if state.best_step is not None else set()))
        self.accelerator.wait_for_everyone()
        self.saved_step = state.step


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"


def _base_evaluation(ctx: _Context, samples: list[dict[str, str]]) -> dict[str, Any] | None:
    """Validation loss and generations of the untouched model, computed once per run (before the technique)."""
    path = ctx.run_dir / "base_eval.json"
    before_after = ctx.config.eval.before_after and bool(ctx.data.validation)
    if not before_after and not ctx.config.eval.forgetting:
        return None
    # The settings the figures depend on: a resume with other eval.* settings must not compare base figures from
    # one validation subset with tuned figures from another. (The data cannot change on resume: fingerprinted.)
    settings = ctx.config.eval.model_dump(mode="json", exclude={"batch_size"})
    saved = read_json(path) if path.is_file() else None
    if saved is not None and saved.get("settings") == settings:
        return saved
    if saved is not None:
        log.info("eval settings changed since base_eval.json was computed: computing the base figures again")
    result: dict[str, Any] = {}
    if before_after:
        result = ctx.validation_loss()
        result["samples"] = generate_samples(ctx.inner_model, ctx.tokenizer, samples, ctx.config.eval.max_new_tokens,
                                             ctx.device, plain_text=_plain_text(ctx.data),
                                             batch_size=ctx.config.eval.batch_size)
    if ctx.config.eval.forgetting:
        result["forgetting"] = _heldout_loss(ctx, ctx.model)
    result["settings"] = settings
    if ctx.is_main:
        write_run_json(ctx.run_dir, path.name, result)
    return result


def _heldout_loss(ctx: _Context, model: torch.nn.Module) -> dict[str, float]:
    return heldout_loss(model, ctx.tokenizer, ctx.config.eval.forgetting_max_tokens, ctx.device,
                        ctx.config.eval.forgetting_text, ctx.config.eval.batch_size)


def _forgetting(ctx: _Context, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The forgetting check on the weights being saved, against the base figure measured before training."""
    if not ctx.config.eval.forgetting:
        return None
    if not base or "forgetting" not in base:  # e.g. switched on at --resume, after the base was measured
        return {"note": "no held-out loss of the base model was measured for this run, so no forgetting check"}
    check = forgetting_check(base["forgetting"], _heldout_loss(ctx, ctx.accelerator.unwrap_model(ctx.model)),
                             ctx.config.eval.forgetting_threshold, ctx.config.eval.forgetting_text)
    if check["flagged"]:
        log.warning(forgetting_message(check))
    return check


def _plain_text(data: PreparedData) -> bool:
    return bool(data.validation_examples) and not data.validation_examples[0].messages


def _save_result(ctx: _Context) -> Path:
    """Write the adapter or model (atomically: into a temporary folder, then renamed) and the tokenizer."""
    model = ctx.accelerator.unwrap_model(ctx.model)
    name = ctx.technique.result_dir_name
    with runs.new_run_folder(ctx.run_dir, name) as tmp:
        written = ctx.technique.save(model, tmp)  # a technique saves into <folder>/<result_dir_name>
        if name == "model":
            ctx.tokenizer.save_pretrained(written)  # a full model folder is self-contained
        for item in list(written.iterdir()):  # lift it into the entry's own temporary folder
            item.rename(tmp / item.name)
        written.rmdir()
    with runs.new_run_folder(ctx.run_dir, "tokenizer") as tmp:
        ctx.tokenizer.save_pretrained(tmp)
    return ctx.run_dir / name


def _best_is_restored(ctx: _Context, state: LoopState) -> bool:
    return ctx.config.training.restore_best and state.best_step is not None and state.best_step != state.step


NO_VALIDATION_NOTE = ("no validation data, so no before/after figures: set data.val_size above 0 or give "
                      "data.validation")


def _final_evaluation(ctx: _Context, state: LoopState, base: dict[str, Any] | None, samples: list[dict[str, str]]) -> dict[str, Any]:
    """Before/after figures of the weights being saved: the restored best ones, or the last ones."""
    forgetting = _forgetting(ctx, base)
    if not ctx.data.validation:  # eval.json is still written: it says why it holds no figures
        return {"step": state.step, "weights_from_step": state.step, "tuned": None, "note": NO_VALIDATION_NOTE,
                **({"forgetting": forgetting} if forgetting else {})}
    best_restored = _best_is_restored(ctx, state)
    if best_restored:
        tuned = state.best_eval
    elif state.last_eval and state.last_eval["step"] == state.step:
        tuned = state.last_eval
    else:
        tuned = ctx.validation_loss()
    tuned = {k: v for k, v in tuned.items() if k != "step"}
    evaluation: dict[str, Any] = {"step": state.step, "weights_from_step": state.best_step if best_restored else state.step,
                                  "tuned": tuned}
    if base is not None and "loss" in base:
        outputs = ctx.sample_outputs() if ctx.is_main else []
        evaluation["base"] = {k: v for k, v in base.items() if k not in ("samples", "forgetting", "settings")}
        evaluation["loss_change"] = round(tuned["loss"] - base["loss"], 6)
        evaluation["relative_loss_change"] = round((tuned["loss"] - base["loss"]) / base["loss"], 4) if base["loss"] else None
        evaluation["samples"] = [{**s, "base": b, "tuned": t} for s, b, t in zip(samples, base["samples"], outputs)]
        if ctx.is_main and ctx.config.eval.metrics:  # task metrics of the samples, with paired bootstrap intervals
            evaluation["metrics"] = compare_samples(ctx.config.eval.metrics, base["samples"], outputs,
                                                    [s["reference"] for s in samples], seed=ctx.config.training.seed)
    if forgetting:
        evaluation["forgetting"] = forgetting
    return evaluation


def train(config: TunelabConfig, resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` with ``config.technique``; see the module docstring."""
    with _library_progress_bars(progress):
        return _train(config, resume, progress)


@contextmanager
def _library_progress_bars(enabled: bool) -> Iterator[None]:
    """progress=False (a script, a test) also quiets transformers' own bars ("Loading weights"), then restores them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _train(config: TunelabConfig, resume: bool, progress: bool) -> RunResult:
    training_precision(config.model.dtype, default_device())  # a refusal (float16 on a CPU) before any folder exists
    created = not Path(config.output.dir or "runs/run").exists()
    run_dir = distributed.main_decides(lambda: prepare_run_dir(config, resume))  # one process claims the folder
    try:
        return _train_in(config, run_dir, resume, progress, created)
    finally:
        runs.release_lock(run_dir)


def _train_in(config: TunelabConfig, run_dir: Path, resume: bool, progress: bool, created: bool) -> RunResult:
    distributed.quiet_other_processes()
    note = training_precision(config.model.dtype, default_device()).note
    if note:
        log.warning(note)
    if resume:
        distributed.check_world_size((read_json(run_dir / "status.json") or {}).get("world_size"),
                                     distributed.process_state().num_processes, run_dir)
    ctx = _Context(config, run_dir, progress)
    state, phase = LoopState(), "set-up"
    try:
        if not resume:
            _write_status(ctx, "starting", state)
        with ctx.info.phase("set-up"):
            state, base, samples = _set_up(ctx, resume)
        if resume and ctx.is_main:  # only now, once the checkpoint, data and config all fit: a refused resume
            # changes nothing. One writer: two processes renaming the same temporary file race (one finds it gone).
            runs.write_run_text(run_dir, "config.yaml", config.to_yaml())
        _write_status(ctx, "running", state)
        phase, tokens_before = "loop", state.tokens_seen
        with ctx.info.phase("training"):
            status = _loop(ctx, state)
        ctx.info.figures["training_tokens_this_session"] = state.tokens_seen - tokens_before
        if status == "interrupted":
            _write_status(ctx, status, state)
            _finish_tracking(ctx, state, status)
            return RunResult(run_dir, status, state.step)
        phase = "trained"
        if _best_is_restored(ctx, state):
            phase = "best restored"
            ckpt.load_trainable(run_dir / "checkpoints" / ckpt.checkpoint_name(state.best_step), ctx.accelerator.unwrap_model(ctx.model))
            best = config.training.best_metric
            log.info("restored the best weights (step %d, %s %.4f)", state.best_step, best, state.best_eval[best])
        with ctx.info.phase("final evaluation"):
            evaluation = _final_evaluation(ctx, state, base, samples)
            evaluation.update(ctx.technique_evaluation())
        if ctx.is_main:
            with ctx.info.phase("saving"):
                _save_result(ctx)
            write_run_json(run_dir, "eval.json", evaluation)
    except BaseException as exc:
        _record_failure(ctx, state, phase, resume, exc, created)
        raise
    _write_status(ctx, status, state)
    _finish_tracking(ctx, state, status)
    if ctx.is_main:  # after status.json: the card states the final status
        write_card(run_dir, run_dir / ctx.technique.result_dir_name)
    return RunResult(run_dir, status, state.step, evaluation)


def _finish_tracking(ctx: _Context, state: LoopState, status: str) -> None:
    """run_info.json, and the end of the TensorBoard/MLflow logs."""
    if not ctx.is_main:
        return
    tokens = ctx.info.figures.pop("training_tokens_this_session", 0)
    write_run_json(ctx.run_dir, "run_info.json",
                   {"step": state.step, **ctx.info.as_dict(status, tokens, ctx.accelerator.num_processes)})
    if ctx.trackers is not None:
        ctx.trackers.close("FINISHED" if status in ("completed", "early_stopped") else "KILLED")


def _record_failure(ctx: _Context, state: LoopState, phase: str, resume: bool, exc: BaseException,
                    created: bool) -> None:
    """Leave the run folder resumable and say what happened in status.json."""
    if resume and phase == "set-up":  # a refused or failed resume: the run stays as it was, still resumable
        return
    if phase == "set-up":  # a pre-flight error: the run never started, so it leaves nothing behind
        if ctx.is_main:
            runs.release_run_dir(ctx.run_dir, created)
        return
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted and phase == "trained":  # Ctrl-C during the final evaluation: keep the trained steps
        ctx.save_checkpoint(state)
    _write_status(ctx, "interrupted" if interrupted else "failed", state, str(exc))
    try:
        _finish_tracking(ctx, state, "interrupted" if interrupted else "failed")
    except Exception as secondary:  # the run's own error is the one to report
        log.warning("could not write run_info.json: %s", secondary)


def _tokenizer_and_data(config: TunelabConfig) -> tuple[Any, PreparedData]:
    tokenizer = load_tokenizer(config.model)
    return tokenizer, prepare_data(config.data, tokenizer, cache_root() / "data")


def _set_up(ctx: _Context, resume: bool) -> tuple[LoopState, dict[str, Any] | None, list[dict[str, str]]]:
    """Tokenizer, data, model, base evaluation, technique, optimizer; then the checkpoint when resuming."""
    config, run_dir = ctx.config, ctx.run_dir
    set_seed(config.training.seed)
    ctx.tokenizer, ctx.data = distributed.main_decides(lambda: _tokenizer_and_data(config))  # tokenized once
    ctx.pad_id = ctx.tokenizer.pad_token_id
    if resume:
        check_same_data(run_dir, ctx.data.report)
    if ctx.is_main:
        write_run_json(run_dir, "data_report.json", ctx.data.report)
    if config.training.eval_every and not ctx.data.validation:
        raise ConfigError("training.eval_every needs validation data, and there is none: set data.val_size above 0 "
                          "or give data.validation (or leave eval_every unset)")
    ctx.model = load_model(config.model, ctx.device, ctx.technique.base_load(config.technique, ctx.device))
    _check_technique_fits(ctx)  # seconds, on a weightless copy: before the minutes of base evaluation
    samples = sample_prompts(ctx.tokenizer, ctx.data.validation_examples, config.eval.num_samples)
    ctx.samples = samples
    with ctx.info.phase("base evaluation"):
        base = _base_evaluation(ctx, samples)
    if config.training.gradient_checkpointing:
        enable_activation_checkpointing(ctx.model)
    ctx.plan = make_plan(config, ctx.data, ctx.accelerator.process_index, ctx.accelerator.num_processes)
    set_seed(config.training.seed)  # the technique's initialisation does not depend on whether base eval ran
    ctx.model = ctx.technique.apply(ctx.model, config.technique, RunContext(total_steps=ctx.plan.total_steps, tasks=tuple(ctx.data.tasks)))
    if keep_trainable_in_float32(ctx.model):  # mixed precision: float32 master weights, half-precision autocast
        log.info("trainable weights kept in float32; autocast computes in %s", ctx.precision.load_dtype)
    trainable, total = count_parameters(ctx.model)
    ctx.info.figures.update(trainable_parameters=trainable, total_parameters=total)
    log.info("technique %s: %s of %s parameters trainable (%.3f%%)", config.technique.name, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    ctx.optimizer = make_optimizer(ctx.model, config)
    ctx.scheduler = make_scheduler(ctx.optimizer, config.training.schedule, config.training.warmup_ratio,
                                   ctx.plan.total_steps)
    ctx.model, ctx.optimizer = ctx.accelerator.prepare(ctx.model, ctx.optimizer)
    ctx.model.train()
    state = LoopState()
    if resume:
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        state = LoopState(**ckpt.load_checkpoint(latest, ctx.accelerator.unwrap_model(ctx.model), ctx.optimizer, ctx.scheduler))
        saved_technique_state = ckpt.load_technique_state(latest)
        if saved_technique_state is not None and ctx.technique.state is not None:
            ctx.technique.state.load(ctx.accelerator.unwrap_model(ctx.model), *saved_technique_state)
        if ctx.accelerator.num_processes > 1:  # load_checkpoint restored the main's RNG; each rank gets its own
            saved = torch.load(latest / "rng.pt", weights_only=True)
            ckpt.restore_rng(distributed.rank_rng_state(saved, ctx.accelerator.process_index))
        state.history.append(f"resumed from {latest.name}")
        if state.step > ctx.plan.total_steps:
            raise ConfigError(f"--resume: the checkpoint is at step {state.step}, past the {ctx.plan.total_steps} steps "
                              "this config plans; raise training.max_steps (or epochs)")
        if ctx.is_main:
            truncate_metrics(run_dir, state.step)
        ctx.overfitting = OverfittingSignal(state.gaps)
    if config.training.report_to and ctx.is_main:
        from tunelab.tracking import Trackers

        ctx.trackers = Trackers(config.training.report_to, run_dir, yaml.safe_load(config.to_yaml()), resume)
    return state, base, samples


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers 5 renamed gradient_ to activation_)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_technique_fits(ctx: _Context) -> None:
    """Apply the technique to a weightless (meta-device) copy of the model, so a setting that does not fit it
    (a layer index, a module name) is reported at once, not after minutes of base evaluation."""
    base_load = ctx.technique.base_load(ctx.config.technique, ctx.device)
    skeleton = model_skeleton(ctx.model.config, base_load)  # the same module types as the loaded base
    try:
        ctx.technique.apply(skeleton, ctx.config.technique, RunContext(tasks=tuple(ctx.data.tasks)))
    except TechniqueError as exc:
        raise TechniqueError(f"{exc} (model {ctx.config.model.name})") from None


def _write_status(ctx: _Context, status: str, state: LoopState, error: str | None = None) -> None:
    if ctx.is_main:
        write_run_json(ctx.run_dir, "status.json", {
            "status": status, "step": state.step, "total_steps": ctx.plan.total_steps if ctx.plan else None,
            "nonfinite_skipped": state.nonfinite_skipped, "error": error,
            "world_size": ctx.accelerator.num_processes,
        })
