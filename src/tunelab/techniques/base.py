"""What every technique provides, so the registry can check it and the loop, the model loader, config validation,
merge and the docs can stay technique-agnostic.

A technique declares, in one place:
- how its base model is loaded (``base_load``: a quantization config, a dtype, a device map);
- how it changes the model (``prepare``), with the run's step count when there is a run;
- what it is compatible with (``refuses``: feature -> reason), read by config validation and rendered as the
  docs' compatibility table;
- its optimizer parameter groups (``param_groups``), an optional per-step hook (``on_step``), an optional loss
  term of its own (``penalty``) and any state that a checkpoint must keep beyond the weights (``state``);
- how its result is saved, reloaded (``load_result``) and merged (``merge``);
- how its result opens: which ``adapter_config.json`` types it writes (``adapter_types``) and the loader that
  attaches such a folder to a plain base model (``attach``), so one function opens any result folder;
- whether its result can share a mixed-adapter batch in ``tunelab serve`` (``mixed_batch``), and how such a batch
  computes its rows (``row_forward``);
- what ``generate`` needs to compute what the prepared model computes (``generation_view``);
- what its model card shows (``card``) and how the console shows its own eval figures (``figure_tables``).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from tunelab.models import (BaseLoad, adapter_num_labels, apply_head_config, head_class, load_model, resolve_dtype,
                            saved_head_config, saved_num_labels)
from tunelab.settings import Settings


# The features a technique may refuse, with the column title of the docs' compatibility table. An objective
# appears as "objective:<name>" (one column per registered objective).
FEATURES: dict[str, str] = {
    "packing": "packing",
    "gradient_checkpointing": "gradient checkpointing",
    "merge": "merge",
    "quantized_base": "4/8-bit base",
    "score_head": "score head",  # objectives that train a sequence-classification / scalar head (reward, ...)
    "fsdp": "sharded (fsdp)",  # training.distributed: fsdp, weights sharded over the processes
}
OBJECTIVE_PREFIX = "objective:"

# The two result folders a run can end with: an adapter for its base, or a standalone transformers model.
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
RESULT_DIRS = (ADAPTER_DIR, MODEL_DIR)
ADAPTER_CONFIG = "adapter_config.json"  # every adapter folder's description (PEFT's file name, kept by tunelab's own)

# Reasons shared by several techniques.
STANDALONE = "nothing to merge: the result in model/ is already a standalone transformers model"
TRAINS_BASE_WEIGHTS = "it trains the base weights themselves, and 4/8-bit weights take no gradient updates"
NOT_QUANTIZED = "this technique loads a full-precision base; technique 'qlora' is the one that trains on a 4/8-bit base"
VIRTUAL_TOKENS = ("it learns virtual tokens (or keys and values) fed to the model, not a change to any weight: "
                  "there is nothing to fold into the weights; keep the adapter and load it with PEFT")
NO_SCORE_HEAD = ("its adapter layers are saved on their own, without a model head, so a newly trained score head "
                 "would be lost; use lora or full")
OUTSIDE_THE_MODEL = ("its trainable weights sit beside the transformers model (PEFT's prompt encoder), outside the "
                     "decoder layers fsdp shards; use training.distributed: ddp")
NO_POSITION_IDS = ("PEFT drops the per-example position ids of prompt-learning methods, so examples packed in one "
                   "row would attend to each other; each example gets its own row instead")


@dataclass(frozen=True)
class TechniqueState:
    """State a technique keeps outside the parameters and the optimizer (e.g. AdaLoRA's sensitivity EMAs). Each
    checkpoint saves it, so that a resumed run continues exactly as an uninterrupted one would.

    ``save(model)`` returns (tensors by name, JSON-able extras); ``load(model, tensors, extras)`` restores them."""

    save: Callable[[nn.Module], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    load: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any]], None]


@dataclass(frozen=True)
class RunContext:
    """What a technique may need to know about the run when it prepares the model.

    ``total_steps`` is None when the model is a weightless skeleton (the fit check, ``tunelab techniques``)."""

    total_steps: int | None = None
    # The run's sorted task names (an example's task_id indexes them); () for data without tasks; None when
    # there is no data (parameter counts on a skeleton).
    tasks: tuple[str, ...] | None = None
    # The PEFT task type of the head the objective trains ("CAUSAL_LM", or "SEQ_CLS" for a score head, which
    # PEFT then trains and saves with the adapter as modules_to_save): the objective decides, the technique asks.
    task_type: str = "CAUSAL_LM"
    # The run's tokenized training examples and padding id, for a technique that measures something on the data
    # before the first step (adapter routing centres its routers' input); () where there is no data.
    examples: Sequence[Any] = ()
    pad_id: int = 0


def peft_task_type(context: RunContext | None) -> str:
    """The task type a PEFT config is built with: the run's objective's, else the causal LM's."""
    return (context or RunContext()).task_type


def plain_load(settings: Settings, device: torch.device, num_labels: int | None = None) -> BaseLoad:
    return BaseLoad()


@dataclass(frozen=True)
class MergeResult:
    model: nn.Module  # a plain transformers model (no adapter modules)
    note: str  # what was merged into what, printed and saved with the merge check


@dataclass(frozen=True)
class CardUsage:
    """What a result's model card says about loading it without tunelab: the Hub's ``library_name`` and a Python
    snippet, in which ``{folder}`` stands for the result folder's name."""

    library: str
    load: str


PLAIN_MODEL_CARD = CardUsage("transformers", "from transformers import AutoModelForCausalLM\n"
                                             "model = AutoModelForCausalLM.from_pretrained('{folder}')")
PEFT_ADAPTER_CARD = CardUsage("peft", "from peft import AutoPeftModelForCausalLM\n"
                                      "model = AutoPeftModelForCausalLM.from_pretrained('{folder}')  "
                                      "# needs the base named in adapter_config.json")
TUNELAB_ADAPTER_CARD = CardUsage("tunelab", "import tunelab\nfrom transformers import AutoModelForCausalLM\n"
                                            "base = AutoModelForCausalLM.from_pretrained(BASE)  "
                                            "# the base named in adapter_config.json\n"
                                            "model = tunelab.load_adapter(base, '{folder}')")


@dataclass(frozen=True)
class FigureTable:
    """One table of a technique's own eval figures, for the console: a title, column names and rows of text
    (the first column is a label, the others are right-aligned figures)."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""  # a line printed under the table (what the figures mean: a verdict)


# Why a result is served alone rather than in a batch shared with other adapters: PEFT runs several adapters
# in one batch (``adapter_names``) for plain LoRA adapters only.
ALONE_IN_SERVE = ("not a LoRA adapter: PEFT shares one batch between adapters (adapter_names) for LoRA adapters "
                  "only, so this result is served alone")


def served_alone(folder: Path) -> str | None:
    """The default ``mixed_batch``: the result never shares a batch with other adapters."""
    return ALONE_IN_SERVE


@dataclass(frozen=True)
class Technique:
    """One technique family.

    - ``prepare(model, settings, context)`` freezes what must not train and injects any new modules. It returns
      the model to train; trainable parameters are exactly those with ``requires_grad``. A two-argument
      ``prepare(model, settings)`` is accepted too (it ignores the run context).
    - ``save(model, run_dir)`` writes the result in its standard format and returns the folder.
    - ``result_dir_name`` is 'adapter' (a standard PEFT adapter) or 'model' (a plain transformers model).
    - ``load_result(config, folder, device)`` rebuilds the trained model from that folder (``tunelab.load_run``
      calls it); the default opens a plain transformers model or the configured base with a PEFT adapter.
    - ``base_load(settings, device, num_labels)`` says how the base is loaded (``models.load_model`` and the
      meta-device skeleton both use it), with the head the objective trains (``num_labels``: None for the causal
      LM head, else a new score head's outputs); a two-argument ``base_load(settings, device)`` is accepted too.
    - ``refuses`` maps a feature of ``FEATURES`` (or ``objective:<name>``) to the reason it cannot work; what
      is not listed is supported.
    - ``param_groups(model, settings, lr, weight_decay)`` gives the optimizer's parameter groups.
    - ``on_step(model, settings, step)`` runs after each optimizer update, before gradients are cleared; a dict
      it returns is added to that step's metrics.jsonl line.
    - ``penalty(model, settings)`` is a loss term of the technique's own (a scalar tensor, or None when it is
      off), added once per optimizer step, as one big batch's forward would add it, so that gradient
      accumulation still equals the big batch.
    - ``state`` saves and restores what the technique keeps beyond its weights, in every checkpoint.
    - ``evaluate(model, data, pad_id, device, max_examples)`` returns the technique's own figures for eval.json
      (a dict merged into it), computed on the trained model and the run's PreparedData.
    - ``merge(config, folder, device)`` folds the result into a standalone model (only when "merge" is not
      refused); the default merges a PEFT adapter into the base it was trained on.
    - ``variant_names`` maps names a user may try for one of its variants ('dora') to the settings that choose
      that variant here ({'use_dora': True}): config loading turns such a ``technique.name`` into a did-you-mean.
    - ``disabled_view(model)`` is a context manager in which the prepared model computes as the base did (an
      adapter switched off); objectives that compare with a reference policy use it instead of a frozen copy. By
      PEFT technique declares ``peft_disabled_view`` (its ``disable_adapter()``); None: there is no such view (the
      base weights change, or the adapter cannot be switched off), so a frozen copy of the base is made.
    - ``variant_label(settings)`` names the variant its settings choose ('dora'), or None for the plain technique;
      ``tunelab runs`` shows it beside the name.
    - ``adapter_types``: the types its ``adapter_config.json`` carries (PEFT's ``peft_type``, or tunelab's own
      ``type``); an adapter folder opens with the first registered technique that declares its type.
    - ``attach(model, folder)`` puts the saved adapter of ``folder`` on ``model``, a plain transformers model of
      its base, and returns the adapted model (default: PEFT's loader). ``load_result``'s default is the run's
      base, loaded as the technique loads it, with ``attach``.
    - ``mixed_batch(folder)`` says why the result in ``folder`` cannot share a batch with other adapters in
      ``tunelab serve`` (it is then served alone), or None when it can.
    - ``row_forward(model, names)`` computes a batch whose rows ask for different adapters of ``model``: a context
      manager in which every forward pass gives row i the adapter ``names[i]`` (PEFT adapter names, '__base__'
      for none; the caller refills the list in place before each pass), exactly as PEFT's per-row
      ``adapter_names`` would, or None when the model holds a layer it cannot compute so (PEFT's own per-row
      path runs then). None (the default): PEFT's per-row path always.
    - ``generation_view(model)`` is a context manager in which transformers' ``generate`` on the prepared model
      computes what its forward computes, for a technique whose adapter PEFT hands ``generate`` in a form it no
      longer reads; None (the default): ``generate`` already does. Generation enters it around every ``generate``
      call, with the adapter the rows ask for active.
    - ``card`` says how the model card tells a reader to load the result without tunelab.
    - ``figure_tables(figures)`` turns what ``evaluate`` returned into tables for the console.
    - ``cpu_bf16_refusal`` says why ``model.dtype: auto`` keeps this technique in float32 on a CPU with native
      bfloat16 (None: it trains with bfloat16 autocast there, frozen weights stored in bfloat16).
    """

    name: str
    config_class: type[Settings]
    prepare: Callable[..., nn.Module]
    save: Callable[[nn.Module, Path], Path]
    result_dir_name: str
    default_learning_rate: float
    summary: str
    load_result: Callable[[Any, Path, torch.device], nn.Module] | None = None
    base_load: Callable[..., BaseLoad] = plain_load  # (settings, device[, num_labels])
    refuses: Mapping[str, str] = field(default_factory=dict)
    param_groups: Callable[[nn.Module, Any, float, float], list[dict[str, Any]]] | None = None
    on_step: Callable[[nn.Module, Any, int], dict[str, Any] | None] | None = None
    penalty: Callable[[nn.Module, Any], torch.Tensor | None] | None = None
    state: TechniqueState | None = None
    evaluate: Callable[[nn.Module, Any, int, torch.device, int | None], dict[str, Any]] | None = None
    merge: Callable[[Any, Path, torch.device], MergeResult] | None = None
    variant_names: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variant_label: Callable[[Any], str | None] | None = None
    disabled_view: Callable[[nn.Module], AbstractContextManager[Any]] | None = None
    adapter_types: tuple[str, ...] = ()
    attach: Callable[[nn.Module, Path], nn.Module] | None = None
    mixed_batch: Callable[[Path], str | None] = served_alone
    row_forward: Callable[[nn.Module, list[str]], AbstractContextManager[Any] | None] | None = None
    generation_view: Callable[[nn.Module], AbstractContextManager[Any]] | None = None
    card: CardUsage | None = None
    figure_tables: Callable[[dict[str, Any]], list[FigureTable]] | None = None
    cpu_bf16_refusal: str | None = None

    def __post_init__(self) -> None:
        if len(inspect.signature(self.base_load).parameters) == 2:  # base_load(settings, device): any head loads alike
            loads_alike = self.base_load
            object.__setattr__(self, "base_load",
                               lambda settings, device, num_labels=None: loads_alike(settings, device))
        adapter = self.result_dir_name == ADAPTER_DIR
        if self.attach is None and adapter:
            object.__setattr__(self, "attach", attach_peft_adapter)
        if self.load_result is None:
            loader = partial(load_adapter_on_base, self.attach, self.base_load) if adapter else load_full_model
            object.__setattr__(self, "load_result", loader)
        if self.card is None:
            object.__setattr__(self, "card", PEFT_ADAPTER_CARD if adapter else PLAIN_MODEL_CARD)
        if self.param_groups is None:
            object.__setattr__(self, "param_groups", decay_param_groups)
        if self.merge is None and "merge" not in self.refuses:
            object.__setattr__(self, "merge", partial(merge_peft_adapter, self.base_load))
        if len(inspect.signature(self.prepare).parameters) == 2:  # prepare(model, settings): no run context
            two_args = self.prepare
            object.__setattr__(self, "prepare", lambda model, settings, context=None: two_args(model, settings))

    def refusal(self, feature: str) -> str | None:
        """Why this technique cannot work with ``feature`` (a FEATURES key or 'objective:<name>'), or None."""
        return self.refuses.get(feature)

    def apply(self, model: nn.Module, settings: Any, context: RunContext | None = None) -> nn.Module:
        return self.prepare(model, settings, context or RunContext())


def peft_disabled_view(model: nn.Module) -> AbstractContextManager[Any]:
    """The PEFT model with its adapter switched off (``disable_adapter()``): exactly the base's computation."""
    return getattr(model, "module", model).disable_adapter()  # DDP keeps the model in .module


def virtual_tokens(model: nn.Module) -> int:
    """The positions a prepared model adds before every row: a PEFT prompt-learning adapter's virtual tokens
    (prompt embeddings prepended to the input, or prefix keys and values the row's positions follow), 0 for any
    other model. Read from the built model, not from a technique's settings: a row of max_length tokens takes
    max_length plus these of the model's context, whichever technique prepends them."""
    configs = getattr(getattr(model, "module", model), "peft_config", None)  # DDP keeps the model in .module
    if not isinstance(configs, dict):
        return 0
    return max((int(c.num_virtual_tokens) for c in configs.values()
                if getattr(c, "is_prompt_learning", False) and c.num_virtual_tokens), default=0)


def forward_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch tensors a technique's model reads besides input ids and positions (e.g. multitask prompt tuning's
    ``task_ids``): the model its ``prepare`` returned names them in ``tunelab_forward_inputs``."""
    wanted = getattr(getattr(model, "module", model), "tunelab_forward_inputs", ())  # DDP keeps the model in .module
    return {key: batch[key] for key in wanted if key in batch}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once. A 4-bit weight counts its logical
    size (bitsandbytes packs two values per byte; ``quant_shape`` gives the unpacked shape)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        state = getattr(param, "quant_state", None)
        numel = int(torch.Size(state.shape).numel()) if state is not None else param.numel()
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


def decay_param_groups(model: nn.Module, settings: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not on biases and norm scales, the usual practice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def save_full_model(model: nn.Module, run_dir: Path) -> Path:
    """Save every weight as safetensors in ``run_dir/model`` so plain transformers can load it."""
    out = run_dir / MODEL_DIR
    model.save_pretrained(out, safe_serialization=True)
    return out


def save_peft_adapter(model: nn.Module, run_dir: Path) -> Path:
    """Save a PEFT model's adapter (adapter_config.json + adapter_model.safetensors) in ``run_dir/adapter``."""
    out = run_dir / ADAPTER_DIR
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_full_model(config: Any, folder: Path, device: torch.device) -> nn.Module:
    """A ``model/`` result: a plain transformers model folder."""
    num_labels = saved_num_labels(folder)
    model = head_class(num_labels).from_pretrained(folder, dtype=resolve_dtype(config.model.dtype, device))
    return model.to(device)


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT's wrapping of a model (``get_peft_model``, ``PeftModel.from_pretrained``): PeftModel's
    constructor reads ``model.is_gradient_checkpointing`` (peft 0.21), an alias transformers 5 deprecated for
    ``is_activation_checkpointing`` with a FutureWarning. PEFT's read, not tunelab's nor the user's, and the same
    value: nothing anyone running tunelab can act on. The CLI drops transformers' FutureWarnings; through the Python
    API it was shown at the first run of every process. Only that message, only here: a user's own read of the
    alias still warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_peft_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """A PEFT adapter folder on ``model``: a ``peft.PeftModel``."""
    from peft import PeftModel  # peft is imported when an adapter is used, not on every start

    with peft_wrapping():
        return PeftModel.from_pretrained(model, folder)


def load_adapter_on_base(attach: Callable[[nn.Module, Path], nn.Module],
                         base_load_of: Callable[..., BaseLoad], config: Any, folder: Path,
                         device: torch.device) -> nn.Module:
    """An ``adapter/`` result: the run's base model, loaded as the technique loads it (``base_load_of``, its
    ``base_load``), with the head it was trained on (a score head when the adapter says SEQ_CLS), with ``attach``."""
    num_labels = adapter_num_labels(folder)
    base_load = base_load_of(config.technique, device, num_labels)
    base = load_model(config.model, device, base_load, num_labels=num_labels)
    model = attach(apply_head_config(base, saved_head_config(folder)), folder)
    placed = base_load.device_map is not None or base_load.quantization_config is not None  # placed while loading
    return model if placed else model.to(device)


# A PEFT adapter on a base loaded in full precision (a technique with its own base load binds it instead).
load_peft_adapter = partial(load_adapter_on_base, attach_peft_adapter, plain_load)


def merge_peft_adapter(base_load_of: Callable[..., BaseLoad], config: Any, folder: Path,
                       device: torch.device) -> MergeResult:
    """Fold the adapter into the base weights it was trained on (loaded as the technique loads it,
    ``base_load_of``): W = W0 + delta(W), exact for additive and multiplicative weight adapters (LoRA family, IA3,
    LoHa, LoKr, VeRA, AdaLoRA)."""
    model = load_adapter_on_base(attach_peft_adapter, base_load_of, config, folder, device)
    merged = model.merge_and_unload()
    return MergeResult(merged, f"merged the {config.technique.name} adapter into the base weights of {config.model.name}")
