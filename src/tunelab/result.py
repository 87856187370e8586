"""Opening a finished run: the one function that eval, merge, export, serve and compare use to get a result back.

``load_run(RUN)`` reads the run folder's resolved ``config.yaml``, loads the tokenizer the run saved, and asks the
run's technique (from the registry) to rebuild its result: a plain transformers model from ``model/``, or the base
model with the run's adapter attached. Nothing here knows a technique by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import ConfigError


@dataclass
class LoadedRun:
    run_dir: Path
    config: Any  # TunelabConfig (imported lazily: tunelab.config imports the technique registry)
    model: nn.Module  # in eval mode, on `device`
    tokenizer: Any
    result_dir: Path  # adapter/ or model/ (or a technique's own folder name)


def result_dir(run_dir: Path, technique_name: str) -> Path:
    from tunelab.techniques import TECHNIQUES

    return run_dir / TECHNIQUES[technique_name].result_dir_name


def load_run(run: str | Path, device: torch.device | str | None = None, dtype: str | None = None) -> LoadedRun:
    """Rebuild the model and tokenizer a finished run saved, for any technique.

    ``dtype`` overrides the run's ``model.dtype`` (for example 'float32' to compare on a CPU)."""
    from transformers import AutoTokenizer

    from tunelab.config import build_config
    from tunelab.models import default_device
    from tunelab.config import read_run_config
    from tunelab.techniques import TECHNIQUES

    run_dir = Path(run)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    config = build_config(read_run_config(run_dir))
    if dtype is not None:
        config.model.dtype = dtype
    technique = TECHNIQUES[config.technique.name]
    folder = run_dir / technique.result_dir_name
    if not folder.is_dir():
        status = ((_read_json(run_dir / "status.json") or {}).get("status")) or "unknown"
        raise ConfigError(f"{run_dir}: the run has no result in {folder.name}/ (status: {status}); "
                          "only a finished run can be opened")
    device = torch.device(device) if device is not None else default_device()
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir if tokenizer_dir.is_dir() else folder)
    model = technique.load_result(config, folder, device)
    model.eval()
    return LoadedRun(run_dir, config, model, tokenizer, folder)


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
               dtype: str = "auto") -> OpenedModel:
    """Open TARGET for evaluation: a run folder (through ``load_run``), a PEFT adapter folder (on the base its
    adapter_config.json names), a model folder, hub id or the embedded alias, optionally with ``adapter``."""
    from tunelab.config.schema import ModelConfig
    from tunelab.models import default_device, load_model, load_tokenizer

    device = torch.device(device) if device is not None else default_device()
    path = Path(target)
    check_local_target(path)
    if adapter is None and (path / "config.yaml").is_file():
        loaded = load_run(path, device=device, dtype=None if dtype == "auto" else dtype)
        return OpenedModel(path.name, loaded.model, loaded.tokenizer, loaded.config.model.name, loaded.config.model.dtype)
    if adapter is None and (path / "adapter_config.json").is_file():
        adapter, target = path, _adapter_base(path)
    model_config = ModelConfig(name=str(target), dtype=dtype)
    model = load_model(model_config, device)
    tokenizer = load_tokenizer(model_config)
    name = Path(str(target)).name or str(target)
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
        if (adapter.parent / "tokenizer").is_dir():  # an adapter inside a run folder: the run's tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter.parent / "tokenizer")
        model = PeftModel.from_pretrained(model, adapter).to(device)
        return OpenedModel(f"{name}+{adapter.name if adapter.name != 'adapter' else adapter.parent.name}",
                           model.eval(), tokenizer, str(target), dtype)
    return OpenedModel(name, model.eval(), tokenizer, None, dtype)


def check_local_target(path: Path) -> None:
    """Refuse, with what is there instead, a TARGET that names a local folder which is missing or holds no result.

    A missing ``runs/x`` would otherwise fall through to the model loader, which reads ``owner/name`` as a hub id
    and answers with a download hint. A name counts as local when it exists, starts with ``.``, ``/`` or ``~``,
    or when its parent folder exists here (``runs/`` for ``runs/x``)."""
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.yaml", "adapter_config.json", "config.json")):
            raise ConfigError(f"{path}: this folder is not a tunelab run (no config.yaml), a PEFT adapter (no "
                              "adapter_config.json) or a model (no config.json)")
        return
    text = str(path)
    local = text.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir())
    if path.exists() or not local:
        return
    runs = sorted(p.name for p in path.parent.iterdir() if (p / "config.yaml").is_file()) if path.parent.is_dir() else []
    import difflib

    close = difflib.get_close_matches(path.name, runs, n=1)
    hint = (f"; did you mean {path.parent / close[0]}?" if close else
            f"; runs in {path.parent}: {', '.join(runs[:8])}" if runs else "")
    raise ConfigError(f"{path}: no such run, adapter or model folder{hint}")


def _adapter_base(adapter: Path) -> str:
    base = (_read_json(adapter / "adapter_config.json") or {}).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter / 'adapter_config.json'}: no base_model_name_or_path; give the base model as "
                          "TARGET and the adapter with --adapter")
    return base
