"""What every objective provides, so the registry can check it and the loop, the model loader, config validation
and the docs can stay objective-agnostic.

An objective declares, in one place (its own file):
- its settings (``config_class``, a Settings class whose ``name`` is a ``Literal``): the config's ``objective``
  section is the union of them, keyed on ``name``;
- its loss: ``loss_sum(model, batch, settings, reference)`` returns the loss *summed* over the batch's units and
  how many units it saw; ``count_units(batch[, settings])`` counts them before the forward pass, so the loop knows the whole
  window's normaliser before the first backward (``units`` names them: tokens, pairs, examples);
- the batch it trains on: ``collate(rows, pad_id)`` turns the plan's rows (of the records the data layer
  tokenized for it) into tensors;
- the model head it needs (``num_labels``: None for the causal LM head, 1 for a scalar score head), from which
  the PEFT task type follows (``task_type``), so an adapter technique wraps the right head and saves it;
- whether it compares with a reference policy (``needs_reference``): the technique's disabled view of the same
  model (an adapter switched off), else a frozen copy, or log-probs computed once before training;
- the per-unit figures it logs (``metrics``: returned as sums in ``LossSum.stats``, logged as means), and whether
  its loss has a perplexity (``perplexity``: exp of a mean next-token cross-entropy);
- what it cannot work with (``refuses``: feature -> reason, e.g. packing), in the same matrix as techniques;
- for an online objective (records: prompts), ``prepare``: how the completions the training layer sampled and
  scored (a ``Rollout``) become the batch its loss reads, so the loop stays one function for every objective;
- why the base model's figures may not be cached across runs, if so (``base_figures_uncached``: a new, randomly
  initialised head; rewards from the user's code);
- a module it trains beside the model (``own_module``, e.g. PPO's value head): attached to the prepared model, so
  it trains, is checkpointed and resumes with the technique's weights, and saved apart from the result;
- how ``tunelab eval`` scores a finished model of it on held-out records (``evaluation``, see ``Evaluation``);
  without one, a run is evaluated as SFT (loss and generations);
- what its loss holds in memory at once, from the head's output shape (``loss_memory``, see ``HeadOutput``), and
  how many rows of which lengths a record becomes in a batch (``batch_rows``: a pair is two rows): the memory
  planner (``tunelab plan``) reads them instead of knowing how each loss lays out its batch and computes its logits;
  for an online objective, what its ``prepare`` holds when it scores the sampled completions (``rollout_memory``),
  and the finished runs its rollout loads beside the model to score them (``scoring_runs``: reward model runs).
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
from torch import nn

from tunelab.data import collate
from tunelab.metrics import Metric
from tunelab.settings import Settings

Batch = dict[str, torch.Tensor]
# The reference policy as the loss sees it: entering it gives the model to score with (the same model with its
# adapter switched off, or a frozen copy), always under torch.no_grad.
Reference = Callable[[nn.Module], AbstractContextManager[nn.Module]]
NO_STATS: Mapping[str, torch.Tensor] = MappingProxyType({})
PER_CLASS = 0  # Objective.num_labels of a head with one output per class the data holds


class LossSum(NamedTuple):
    loss_sum: torch.Tensor  # scalar, summed (not averaged) over the units of this micro-batch
    num_units: int  # supervised tokens for SFT, pairs for preference objectives; the loop normalises by the total
    stats: Mapping[str, torch.Tensor] = NO_STATS  # per-unit figures summed over the units (logged as sum / units)


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the loop calls: a loss over one micro-batch and the count of its units, with the settings and the
    reference already bound (``Objective.bind``), and how rows become a batch."""

    loss_sum: Callable[[nn.Module, Batch], LossSum]
    count_units: Callable[[Batch], int]
    summary: str = ""
    collate: Callable[[list[list[Any]], int], Batch] = collate
    derive: Callable[[Mapping[str, float]], dict[str, float]] | None = None
    # an online objective: (model, rollout) -> the batch the loss reads (advantages, log-probs it compares with)
    prepare: Callable[[nn.Module, Any], Batch] | None = None


# Why an objective's base figures are never cached (Objective.base_figures_uncached)
NEW_HEAD = "its new head starts at random in every run"
USER_REWARDS = ("its validation figure is a reward computed by the user's code (a function, a reward model), which "
                "can change with nothing the cache key sees")


@dataclass(frozen=True)
class Evaluation:
    """How ``tunelab eval`` scores a model of an objective, one unit (a pair, a labeled text) at a time.

    Each metric is a ``metrics.Metric`` over per-unit statistics (a score is a function of their sum), so every
    one gets paired bootstrap intervals against the base and against ``baseline``, a rule that needs no model
    (chance, the majority class), computed from the records alone."""

    records: str  # the record kind the evaluation data must hold (data.formats.RECORD_KINDS)
    # (class names) -> the metrics, in report order; the first is the primary one (ranks the biggest changes)
    metrics: Callable[[list[str]], list[Metric]]
    collate: Callable[[list[list[Any]], int], Batch] | None = None  # those records' rows -> a batch
    # (model, batch) -> metric name -> (B, k) statistics of each unit of the batch, without gradients
    unit_stats: Callable[[nn.Module, Batch], dict[str, torch.Tensor]] | None = None
    # A policy trained on rewards (online objectives) is scored by what it answers: each held-out prompt's greedy
    # completion, rewarded by the run's own rewards (objective.rewards, whose settings say how: `max_completion_length`
    # bounds the answer). The eval layer does the generating and scoring; collate and unit_stats are then unused.
    rewarded_answers: bool = False
    # (one batch of every record, class names) -> the baseline's name in reports ('chance', 'majority class
    # (function)') and its statistics, as unit_stats gives them; None: no baseline
    baseline: Callable[[Batch, list[str]], tuple[str, dict[str, torch.Tensor]]] | None = None
    # (one unit's statistics, class names) -> what the model did with it, in words (predictions.jsonl, reports)
    describe: Callable[[Mapping[str, list[float]], list[str]], str] = lambda stats, classes: ""
    # the statistic holding each unit's one-hot (true, predicted) cell, when the model's head has classes
    # (config.id2label): the report then shows the confusion matrix; None: no classes
    confusion: str | None = None


@dataclass(frozen=True)
class OwnModule:
    """A module an objective trains beside the model (PPO's value head). The training set-up attaches it to the
    prepared model as the attribute ``name``: its parameters join the optimizer, every checkpoint, the resume and
    the best-weights restore with the technique's own. The result is saved without it (it still opens in plain
    transformers or PEFT), and the module is saved beside it as ``<name>.safetensors`` in the run folder."""

    name: str
    build: Callable[[nn.Module, Any], nn.Module]  # (the prepared model, the objective's settings) -> a new module

    @property
    def file_name(self) -> str:
        return f"{self.name}.safetensors"


def attach_own_module(own: OwnModule | None, model: nn.Module, settings: Any) -> None:
    """Give ``model`` the objective's own module (nothing when it has none)."""
    if own is not None:
        setattr(model, own.name, own.build(model, settings))


@contextmanager
def without_own_module(own: OwnModule | None, model: nn.Module) -> Iterator[nn.Module | None]:
    """``model`` with the objective's own module taken off (yielded; None when there is none), then put back:
    how the result is saved without it."""
    module = getattr(model, own.name, None) if own is not None else None
    if module is None:
        yield None
        return
    delattr(model, own.name)
    try:
        yield module
    finally:
        setattr(model, own.name, module)


@dataclass(frozen=True)
class HeadOutput:
    """The head's output a loss reads, as the memory planner sees it on the skeleton (no weight read): N rows
    (supervised positions; sequences for a score head) x V columns (the vocabulary; classes or scores)."""

    rows: int  # N
    columns: int  # V
    hidden: int  # H: the head's input width (0 when the planner cannot see it)
    element_bytes: int  # bytes per element of the head's matmul output: 2 under bfloat16/float16, else 4
    trainable: bool  # the head's weight trains: its (V, H) gradient is made by the loss
    plain: bool  # the head is a plain nn.Linear (no technique wraps it), which a loss may run itself


def one_row(record: Any) -> tuple[int, ...]:
    """The default batch layout: a record is one row of its own length (packed rows are planned apart)."""
    return (len(record.input_ids),)


def full_logits_memory(head: HeadOutput) -> tuple[int, ...]:
    """Bytes of the tensors a loss over whole logits holds at once (the default): the head's (N, V) output, its
    float32 copy when it is not float32 already, cross-entropy's saved (N, V) float32 log-softmax and the two
    (N, V) float32 gradients of backward, and the (N,) int64 targets."""
    cells = head.rows * head.columns
    copy = 4 * cells if head.element_bytes != 4 else 0
    return (head.element_bytes * cells, copy, 4 * cells, 4 * cells, 4 * cells, 8 * head.rows)


def scoring_pass_memory(head: HeadOutput) -> tuple[int, ...]:
    """Bytes of the tensors a pass that scores completion tokens without gradients holds at once (token log-probs:
    ``cross_entropy(logits.float(), targets, reduction="none")``): the head's (N, V) output, its float32 copy when
    it is not float32 already, and cross-entropy's (N, V) float32 log-softmax."""
    cells = head.rows * head.columns
    return (head.element_bytes * cells, 4 * cells if head.element_bytes != 4 else 0, 4 * cells)


def no_scoring_pass(head: HeadOutput) -> tuple[int, ...]:
    """The default ``rollout_memory``: the rollout's batch is made without scoring the completions."""
    return ()


@dataclass(frozen=True)
class Objective:
    name: str
    config_class: type[Settings]
    loss_sum: Callable[..., LossSum]  # (model, batch[, settings[, reference]]), see bind
    count_units: Callable[[Batch], int]
    units: str
    summary: str
    collate: Callable[[list[list[Any]], int], Batch] = collate
    num_labels: int | None = None  # None: the causal LM head; k: a sequence-classification head with k outputs;
    # PER_CLASS: one output per class of the data (classification), known once the data is read (``head_size``)
    records: str = "sft"  # the records it trains on, as the data layer names them (PreparedData.records)
    needs_reference: bool = False
    metrics: tuple[str, ...] = ()
    # Whether exp(validation loss), the perplexity, means anything: only where the loss is a mean next-token
    # cross-entropy (SFT). A classifier's, reward model's or preference loss is not, so no perplexity is shown.
    perplexity: bool = False
    # With ``reference: precomputed``: (base model, {split: records}, pad_id, batch_size, device, run_dir, write)
    # -> the records with the reference's log-probs attached, computed once before training.
    precompute: Callable[..., dict[str, list[Any]]] | None = None
    refuses: Mapping[str, str] = field(default_factory=dict)
    # Figures computed from the per-unit means of a whole evaluation (e.g. macro-F1 from the confusion shares),
    # which no per-unit sum gives: (figures) -> the derived ones, added beside them.
    derive: Callable[[Mapping[str, float]], dict[str, float]] | None = None
    # An online objective (records="prompt"): (model, rollout[, settings[, reference]]) -> the batch its loss reads,
    # from the completions the training layer sampled and scored (objectives.online.Rollout).
    prepare: Callable[..., Batch] | None = None
    # Whether these settings compare with the reference at all (e.g. GRPO only when beta > 0): when False, no
    # reference is set up, no frozen copy made and no reference pass runs. None: always, when needs_reference.
    reference_when: Callable[[Any], bool] | None = None
    # Why the untouched model's figures (base_eval.json) may NOT be reused by another run of the same base, data
    # and settings (None: they may): a new head (num_labels set), whose random initial weights belong to one run
    # only; a validation figure computed by the user's code (rewards), which can change with no change the key sees.
    base_figures_uncached: str | None = None
    evaluation: Evaluation | None = None  # how `tunelab eval` scores its models; None: as SFT
    own_module: OwnModule | None = None  # a module trained beside the model (PPO's value head), see OwnModule
    # (the head's output) -> bytes of each tensor its loss holds at once at its largest moment, beyond what the
    # model's forward saved; the planner counts all of them at the top of backward, and those small enough to stay
    # in the heap at its end. Default: a loss over the whole (N, V) logits.
    loss_memory: Callable[[HeadOutput], tuple[int, ...]] = full_logits_memory
    # (one training record[, settings]) -> the lengths of the rows its loss's batch makes of it (a pair: its chosen
    # and rejected sides, each a row of its own; an online objective: its sampled completions). The memory planner's
    # micro-batch is micro_batch_size records of that many rows, each padded to the longest row. Default: one row,
    # the record's own length.
    batch_rows: Callable[..., tuple[int, ...]] = one_row
    # (one training record[, settings]) -> the most positions its loss scores (the head's rows), where the objective
    # makes its own targets (an online objective: its completions' tokens); None: the data's supervised share.
    batch_targets: Callable[..., int] | None = None
    # An online objective (``prepare``): (the head's output at the completions' tokens[, settings]) -> bytes of each
    # tensor its ``prepare`` holds at once when it scores the sampled completions without gradients (the sampling
    # policy's or the reference's log-probs). The planner's ``generation`` phase (the rollout) counts the larger of
    # the sampling (its KV cache and logits) and this. Default: no scoring pass.
    rollout_memory: Callable[..., tuple[int, ...]] = no_scoring_pass
    # The run folders (as the settings give them) of the models its rollout loads for the whole run to score the
    # sampled completions (an online objective's reward model runs): the planner counts each one's weights beside
    # the policy's. Default: none.
    scoring_runs: Callable[[Any], tuple[str, ...]] = lambda settings: ()

    def wants_reference(self, settings: Settings) -> bool:
        return self.needs_reference and (self.reference_when is None or self.reference_when(settings))

    @property
    def task_type(self) -> str:
        """The PEFT task type of the head: an adapter on a score head must save that head (modules_to_save)."""
        return "CAUSAL_LM" if self.num_labels is None else "SEQ_CLS"

    def head_size(self, classes: list[str]) -> int | None:
        """The head's outputs for data with these classes (None: the causal LM head)."""
        return len(classes) if self.num_labels == PER_CLASS else self.num_labels

    def bind(self, settings: Settings, reference: Reference | None = None) -> ObjectiveSpec:
        """The loss as the loop calls it, ``(model, batch)``: loss_sum takes (model, batch), (model, batch,
        settings) or (model, batch, settings, reference), as much as it needs."""
        return ObjectiveSpec(_bound(self.loss_sum, 2, settings, reference), _bound(self.count_units, 1, settings, reference),
                             self.summary, self.collate, self.derive,
                             _bound(self.prepare, 2, settings, reference) if self.prepare is not None else None)

    def rows_of(self, record: Any, settings: Settings) -> tuple[int, ...]:
        """``batch_rows`` of one record under these settings (it takes them or not)."""
        return _bound(self.batch_rows, 1, settings, None)(record)

    def targets_of(self, record: Any, settings: Settings) -> int | None:
        """``batch_targets`` of one record under these settings; None when the objective does not declare them."""
        return None if self.batch_targets is None else _bound(self.batch_targets, 1, settings, None)(record)

    def rollout_memory_of(self, head: HeadOutput, settings: Settings) -> tuple[int, ...]:
        """``rollout_memory`` under these settings (it takes them or not)."""
        return _bound(self.rollout_memory, 1, settings, None)(head)

    def refusal(self, feature: str) -> str | None:
        return self.refuses.get(feature)


def _bound(function: Callable[..., Any], arity: int, settings: Settings, reference: Reference | None) -> Callable[..., Any]:
    """``function`` called with its first ``arity`` arguments, then as many of (settings, reference) as it takes."""
    extra = (settings, reference)[: len(inspect.signature(function).parameters) - arity]
    return function if not extra else lambda *args: function(*args, *extra)
