"""The Python API, mirroring the CLI for notebooks: ``tunelab.train(config)``, ``tunelab.inspect_data(path)``."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from tunelab.compare import compare as run_compare
from tunelab.compare import split_technique_items
from tunelab.config import TunelabConfig, build_config, load_config
from tunelab.data import DataError, load_file
from tunelab.data.prepare import tokenized_sides
from tunelab.data.report import mask_segments
from tunelab.errors import ConfigError
from tunelab.eval.runner import EvalSettings
from tunelab.eval.runner import evaluate as run_eval
from tunelab.models import load_tokenizer
from tunelab.objectives import check_records, prepare_objective_data
from tunelab.result import LoadedRun
from tunelab.result import load_run as open_run
from tunelab.checkpoint import latest_checkpoint
from tunelab.runs import read_json
from tunelab.techniques.attach import load_adapter as attach
from tunelab.training import RunResult
from tunelab.training import train as run_train
from tunelab.training.resume import resume_config_changes

log = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "recipes"


def as_config(config: TunelabConfig | str | Path | dict[str, Any], overrides: list[str] | None = None) -> TunelabConfig:
    """Accept a config object, a YAML path or a plain dict (validated like a file)."""
    if isinstance(config, TunelabConfig):
        return build_config(config.model_dump(mode="json"), overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config, overrides)
    return load_config(config, overrides)


def train(config: TunelabConfig | str | Path | dict[str, Any], overrides: list[str] | None = None,
          resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune as ``config`` says and return a RunResult (run folder, status, step, before/after)."""
    return run_train(as_config(config, overrides), resume=resume, progress=progress)


def compare(config: TunelabConfig | str | Path | dict[str, Any], techniques: list[str], out: str | Path,
            seeds: int = 1, lr_sweep: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """``tunelab compare`` in Python: train each technique (x seeds, x 3 learning rates with ``lr_sweep``) as run
    folders under ``out``, resuming an interrupted compare there; returns compare.json's content. An override
    ``technique.KEY=VALUE`` applies to every technique compared (refused for one that has no KEY)."""
    config_items, technique_items = split_technique_items(overrides)
    return run_compare(as_config(config, config_items), techniques, Path(out), seeds=seeds, lr_sweep=lr_sweep,
                       technique_items=technique_items)


def load_run(run: str | Path, device: Any = None, dtype: str | None = None) -> LoadedRun:
    """Open a finished run folder: its model (any technique's result) and tokenizer, ready for inference."""
    return open_run(run, device=device, dtype=dtype)


def load_adapter(model: Any, path: str | Path) -> Any:
    """Attach a saved adapter (an adapter folder or a run folder) to a plain transformers model of its base:
    bottleneck and routing adapters in place, a PEFT adapter as a PeftModel. See tunelab.techniques.attach."""
    return attach(model, path)


def evaluate(target: str | Path, data: list[str | Path] | str | Path, against: list[str] | None = None,
             adapter: str | Path | None = None, output: str | Path | None = None, progress: bool = False,
             **settings: Any) -> dict[str, Any]:
    """``tunelab eval`` in Python: score ``target`` on ``data`` and compare it with ``against`` ('base', runs or
    models). ``settings`` are EvalSettings fields (metrics, labels, max_new_tokens, ...); returns eval.json's
    content and writes the report files."""
    known = {f.name for f in fields(EvalSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown evaluation setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    files = [data] if isinstance(data, (str, Path)) else list(data)
    return run_eval(target, files, against, adapter=adapter, output=output, settings=EvalSettings(**settings),
                    progress=progress)


def inspect_data(files: list[str | Path] | str | Path, config: TunelabConfig | str | Path | dict[str, Any] | None = None,
                 overrides: list[str] | None = None, index: int = 0, count: int = 1) -> dict[str, Any]:
    """Validate data files and return the data report (the same one every run writes to data_report.json), plus
    ``examples``: records ``index`` to ``index + count - 1`` (0-based, over the files in order) tokenized, each as
    segments marked supervised or not."""
    files = [files] if isinstance(files, (str, Path)) else files
    cfg = as_config(config or {}, overrides)
    data_config = cfg.data.model_copy(update={"train": [str(Path(f).resolve()) for f in files], "cache": False})
    tokenizer = load_tokenizer(cfg.model)
    # read as a run of the config's objective reads it (its classes, prompts); also sets the chat template as training would
    data = prepare_objective_data(cfg.objective, data_config, tokenizer, None)
    if config is not None:
        # the config's objective trains on one kind of records: data that train refuses is refused here, in its words
        check_records(cfg.objective, data, data_config.train)
    report = data.report
    report["examples"] = _tokenized_records(data_config, tokenizer, index, count)
    return report


def _tokenized_records(data_config: Any, tokenizer: Any, index: int, count: int) -> list[dict[str, Any]]:
    if index < 0 or count < 1:
        raise DataError(f"index {index}, count {count}: give an index of 0 or more and a count of 1 or more")
    records = [e for path in data_config.train for e in load_file(path, data_config.format, data_config.columns).examples]
    if index >= len(records):
        raise DataError(f"--index {index}: the data has {len(records)} records, so the index goes from 0 to "
                        f"{len(records) - 1}")
    return [{"source": f"{e.source} ({name})" if name else e.source, "segments": mask_segments(tokenizer, tokens)}
            for e in records[index:index + count] for name, tokens in tokenized_sides(e, tokenizer, data_config)]


QUICKSTART_DIR = "runs/quickstart"


def quickstart_config(overrides: list[str] | None = None) -> TunelabConfig:
    """The quickstart recipe: LoRA on the embedded SmolLM2-135M-Instruct with the shipped pydoc Q&A data."""
    return load_config(RECIPES / "quickstart.yaml", [f"output.dir={QUICKSTART_DIR}", *(overrides or [])])


def quickstart(overrides: list[str] | None = None, progress: bool = True) -> RunResult:
    """Run the quickstart recipe. Run again, it resumes an interrupted quickstart with the same config, and
    otherwise replaces its own previous demo run in runs/quickstart; any other output.dir is treated as
    `train` treats it (an existing run there is never replaced unless output.overwrite says so)."""
    config = quickstart_config(overrides)
    run_dir = Path(config.output.dir)
    status = (read_json(run_dir / "status.json") or {}).get("status")
    resume = status in ("interrupted", "failed", "running") and latest_checkpoint(run_dir / "checkpoints") is not None
    if resume and any(resume_config_changes(config, run_dir)):  # any change at all: the user asked for another run
        log.warning("the config differs from the interrupted quickstart in %s: starting over", run_dir)
        resume = False
    if not resume and run_dir.resolve() == Path(QUICKSTART_DIR).resolve():
        config.output.overwrite = True  # the demo's own folder: its previous run is tunelab's output, not the user's
    return run_train(config, resume=resume, progress=progress)
