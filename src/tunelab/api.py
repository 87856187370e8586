"""The Python API, mirroring the CLI for notebooks: ``tunelab.train(config)``, ``tunelab.inspect_data(path)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import TunelabConfig, build_config, load_config

RECIPES = Path(__file__).parent / "recipes"


def as_config(config: TunelabConfig | str | Path | dict[str, Any], overrides: list[str] | None = None) -> TunelabConfig:
    """Accept a config object, a YAML path or a plain dict (validated like a file)."""
    if isinstance(config, TunelabConfig):
        return build_config(config.model_dump(mode="json"), overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config, overrides)
    return load_config(config, overrides)


def train(config: TunelabConfig | str | Path | dict[str, Any], overrides: list[str] | None = None,
          resume: bool = False, progress: bool = True):  # noqa: ANN201 - RunResult, imported lazily (torch)
    """Fine-tune as ``config`` says and return a RunResult (run folder, status, step, before/after)."""
    from tunelab.trainer import train as run_train

    return run_train(as_config(config, overrides), resume=resume, progress=progress)


def inspect_data(files: list[str | Path] | str | Path, config: TunelabConfig | str | Path | dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate data files and return the data report (the same one every run writes to data_report.json)."""
    from tunelab.data import prepare_data
    from tunelab.models import load_tokenizer

    files = [files] if isinstance(files, (str, Path)) else files
    cfg = as_config(config or {}, overrides)
    data_config = cfg.data.model_copy(update={"train": [str(Path(f).resolve()) for f in files], "cache": False})
    tokenizer = load_tokenizer(cfg.model)
    return prepare_data(data_config, tokenizer).report


def quickstart_config(overrides: list[str] | None = None) -> TunelabConfig:
    """The quickstart recipe: LoRA on the embedded SmolLM2-135M-Instruct with the shipped pydoc Q&A data."""
    return load_config(RECIPES / "quickstart.yaml", ["output.dir=runs/quickstart", *(overrides or [])])
