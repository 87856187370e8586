"""The command line: verbs named after the lifecycle of a fine-tune (data, train, runs, quickstart, ...)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune open language models, measure, ship.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate data before training.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

SetOption = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config field (repeatable): --set training.max_steps=10")]


def _fail(message: str, code: int = 2) -> None:
    from tunelab.console import err_console

    err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    from tunelab.config import ConfigError
    from tunelab.data import DataError
    from tunelab.models import ModelLoadError
    from tunelab.techniques import TechniqueError
    from tunelab.trainer import TrainingAborted

    return ConfigError, DataError, ModelLoadError, TechniqueError, TrainingAborted


def _setup_logging() -> None:
    import warnings

    from rich.logging import RichHandler

    from tunelab.console import err_console

    # Logs go to stderr so that stdout stays clean for results (`data inspect --json`, `config show`).
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    for noisy in ("httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def train(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's latest checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """Fine-tune a model as the config says; writes a run folder (see `tunelab runs`)."""
    _setup_logging()
    from tunelab.api import train as run_train
    from tunelab.config import load_config

    try:
        cfg = load_config(config, set_)
        # The way back after Ctrl-C: this very command with --resume, every --set repeated.
        again = ["tunelab", "train", str(config), "--resume", *(f"--set={item}" for item in set_ or [])]
        _run_training(lambda: run_train(cfg, resume=resume, progress=progress), resume_command=shlex.join(again))
    except _user_errors() as exc:
        _fail(str(exc))


def _run_training(start: Callable[[], Any], resume_command: str) -> None:
    """Run ``start()`` (a training run), then print its before/after table or how to continue it."""
    from tunelab.console import console, print_before_after

    try:
        result = start()
    except KeyboardInterrupt:  # Ctrl-C outside the loop's step boundary (set-up, final evaluation) or a second one
        _fail(f"interrupted. If the run folder has a checkpoint, continue with: {resume_command} ; if it has none, "
              "the same command without --resume starts over.", code=130)
    if result.status == "interrupted":
        console.print(Text.assemble((f"Interrupted at step {result.step}.", "yellow"), " Continue with: ", resume_command),
                      highlight=False,
                      soft_wrap=True)  # soft_wrap: no line breaks inside a command meant to be copied
        raise typer.Exit(130)
    print_before_after(result.evaluation)
    console.print(Text.assemble((result.status, "bold green"), f" after {result.step} steps. Run folder: {result.run_dir}"))


@config_app.command("show")
def config_show(config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file")], set_: SetOption = None) -> None:
    """Print the resolved config, every default filled in."""
    from tunelab.config import ConfigError, load_config

    try:
        typer.echo(load_config(config, set_).to_yaml())
    except ConfigError as exc:
        _fail(str(exc))


@data_app.command("inspect")
def data_inspect(
    file: Annotated[list[Path], typer.Argument(metavar="FILE...", help="Data file(s) to inspect")],
    config: Annotated[Optional[Path], typer.Option(help="Config whose model/tokenizer and data settings to use")] = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Validate data files and print the data report, with one example's supervised tokens highlighted."""
    _setup_logging()
    from tunelab.api import inspect_data
    from tunelab.console import print_data_report

    try:
        report = inspect_data(file, config, set_)
    except _user_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_data_report(report)


@app.command()
def runs(root: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder holding run folders")] = Path("runs")) -> None:
    """List runs with their key figures (read from each run folder's files)."""
    from tunelab.console import console, print_runs
    from tunelab.runs import list_runs

    if not root.is_dir():
        _fail(f"{root}: no such folder (give the folder that holds run folders, by default runs/)")
    found = list_runs(root)
    if not found:
        console.print(f"no runs in {root}")
        return
    print_runs(found)


@app.command()
def quickstart(
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """LoRA on the embedded SmolLM2-135M-Instruct with the shipped pydoc Q&A data, then a before/after table."""
    _setup_logging()
    from tunelab.api import quickstart as run_quickstart

    try:
        # Running the same command again resumes an interrupted quickstart by itself.
        again = shlex.join(["tunelab", "quickstart", *(f"--set={item}" for item in set_ or [])])
        _run_training(lambda: run_quickstart(set_, progress=progress), resume_command=again)
    except _user_errors() as exc:
        _fail(str(exc))


def main() -> None:
    app(prog_name="tunelab")


if __name__ == "__main__":
    sys.exit(main())
