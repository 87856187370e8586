"""The run configuration's schema: one pydantic model per section, documented once in its field descriptions.

A config is YAML with the sections ``model``, ``data``, ``technique``, ``objective``, ``training``, ``eval`` and
``output``; unknown keys are errors (``extra="forbid"``). Reading, ``--set`` overrides and error messages live
in ``tunelab.config.loading``.

Each section is defined by the package that owns it and composed here: ``model`` by ``tunelab.models``, ``data``
by ``tunelab.data.config``, ``technique`` by each technique's settings, ``objective`` by ``tunelab.objectives``.
``training``, ``eval`` and ``output`` are defined here because their owners (the loop, evaluation, the run
folder) sit above the config in the layering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from tunelab.config.compat import check_config
from tunelab.data.config import DataConfig
from tunelab.metrics import GENERATION_METRICS
from tunelab.models import EMBEDDED_DEFAULT_MODEL, ModelConfig
from tunelab.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, ObjectiveConfig, ObjectiveField, default_objective_settings
from tunelab.settings import Settings
from tunelab.techniques import DEFAULT_TECHNIQUE, TECHNIQUES, TechniqueConfig

__all__ = ["EMBEDDED_DEFAULT_MODEL", "ConfigOrigin", "DataConfig", "EvalConfig", "ModelConfig", "ObjectiveConfig",
           "OutputConfig", "TrainingConfig", "TunelabConfig"]

class TrainingConfig(Settings):
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout. Same seed, same run.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run. Overrides `epochs` when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when `max_steps` is not set.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per forward pass (packed rows when packing is on).")
    grad_accum: int = Field(
        1, gt=0, description="Micro-batches per optimizer step. The loss is normalised by the supervised-token count "
        "of the whole window, so 4x1 equals 1x4."
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate. None takes the technique's recommended starting point "
        "(full 2e-5, freeze 5e-5, lora 2e-4)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps (rounded up) spent on linear "
                                "warmup; warmup step s of W runs at (s+1)/(W+1) of the peak, so no step is wasted at 0.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None disables clipping.")
    eval_every: int | None = Field(
        None, gt=0, description="Evaluate validation loss every N steps (and always at the end)."
    )
    save_every: int | None = Field(
        None, gt=0, description="Write a resumable checkpoint every N steps. Rotation keeps the best and the latest."
    )
    eval_metrics: list[str] = Field(
        default_factory=list, description="Generation metrics also computed at every evaluation, on the "
        "`eval.num_samples` validation prompts: exact_match, bleu, chrf, rouge_1, rouge_2, rouge_l, or a user metric "
        "'module:function'. They are logged in metrics.jsonl and can choose the best checkpoint (`best_metric`)."
    )
    best_metric: str = Field(
        "loss", description="What 'best' means for early stopping and the best checkpoint: loss, perplexity, one "
        "of `eval_metrics`, or a figure the objective logs at every evaluation (e.g. accuracy and macro_f1 for "
        "classification, preference_accuracy for dpo, pairwise_accuracy for reward)."
    )
    best_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="Whether `best_metric` is minimised or maximised; 'auto' asks the metric (loss: min, "
        "ROUGE: max, an objective's figure: max, a user metric: max unless its function sets higher_is_better = "
        "False)."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without a better `best_metric`; needs `eval_every`."
    )
    restore_best: bool = Field(
        True, description="At the end, load the weights with the best `best_metric` before saving the result."
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to TensorBoard event files (RUN/tensorboard), a local "
        "MLflow store (RUN/mlruns) and/or an offline Weights & Biases run (RUN/wandb; `wandb sync` uploads it "
        "later); all work offline. Needs `pip install 'tunelab[tracking]'`."
    )
    max_consecutive_nonfinite: int = Field(
        5, gt=0, description="A non-finite loss or gradient skips the step; this many in a row aborts the run."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    return_freed_memory: bool | None = Field(
        None, description="On a CPU, give every freed chunk of 1 MiB or more back to the system at once (glibc's mmap "
        "threshold fixed at 1 MiB): a lower, predictable peak for more kernel time (each chunk is zeroed again when "
        "next needed). None: on with gradient_checkpointing or a quantized load, off otherwise (docs/choosing.md, "
        "the heap policy); `tunelab plan` plans whichever the run will use. An online objective's run also gives the "
        "heap's free pages back before each micro-batch's forward (malloc_trim) unless this is false."
    )
    glibc_tcache_off: bool | None = Field(
        None, description="On a CPU with glibc before 2.39, `tunelab train` restarts itself with glibc's per-thread "
        "cache off (GLIBC_TUNABLES=glibc.malloc.tcache_count=0, which glibc reads only at process start): on glibc "
        "2.36 that cache keeps the remainders of torch's aligned allocations out of the heap's reach (glibc bug "
        "30723), so freed blocks are not reused and the peak grows step after step past the plan. None or true: "
        "every CPU run (the quickstart's 40 steps peaked at 0.79 of its plan with the cache on and oneDNN's "
        "unbounded, 0.99 with both off or bounded); false: never (the peak then grows past the plan; no time was "
        "measured saved on the speed bench). GLIBC_TUNABLES that already set tcache_count are left as they are "
        "(docs/choosing.md, the heap policy)."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How the processes of a torchrun launch share the model: 'ddp' gives each a whole copy and "
        "averages gradients; 'fsdp' shards weights, gradients and optimizer state over them (torch FSDP2, one unit per "
        "decoder layer), for a model too large for one device. With one process neither shards anything."
    )
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl line every N steps.")

    @model_validator(mode="after")
    def _patience_needs_eval(self) -> "TrainingConfig":
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every: set training.eval_every to a step count")
        return self

    @field_validator("eval_metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        for name in names:  # user metrics ('module:function') are imported when the run starts
            if name not in GENERATION_METRICS and ":" not in name:
                raise ValueError(f"unknown metric {name!r}: expected one of {', '.join(GENERATION_METRICS)}, or "
                                 "'module:function'")
        return names


class EvalConfig(Settings):
    before_after: bool = Field(
        True, description="Compare the base model with the fine-tuned one: validation loss, perplexity, generations."
    )
    max_examples: int | None = Field(
        256, gt=0, description="Cap on validation examples used for the loss (None: all of them)."
    )
    num_samples: int = Field(4, ge=0, description="Validation prompts generated greedily by base and tuned model.")
    max_new_tokens: int = Field(96, gt=0, description="Token budget of each sample generation.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass during evaluation.")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match", "rouge_l"],
        description="Generation metrics of the before/after report, on the `num_samples` sample generations, each "
        "with its delta and a paired bootstrap 95% interval.",
    )
    forgetting: bool = Field(
        True, description="Forgetting check: loss on general held-out text (shipped public-domain prose) before and "
        "after training; the run is flagged when it rises past `forgetting_threshold`."
    )
    forgetting_threshold: float = Field(
        0.1, ge=0, description="Relative rise of the held-out loss that flags forgetting (0.1 = 10%)."
    )
    forgetting_max_tokens: int = Field(
        256, ge=16, description="Tokens of held-out text scored (a few hundred keep the check to seconds on a CPU)."
    )
    forgetting_text: str | None = Field(
        None, description="Your own held-out text instead of the shipped one: a plain-text file, paragraphs "
        "separated by blank lines. Relative paths are relative to the config file."
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        return TrainingConfig._known_metrics(names)


class OutputConfig(Settings):
    dir: str | None = Field(
        None, description="Run folder. Default: runs/<config file name>. Relative paths are relative to the working "
        "directory."
    )
    overwrite: bool = Field(False, description="Replace the run already in `dir` instead of refusing. Only files "
                           "tunelab wrote are removed; a folder holding anything else is never used.")

    @field_validator("dir")
    @classmethod
    def _dir_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty path: give a folder for the run, or leave it unset for runs/<config name>")
        return value


TechniqueField = Annotated[TechniqueConfig, Field(discriminator="name")]


@dataclass(frozen=True)
class ConfigOrigin:
    """Where a config was read from: its file, the file's text and the --set items applied on top of it. A config
    derived from it (compare's run of each technique) is refused at the file's line or the --set item, as the file
    itself would be, rather than at an anonymous '<config>'."""

    path: str
    text: str
    overrides: tuple[str, ...] = ()


class TunelabConfig(Settings):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to load and how.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation data.")
    technique: TechniqueField = Field(
        default_factory=lambda: TECHNIQUES[DEFAULT_TECHNIQUE].config_class(),
        description=f"Fine-tuning technique, chosen by `name`: one of {', '.join(TECHNIQUES)}.",
    )
    objective: ObjectiveField = Field(
        default_factory=default_objective_settings,
        description=f"Training objective, chosen by `name`: one of {', '.join(OBJECTIVES)}. "
        + "; ".join(f"'{name}': {o.summary}" for name, o in OBJECTIVES.items()) + ".",
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and before/after report.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run folder goes.")
    # set by load_config; not a setting (never dumped), so a config built from a dict has none
    _origin: ConfigOrigin | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _technique_name_defaults(cls, values: Any) -> Any:
        # The discriminated union needs `name`; a section such as {r: 8} (or --set technique.r=8) means the
        # default technique, as it does when the whole section is left out.
        if isinstance(values, dict) and isinstance(values.get("technique"), dict) and "name" not in values["technique"]:
            values = {**values, "technique": {"name": DEFAULT_TECHNIQUE, **values["technique"]}}
        if isinstance(values, dict) and isinstance(values.get("objective"), dict) and "name" not in values["objective"]:
            values = {**values, "objective": {"name": DEFAULT_OBJECTIVE, **values["objective"]}}  # as for technique
        return values

    @model_validator(mode="after")
    def _technique_supports_the_rest(self) -> "TunelabConfig":
        check_config(self)  # the technique's declared compatibility (config/compat.py): packing, checkpointing, objective
        objective = OBJECTIVES[self.objective.name]
        computed = ("loss", *(("perplexity",) if objective.perplexity else ()), *self.training.eval_metrics, *objective.metrics)
        if self.training.best_metric not in computed:
            raise ValueError(f"training.best_metric {self.training.best_metric!r} is not computed: use one of "
                             f"{', '.join(computed)}, or add it to training.eval_metrics")
        return self

    @property
    def origin(self) -> ConfigOrigin | None:
        """The file (and --set items) this config was loaded from; None when it was built from a dict."""
        return self._origin

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used: the user's, or the technique's recommended starting point."""
        return self.training.learning_rate or TECHNIQUES[self.technique.name].default_learning_rate

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["training"]["learning_rate"] = self.learning_rate
        return yaml.safe_dump(data, sort_keys=False)
