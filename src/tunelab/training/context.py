"""What a training run holds while it trains: the counters saved in every checkpoint (``LoopState``) and the
objects built once at set-up (``TrainingContext``), whose methods are the loop's side effects: metrics lines,
evaluations with the best-checkpoint and early-stopping rule, checkpoints, and the technique's hooks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab import checkpoint as ckpt
from tunelab import distributed, fs
from tunelab.config import TunelabConfig
from tunelab.console import training_progress
from tunelab.data import PreparedData
from tunelab.eval import validation_loss
from tunelab.eval.forgetting import heldout_loss
from tunelab.eval.training import OverfittingSignal, is_better, metric_direction, progress_note, sample_scores
from tunelab.generation import generate_samples
from tunelab.models import default_device
from tunelab.objectives import OBJECTIVES
from tunelab.precision import Precision, technique_precision
from tunelab.run_info import RunInfo
from tunelab.techniques import TECHNIQUES
from tunelab.training.plan import Plan
from tunelab.training.rollout import Rollouts

log = logging.getLogger(__name__)
PLAIN_PROGRESS_LINES = 20  # progress lines in a log file over a whole run, besides the evaluations


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
    train_losses: list[float] = field(default_factory=list)  # the logged training losses since the last evaluation
    rollout: dict[str, Any] | None = None  # an online objective's rollouts still to be reused (num_iterations > 1)


def run_precision(config: TunelabConfig) -> Precision:
    """How this run trains (``model.dtype`` on this device, and whether the technique loads its base itself)."""
    device, technique = default_device(), TECHNIQUES[config.technique.name]
    return technique_precision(config.model.dtype, device, technique.base_load(config.technique, device),
                               technique.cpu_bf16_refusal)


class TrainingContext:
    """Everything the loop needs, built once. Methods are the loop's side effects (logging, eval, saving)."""

    # Set by the session's set-up in the order it builds them (tokenizer and data first: the model needs the pad id).
    tokenizer: Any
    data: PreparedData
    pad_id: int
    model: torch.nn.Module
    plan: Plan | None = None
    rollouts: Rollouts | None = None  # an online objective's sampling and rewards (None: the data is the batch)
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def __init__(self, config: TunelabConfig, run_dir: Path, show_progress: bool) -> None:
        self.config, self.run_dir, self.show_progress = config, run_dir, show_progress
        self.saved_step: int | None = None  # the step of this process's last checkpoint
        self.technique = TECHNIQUES[config.technique.name]
        self.precision = run_precision(config)
        self.accelerator = distributed.make_accelerator(self.precision.mixed_precision)
        self.device = self.accelerator.device
        # training.distributed: fsdp on several processes; with one there is nothing to shard (_train_in says so)
        self.sharded = config.training.distributed == "fsdp" and self.accelerator.num_processes > 1
        self.objective_kind = OBJECTIVES[config.objective.name]  # what it declares: head, units, reference
        self.objective = self.objective_kind.bind(config.objective)  # the loss the loop calls; set-up binds the reference
        self.info = RunInfo()  # run_info.json: phases, parameters, memory, versions
        self.info.figures["precision"] = {"dtype": str(self.precision.load_dtype).removeprefix("torch."),
                                          "autocast": self.precision.mixed_precision, "reason": self.precision.reason}
        self.samples: list[dict[str, str]] = []  # validation prompts generated at evaluations
        self.overfitting = OverfittingSignal()
        self.progress_note = ""  # the last evaluation, as the progress bar shows it
        self.trackers: Any = None  # training.report_to (TensorBoard, MLflow), main process only

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def inner_model(self) -> torch.nn.Module:
        """The model without accelerate's DDP wrapper: evaluation, generation and saving use it (the wrapper has no
        ``generate``, and its forward syncs buffers across processes, which uneven evaluation shares would hang).
        A sharded model has no wrapper: it is itself, and each of its forwards is a collective."""
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------ the technique's hooks

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
        if self.technique.evaluate is None or not (self.is_main or self.sharded):  # sharded: every process's forwards
            return {}
        return self.technique.evaluate(self.accelerator.unwrap_model(self.model), self.data, self.pad_id, self.device,
                                       self.config.eval.max_examples)

    # ------------------------------------------------------------ progress and metrics

    def progress(self, total: int, done: int):  # noqa: ANN201 - a context manager yielding an update function
        # off a terminal: a plain line at most every 5% of the run (and at each evaluation), never more often than
        # the metrics lines
        every = max(self.config.training.log_every, -(-total // PLAIN_PROGRESS_LINES))
        return training_progress(total, done, enabled=self.show_progress and self.is_main, plain_every=every)

    def write_status(self, status: str, state: LoopState, error: str | None = None) -> None:
        """status.json, atomically (a reader never sees half a file): written at set-up, at every metrics line and
        evaluation while running (so it follows metrics.jsonl), and at the end."""
        if self.is_main:
            fs.write_entry_json(self.run_dir, "status.json", {
                "status": status, "step": state.step, "total_steps": self.plan.total_steps if self.plan else None,
                "nonfinite_skipped": state.nonfinite_skipped, "error": error,
                "world_size": self.accelerator.num_processes,
            })

    def log_metrics(self, record: dict[str, Any]) -> None:
        if record["kind"] == "train" and not record.get("skipped"):
            self.overfitting.observe_train(record["loss"])
        if self.is_main:
            fs.append_entry_line(self.run_dir, "metrics.jsonl", json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    # ------------------------------------------------------------ measuring the model

    @property
    def head_size(self) -> int | None:
        """Outputs of the head the objective trains (None: the causal LM head), for the classes of this data."""
        return self.objective_kind.head_size(self.data.classes)

    def validation_loss(self) -> dict[str, float]:
        """Token-weighted loss on the first ``eval.max_examples`` validation examples (the same ones every time).
        Unsharded, each process takes its share of the batches; sharded, every process runs every batch (a share
        each would give the processes different numbers of forwards, and each forward waits for all of them)."""
        examples = self.data.validation[: self.config.eval.max_examples]
        if self.rollouts is not None:  # an online objective: minus the mean reward of greedy completions
            return self.rollouts.validation(self.inner_model, examples, self.config.eval.batch_size)
        split = None if self.sharded else self.accelerator
        with self.accelerator.autocast():  # float32 trainable and half-precision frozen weights meet as in training
            figures = validation_loss(self.inner_model, examples, self.objective.loss_sum, self.pad_id,
                                      self.config.eval.batch_size, self.device, split, self.objective.collate)
        if not self.objective_kind.perplexity:  # exp(loss) of a classifier's or a preference loss means nothing
            figures.pop("perplexity", None)
        derive = self.objective.derive
        return {**figures, **derive(figures)} if derive else figures

    def heldout_loss(self) -> dict[str, float]:
        """Loss on general held-out text (the forgetting check), without autocast."""
        return heldout_loss(self.inner_model, self.tokenizer, self.config.eval.forgetting_max_tokens, self.device,
                            self.config.eval.forgetting_text, self.config.eval.batch_size)

    @property
    def sharded_io(self) -> tuple[ckpt.WeightsInto, ckpt.OptimizerInto] | None:
        """How a checkpoint's full tensors go into this run's model and optimizer: None unless sharded."""
        return (distributed.load_full_weights, distributed.load_full_optimizer_state) if self.sharded else None

    def sample_outputs(self) -> list[str]:
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            return self.greedy_samples(model)

    def greedy_samples(self, model: torch.nn.Module) -> list[str]:
        """``model``'s greedy generations of the validation sample prompts."""
        plain_text = bool(self.data.validation_examples) and not self.data.validation_examples[0].messages
        return generate_samples(model, self.tokenizer, self.samples, self.config.eval.max_new_tokens,
                                plain_text=plain_text, batch_size=self.config.eval.batch_size)

    # ------------------------------------------------------------ evaluations and checkpoints during training

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
        self.write_status("running", state)
        self.log_metrics(record)
        self.progress_note = progress_note(record, training.best_metric)
        higher = metric_direction(training.best_metric, training.best_mode, self.objective_kind.metrics)
        if is_better(result, state.best_eval, training.best_metric, higher):
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
        if self.rollouts is not None:  # rollouts that later steps reuse are part of the run's state
            state.rollout = self.rollouts.saved(state.step)
        state.train_losses = self.overfitting.pending
        rngs = distributed.all_rng_states(ckpt.rng_state())  # every process's dropout stream, for an exact resume
        gathered = None  # sharded: the full weights and optimizer state, gathered by every process for the main
        if self.sharded:
            gathered = (distributed.full_trainable_weights(self.model),
                        distributed.full_optimizer_state(self.model, self.optimizer))
        if self.is_main:
            root = fs.own_entry(self.run_dir, "checkpoints")
            model = self.accelerator.unwrap_model(self.model)
            rng = rngs[0] if len(rngs) == 1 else {**rngs[0], "ranks": rngs}
            ckpt.save_checkpoint(root, state.step, model, self.optimizer, self.scheduler, state.__dict__, rng,
                                 self.technique_state(), gathered)
            ckpt.rotate(root, {state.step} | ({state.best_step} if state.best_step is not None else set()))
        self.accelerator.wait_for_everyone()
        self.saved_step = state.step
