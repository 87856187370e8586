"""Opening a finished result: the one function that eval, generate, chat, merge, export, serve and compare use.

``load_run(PATH)`` opens a run folder, the result folder inside one (``RUN/adapter``, ``RUN/model``), or an adapter
folder on its own (adapter_config.json, with the base it names in base_model_name_or_path). A run is rebuilt from
its resolved ``config.yaml`` by its technique's ``load_result``; an adapter folder on its own by the technique
the registry finds for its declared adapter type, whose ``attach`` puts it on the plain base. ``find_result``
answers what a folder holds without loading any weights. Nothing here knows a technique by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from tunelab.config import TunelabConfig, build_config, read_run_config
from tunelab.errors import ConfigError, TechniqueError
from tunelab.invariance import PROBE_SIZES, make_row_invariant, probe
from tunelab.objectives import OBJECTIVES
from tunelab.models import (ModelConfig, adapter_num_labels, apply_head_config, check_model_available, default_device,
                            load_model, load_tokenizer, saved_head_config)
from tunelab.precision import GenerationPrecision, generation_precision
from tunelab.techniques import TECHNIQUES, Technique, technique_for_adapter
from tunelab.techniques.attach import adapter_dir, load_adapter
from tunelab.techniques.base import ADAPTER_CONFIG

RUN_CONFIG = "config.yaml"


@dataclass
class FoundResult:
    """What a folder holds, read without loading weights."""

    name: str  # how reports and servers call it: the run folder's name, or the adapter folder's
    run_dir: Path | None  # the run folder; None for an adapter folder on its own
    result_dir: Path  # the folder holding the result (adapter/ or model/, or the adapter folder itself)
    technique: Technique
    config: TunelabConfig | None  # the run's config; None for an adapter folder on its own
    base: str  # the base model it was trained from (what `--against base` means)


@dataclass
class LoadedRun:
    run_dir: Path  # the run folder, or the adapter folder opened on its own
    config: TunelabConfig | None  # None for an adapter folder on its own
    model: nn.Module  # in eval mode, on `device`
    tokenizer: Any
    result_dir: Path  # adapter/ or model/ (or the adapter folder itself)
    technique: Technique | None = None
    base: str | None = None  # the base model it was trained from (what `--against base` means)
    name: str = ""
    precision: GenerationPrecision | None = None  # the dtype it generates in and why (``load_for_generation``)


def result_dir(run_dir: Path, technique_name: str) -> Path:
    return run_dir / TECHNIQUES[technique_name].result_dir_name


def find_result(path: str | Path) -> FoundResult:
    """What ``path`` holds: a run (its config.yaml), the result folder of a run, or an adapter folder on its own.

    A run that has not finished (no result folder) and a folder that is neither are refused with the reason."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such folder (a run folder, its result folder or an adapter folder)")
    if not (path / RUN_CONFIG).is_file() and (path / ADAPTER_CONFIG).is_file() and (path.parent / RUN_CONFIG).is_file():
        run = find_result(path.parent)
        if run.result_dir.resolve() == path.resolve():  # the result folder of that run: open the run
            return run
    if (path / RUN_CONFIG).is_file():
        return _found_run(path)
    if (path / ADAPTER_CONFIG).is_file():
        technique = technique_for_adapter(path)
        base = (_read_json(path / ADAPTER_CONFIG) or {}).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path, so the base this adapter needs is "
                              "unknown; give the base model as TARGET and the adapter with --adapter")
        return FoundResult(path.resolve().name, None, path, technique, None, str(base))
    raise ConfigError(f"{path}: not a tunelab run folder (no {RUN_CONFIG}) or an adapter folder (no {ADAPTER_CONFIG})")



def _found_run(run_dir: Path) -> FoundResult:
    config = build_config(read_run_config(run_dir))
    technique = TECHNIQUES[config.technique.name]
    folder = run_dir / technique.result_dir_name
    if not folder.is_dir():
        status = ((_read_json(run_dir / "status.json") or {}).get("status")) or "unknown"
        raise ConfigError(f"{run_dir}: the run has no result in {folder.name}/ (status: {status}); "
                          "only a finished run can be opened")
    return FoundResult(run_dir.resolve().name, run_dir, folder, technique, config, config.model.name)


def load_run(run: str | Path | FoundResult, device: torch.device | str | None = None,
             dtype: str | None = None) -> LoadedRun:
    """Rebuild the model and tokenizer of a finished run, of the result folder inside one, or of an adapter
    folder on its own, for any technique.

    ``dtype`` overrides the model's dtype (for example 'float32' to compare on a CPU)."""
    found = run if isinstance(run, FoundResult) else find_result(run)
    device = torch.device(device) if device is not None else default_device()
    if found.config is not None:
        config = found.config
        if dtype is not None:
            config.model.dtype = dtype
        tokenizer_dir = found.run_dir / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir if tokenizer_dir.is_dir() else found.result_dir)
        model = found.technique.load_result(config, found.result_dir, device)
    else:  # an adapter folder on its own: the plain base it names, with the adapter attached
        base_config = ModelConfig(name=found.base, dtype=dtype or "auto")
        tokenizer = load_tokenizer(base_config)
        # with the head it was trained with (a score head for a SEQ_CLS adapter) and its class names
        base = load_model(base_config, device, num_labels=adapter_num_labels(found.result_dir))
        base = apply_head_config(base, saved_head_config(found.result_dir))
        model = found.technique.attach(base, found.result_dir).to(device)
    model.eval()
    return LoadedRun(found.run_dir or found.result_dir, found.config, model, tokenizer, found.result_dir,
                     found.technique, found.base, found.name)


def load_for_generation(run: str | Path | FoundResult, device: torch.device | str | None = None,
                        dtype: str = "auto") -> LoadedRun:
    """``load_run`` in the dtype a finished run generates in (``precision.generation_precision``: float32 weights
    on a CPU when ``dtype`` and the run's model.dtype are auto, bfloat16 where asked for and native). The one loader of `tunelab
    serve`, `generate` and `chat`, so that their greedy outputs are equal."""
    found = run if isinstance(run, FoundResult) else find_result(run)
    check_generates(found)
    device = torch.device(device) if device is not None else default_device()
    configured = found.config.model.dtype if found.config is not None else "auto"
    chosen = generation_precision(dtype, configured, device)
    loaded = load_run(found, device=device, dtype=chosen.dtype)
    loaded.precision = chosen
    if chosen.dtype == "bfloat16" and device.type == "cpu":
        problem = row_invariant(loaded.model, loaded.tokenizer)
        if problem is not None:  # this host's kernels round a row with its batch: float32, which the tests hold
            loaded = load_run(found, device=device, dtype="float32")
            loaded.precision = GenerationPrecision("float32", f"{chosen.reason}, but on this CPU {problem}: float32 "
                                                              "instead, so that a batched answer is the one its "
                                                              "request gets alone")
        else:
            loaded.precision = GenerationPrecision("bfloat16", f"{chosen.reason}; computed row by row, so each "
                                                               "answer is the one its request gets alone")
    return loaded


# A text whose tokens give ``invariance.probe`` the model's own activations: more than 128 tokens on any tokenizer.
_PROBE_TEXT = ("A bicycle chain wears as it runs; measure it every few months, and replace it before it stretches the "
               "cassette. Python's standard library reads CSV files, walks folders, parses dates and starts threads; "
               "its documentation shows an example for nearly every function. ") * 3


def row_invariant(model: nn.Module, tokenizer: Any) -> str | None:
    """Make ``model`` compute each row of a batch as it computes it alone (``invariance``), and check its products
    on its own activations; None when they hold, else what differed (the caller loads float32 instead)."""
    make_row_invariant(model)
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"][:, :PROBE_SIZES[-1]]  # (1, T)
    return probe(model, ids.to(next(model.parameters()).device))


def check_generates(found: FoundResult) -> None:
    """Refuse, before any weight is read, a result with a score head (a reward model, a classifier): it gives a
    score or a class for a text and generates none, so `generate`, `chat` and `serve` have nothing to call."""
    if found.config is not None:
        objective = found.config.objective.name
        heads = OBJECTIVES[objective].num_labels
        trained = f"was trained with objective '{objective}'"
    else:
        heads = adapter_num_labels(found.result_dir)
        trained = "is an adapter with a score head (task type SEQ_CLS)"
    if heads is not None:
        target = found.run_dir or found.result_dir
        raise ConfigError(f"{target} {trained}: its score head scores a text and generates none; measure it with "
                          f"`tunelab eval {target} --data FILE` (the objective's own figures), or generate from a run "
                          "of a text objective")


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- any evaluable model: run, model folder, model + adapter


@dataclass
class OpenedModel:
    """A model ready for evaluation, whatever it came from."""

    name: str  # how reports call it
    model: nn.Module
    tokenizer: Any
    base: str | None  # the model name `--against base` means for it (None: it has no base)
    dtype: str


def open_model(target: str | Path, adapter: str | Path | None = None, device: torch.device | str | None = None,
               dtype: str = "auto", num_labels: int | None = None) -> OpenedModel:
    """Open TARGET for evaluation: a run folder, a result or adapter folder (both through ``load_run``), or a
    model folder, hub id or the embedded alias, optionally with ``adapter`` attached. ``num_labels`` puts a new,
    untrained score head with that many outputs on a plain model (the base of a reward or classification run)."""
    device = torch.device(device) if device is not None else default_device()
    path = Path(target)
    check_local_target(path)
    if adapter is None and ((path / RUN_CONFIG).is_file() or (path / ADAPTER_CONFIG).is_file()):
        loaded = load_run(path, device=device, dtype=None if dtype == "auto" else dtype)
        return OpenedModel(loaded.name, loaded.model, loaded.tokenizer, loaded.base,
                           loaded.config.model.dtype if loaded.config is not None else dtype)
    model_config = ModelConfig(name=str(target), dtype=dtype)
    model = load_model(model_config, device, num_labels=num_labels)
    tokenizer = load_tokenizer(model_config)
    name = Path(str(target)).name or str(target)
    if adapter is None:
        return OpenedModel(name, model.eval(), tokenizer, None, dtype)
    try:
        folder = adapter_dir(adapter)
    except TechniqueError:
        raise ConfigError(f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG})") from None
    if (folder.parent / "tokenizer").is_dir():  # an adapter inside a run folder: the run's tokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder.parent / "tokenizer")
    model = load_adapter(model, folder).to(device)
    label = folder.parent.name if (folder.parent / RUN_CONFIG).is_file() else folder.name
    return OpenedModel(f"{name}+{label}", model.eval(), tokenizer, str(target), dtype)


def check_openable(target: str | Path, adapter: str | Path | None = None) -> str | None:
    """Refuse what ``open_model`` would refuse, without loading any weights; return the base it would report
    (what ``--against base`` means; None for a plain model)."""
    path = Path(target)
    check_local_target(path)
    if adapter is None and ((path / RUN_CONFIG).is_file() or (path / ADAPTER_CONFIG).is_file()):
        return find_result(path).base
    check_model_available(str(target))
    if adapter is None:
        return None
    try:
        adapter_dir(adapter)
    except TechniqueError:
        raise ConfigError(f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG})") from None
    return str(target)


def check_local_target(path: Path) -> None:
    """Refuse, with what is there instead, a TARGET that names a local folder which is missing or holds no result.

    A missing ``runs/x`` would otherwise fall through to the model loader, which reads ``owner/name`` as a hub id
    and answers with a download hint. A name counts as local when it exists, starts with ``.``, ``/`` or ``~``,
    or when its parent folder exists here (``runs/`` for ``runs/x``)."""
    if path.is_dir():
        if not any((path / name).is_file() for name in (RUN_CONFIG, ADAPTER_CONFIG, "config.json")):
            raise ConfigError(f"{path}: this folder is not a tunelab run (no {RUN_CONFIG}), an adapter (no "
                              f"{ADAPTER_CONFIG}) or a model (no config.json)")
        return
    text = str(path)
    local = text.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir())
    if path.exists() or not local:
        return
    runs = sorted(p.name for p in path.parent.iterdir() if (p / RUN_CONFIG).is_file()) if path.parent.is_dir() else []
    import difflib

    close = difflib.get_close_matches(path.name, runs, n=1)
    hint = (f"; did you mean {path.parent / close[0]}?" if close else
            f"; runs in {path.parent}: {', '.join(runs[:8])}" if runs else "")
    raise ConfigError(f"{path}: no such run, adapter or model folder{hint}")
