"""Reading a config: YAML through ``yaml.safe_load`` (no Python tags), ``--set a.b=c`` overrides, relative
paths, and errors that name the file and line (or the ``--set`` item), the key and what was expected.

Relative paths written in the file are relative to the file's folder; those given with ``--set`` to the
working directory.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import ConfigOrigin, TunelabConfig
from tunelab.errors import ConfigError
from tunelab.models import EMBEDDED_MODELS, hub_id_form
from tunelab.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from tunelab.techniques import DEFAULT_TECHNIQUE, TECHNIQUES, technique_name_hint

log = logging.getLogger(__name__)


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
            if _is_refused_tag(exc):
                raise ConfigError(f"--set {item!r}: not plain YAML ({exc.problem}). tunelab reads --set values with "
                                  "yaml.safe_load, so Python tags such as !!python/object are refused.") from None
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        parsed.append((key.strip().split("."), value))
    return parsed


def _override_items(overrides: list[str] | None) -> dict[str, str]:
    """Map each key path set on the command line to its ``--set`` item, as the user typed it (the last one wins),
    as an error names it: '--set KEY=VALUE'."""
    parsed = zip(parse_overrides(overrides), overrides or [])
    return {".".join(path): f"--set {item.strip()}" for (path, _), item in parsed}


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
    """The command-line item that gave the value at `dotted` (itself or a whole section above it), if any: a --set
    item, or another option (``build_config``'s ``given``). The nearest one: compare's --techniques gives the
    whole technique section and a --set item one key of it, whose bad value is the --set item's."""
    matches = [key for key in overridden if dotted == key or dotted.startswith(key + ".")]
    return overridden[max(matches, key=len)] if matches else None


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
    if _is_refused_tag(exc):
        return (f"{where}: not plain YAML ({problem}). tunelab reads configs with yaml.safe_load, so Python tags "
                "such as !!python/object are refused.")
    return f"{where}: invalid YAML ({problem})"


def _is_refused_tag(exc: yaml.YAMLError) -> bool:
    """Only a tag safe_load has no constructor for is a refused (Python) tag; a missing ']' is plain bad syntax."""
    return isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in str(exc.problem)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.yaml as plain data. Every reader of a run's config comes here: ``safe_load`` (a
    Python tag is refused, never run), and a damaged file is a ConfigError naming the file and line."""
    path = run_dir / "config.yaml"
    data = _read_yaml(path, path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, data, technique, training, eval, output")
    return data


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


# the sections whose settings class is chosen by their `name` (pydantic's discriminated unions, whose error locs
# carry the chosen name as a tag the user never wrote): section -> (its registry, the default name)
TAGGED: dict[str, tuple[dict[str, Any], str]] = {"technique": (TECHNIQUES, DEFAULT_TECHNIQUE),
                                                 "objective": (OBJECTIVES, DEFAULT_OBJECTIVE)}


def _name_hint(section: str, name: Any) -> str | None:
    """Did-you-mean for a tagged section's `name` that is not registered: the technique registry's own hint
    (which knows its variants' names), else the nearest registered name."""
    if section == "technique":
        return technique_name_hint(name)
    if not isinstance(name, str):
        return None
    close = difflib.get_close_matches(name.strip().lower(), list(TAGGED[section][0]), n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'?" if close else None


def _model_at(path: tuple[Any, ...], data: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic section class that owns `path` (used to suggest the nearest valid key)."""
    model: type[BaseModel] = TunelabConfig
    items: type[BaseModel] | None = None  # the settings class of a list's items, when the last part was that list
    for depth, part in enumerate(path[:-1]):
        if items is not None and str(part).isdigit():  # objective.rewards.0.KEY: an item of a list of settings
            model, items = items, None
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        items = _settings_items(annotation)
        if items is not None:
            continue
        if str(part) in TAGGED and depth == 0:  # a discriminated section: its class is the one `name` picks
            registry, default = TAGGED[str(part)]
            name = (data.get(str(part)) or {}).get("name", default)
            spec = registry.get(name) if isinstance(name, str) else None
            if spec is None:
                return None
            model = spec.config_class
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _settings_items(annotation: Any) -> type[BaseModel] | None:
    """X of a ``list[X]`` field whose items are settings (objective.rewards), else None."""
    item = get_args(annotation)[0] if get_origin(annotation) is list and get_args(annotation) else None
    return item if isinstance(item, type) and issubclass(item, BaseModel) else None


_SYNONYMS = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
             "init_lora_weights": "init", "loraplus_ratio": "loraplus_lr_ratio"}


def _nearest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a misspelt or renamed one most likely meant ('lerning_rate' -> 'learning_rate', 'rank' -> 'r')."""
    synonym = _SYNONYMS.get(key)
    if synonym in valid:  # PEFT's and other trainers' names for the same setting
        return synonym
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
    """pydantic's errors with locs as the user writes keys (no technique or objective tag), and one error per
    union field."""
    errors: list[dict[str, Any]] = []
    unions: dict[tuple[str, ...], dict[str, Any]] = {}
    for err in exc.errors():
        raw = err["loc"]
        tags = TAGGED[raw[0]][0] if raw and raw[0] in TAGGED else {}
        loc = tuple(str(p) for i, p in enumerate(raw) if not (i == 1 and isinstance(p, str) and p in tags))
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
        return item
    inside = {key: item for key, item in overridden.items() if not loc or key.startswith(dotted + ".")}
    mentioned = [item for key, item in inside.items() if re.search(rf"\b{re.escape(key.split('.')[-1])}\b", msg)]
    line = lines_of.get(loc)
    if line is None and inside:
        return " and ".join(mentioned or list(inside.values()))
    return " and ".join([f"{source}:{line}" if line else source, *mentioned])


def _key_named_first(msg: str) -> tuple[str, ...]:
    """The key path a whole-config check's message starts with ('data.packing: technique ...'), or ()."""
    match = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)+)\b", msg)
    return tuple(match.group(1).split(".")) if match else ()


def _switched_section_hint(loc: tuple[str, ...], data: dict[str, Any], overridden: Mapping[str, str]) -> str:
    """For a key the section's new ``name`` (given by --set) does not take: how to replace the whole section, since
    the file's other keys were written for the name it replaced."""
    section = loc[0] if len(loc) == 2 and loc[0] in TAGGED else None
    if section is None or f"{section}.name" not in overridden:
        return ""
    name = (data.get(section) or {}).get("name")
    return (f". --set {section}.name={name} keeps the file's other {section} keys; to switch, replace the section: "
            f"--set '{section}={{name: {name}}}'")


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
        dotted = ".".join(loc)
        # a check of the whole config (loc empty) names the key it is about first: blamed where that key is given
        where = _where(loc or _key_named_first(err["msg"]), err["msg"], source, lines_of, overridden)
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc, data)
            valid = list(owner.model_fields) if owner else []
            close = _nearest_key(str(loc[-1]), valid)
            hint = f" Did you mean '{close}'?" if close else ""
            messages.append(f"{where}: unknown key '{dotted}'.{hint} Valid keys here: {', '.join(valid)}"
                            + _switched_section_hint(loc, data, overridden))
        elif err["type"] == "union_tag_invalid":  # loc is (section, "name"): the section's registry lists the names
            got = err.get("ctx", {}).get("tag", err["input"])
            hint = _name_hint(loc[0], got)
            messages.append(f"{where}: {dotted} must be one of {', '.join(TAGGED[loc[0]][0])} (got {got!r})"
                            + (f". {hint}" if hint else ""))
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            key = f"{dotted}: " if dotted else ""  # a check of the whole config names its keys in its message
            messages.append(f"{where}: {key}{err['msg']}{got_text}")
    return "invalid config:\n  " + "\n  ".join(messages)


def _resolve_paths(config: TunelabConfig, file_dir: Path | None, overridden: Mapping[str, str]) -> TunelabConfig:
    """Make data files and a local model folder absolute, each against the folder its text is relative to.

    A path written in the config file is relative to the file's folder (so a config and its data move together);
    one given with --set is relative to the working directory, as anything typed in a shell is.
    """
    def base_for(dotted: str) -> Path:
        return Path.cwd() if _set_on_command_line(dotted, overridden) is not None or file_dir is None else file_dir

    def resolve(path: str, base: Path) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    config.data.train = [resolve(p, base_for("data.train")) for p in config.data.train]
    config.data.validation = [resolve(p, base_for("data.validation")) for p in config.data.validation]
    if config.eval.forgetting_text:
        config.eval.forgetting_text = resolve(config.eval.forgetting_text, base_for("eval.forgetting_text"))
    _resolve_model_name(config, file_dir, overridden)
    return config


def _resolve_model_name(config: TunelabConfig, file_dir: Path | None, overridden: Mapping[str, str]) -> None:
    """A relative model.name that is a path is read from the same folder as the data files: the config file's
    (``file_dir``), or the working directory for --set and a config built in Python. from_pretrained read a name
    that was no folder beside the config from the working directory, so one config found different models from
    different folders, and a run's config.yaml kept the relative name. A hub id and an embedded alias stay names."""
    name = config.model.name
    path = Path(name).expanduser()
    if path.is_absolute():
        config.model.name = str(path)
        return
    from_file = file_dir is not None and _set_on_command_line("model.name", overridden) is None
    base = file_dir if from_file else Path.cwd()
    where = f"the config file's folder {file_dir}, as its data paths" if from_file else "the working directory"
    # named as written (a link is not followed, so a message says the place the user looks at); stored resolved
    here, elsewhere = (Path(os.path.normpath(folder / path)) for folder in (base, Path.cwd()))
    if here.is_dir():
        log.info("model.name %s: the folder %s (a relative path, read from %s)", name, here, where)
        config.model.name = str(here.resolve())
    elif name in EMBEDDED_MODELS:
        return
    elif elsewhere != here and elsewhere.is_dir():  # what from_pretrained would have opened: say why not
        raise ConfigError(f"model.name {name}: no folder at {here} (a relative path is read from {where}), though "
                          f"there is one at {elsewhere} in the working directory. Write model.name relative to the "
                          f"config file's folder or absolute ({elsewhere}), or give it with --set model.name={name}")
    elif name.startswith(".") or not hub_id_form(name):  # a path, not a hub id: opening it names both places
        config.model.name = str(here.resolve())
        config.model._looked_in = (config.model.name, f"model.name {name} is read from {where}" + (
            f"; nor is there a folder at {elsewhere} in the working directory" if elsewhere != here else ""))


def build_config(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "<config>", text: str | None = None,
    base_dir: Path | None = None, origin: ConfigOrigin | None = None, given: Mapping[str, str] | None = None,
) -> TunelabConfig:
    """Apply ``--set`` overrides to parsed YAML, validate, and resolve relative paths (file ones against `base_dir`).
    ``origin``: ``data`` derives from that loaded config (compare's run of a technique), whose --set items it
    already holds: errors name its file, line and --set items (``source``, ``text`` are ignored). ``given``: key
    paths another command-line option gave, each with that option as the user typed it (compare's --techniques
    gives each run's technique section): errors there name the option, not the line of the file's own value."""
    if origin is not None:
        source, text = origin.path, origin.text
    overridden = {**(given or {}), **_override_items(list(origin.overrides) if origin else overrides)}
    data = apply_overrides(copy.deepcopy(data), overrides)  # deep: never edit the caller's nested sections
    try:
        config = TunelabConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, source, text, overridden)) from None
    return _resolve_paths(config, base_dir, overridden)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TunelabConfig:
    """Read a YAML config with ``safe_load``, apply ``--set`` overrides, validate, resolve relative paths."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML config file (see examples/)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    data = _read_yaml(path, text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, data, technique, training, eval, output")
    config = build_config(data, overrides, source=str(path), text=text, base_dir=path.parent.resolve())
    config._origin = ConfigOrigin(str(path), text, tuple(overrides or ()))
    if config.output.dir is None:
        config.output.dir = str(Path("runs") / path.stem)
    return config
