"""The command line: verbs named after the lifecycle of a fine-tune (data, train, runs, quickstart, ...)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from typer.core import TyperOption
from rich.table import Table
from rich.text import Text

from tunelab.console import (NAME_COLUMN, console, err_console, print_before_after, print_data_report,
                             print_eval_report, print_quantize_table, print_run_details, print_runs,
                             print_runs_side_by_side, print_table, wrap_words)
from tunelab.errors import USER_ERRORS, ConfigError
from tunelab.serve import DEFAULT_MAX_BODY_BYTES, SCHEDULINGS  # constants: no FastAPI, no pydantic

if TYPE_CHECKING:
    from tunelab.generation import Sampling


def _flag_type(display_type_rich: Callable[..., str | None]) -> Callable[..., str | None]:
    """typer 0.29's rich help prints a type after a flag (`--version <bool>`), as if it took a value; its plain
    help leaves a flag's type out (TyperOption.get_help_record). Same rule for the rich help."""
    def display(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else display_type_rich(self, ctx)
    return display


TyperOption.display_type_rich = _flag_type(TyperOption.display_type_rich)  # type: ignore[method-assign]


# Each command imports what it runs inside its function: those modules load torch and transformers (seconds),
# which `tunelab --help` and a mistyped command should not wait for.

def invoked_as(argv0: str | None = None) -> str:
    """The command the user typed to start tunelab, so a printed command can be pasted back as it is:
    `.venv/bin/tunelab` when that is how it was run (it is not on PATH then), `tunelab` when PATH finds it."""
    import shutil

    argv0 = sys.argv[0] if argv0 is None else argv0
    path = Path(argv0)
    if path.name in ("tunelab", "tunelab.exe"):
        found = shutil.which("tunelab")
        if found and Path(found).resolve() == path.resolve():
            return "tunelab"
        return argv0
    if path.name in ("cli.py", "__main__.py") and path.parent.name == "tunelab":
        return f"{shlex.quote(sys.executable)} -m tunelab"
    return "tunelab"  # an embedding program (tests, a notebook): the documented name


# True only when `main` started this process (`tunelab`, `python -m tunelab`, a torchrun worker): then a command may
# replace the process (training.restart); invoked in-process (CliRunner, a notebook) it must not.
_PROCESS_IS_THE_COMMAND = False

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune open language models, measure, ship.",
                  epilog=f"Start with `{invoked_as()} quickstart`; `{invoked_as()} COMMAND --help` shows each command's "
                         "examples.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate data before training.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

SetOption = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config field (repeatable): --set training.max_steps=10")]
DataSetOption = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config field (repeatable): --set data.max_length=512")]


def _examples(*lines: str) -> str:
    """A --help epilog: one example command per line (\b keeps click from re-flowing them into one paragraph),
    each starting with the command as the user invoked tunelab, so it can be pasted back wherever tunelab lives."""
    command = invoked_as()
    return "\b\nExamples:\n" + "\n".join(f"  {command}{line.removeprefix('tunelab')}" for line in lines)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tunelab {version('tunelab')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")] = False,
) -> None:
    """Fine-tune open language models, measure, ship."""


def _fail(message: str, code: int = 2, wrap: bool = True) -> None:
    """Print a user error and exit. On a terminal the message is broken at spaces to its width (``wrap_words``:
    never inside a path or another run without spaces), as the terminal would otherwise break it mid-word at its
    edge. Anywhere else (a log: a compare's run) it is one line as written: soft_wrap, no line breaks of the
    console's own (a path wrapped at 80 columns was quoted back with a space inside it). ``wrap=False``: a message
    with a command to copy, which a line break would cut short when pasted into a shell."""
    text = f"error: {message}"
    if wrap and err_console.is_terminal:
        text = wrap_words(text, err_console.width)
    line = Text(text)
    line.stylize("bold red", 0, len("error:"))
    err_console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# Errors a user can fix: one line, no traceback, exit code 2.
_USER_ERRORS = USER_ERRORS  # tunelab's own errors, printed in one line without a traceback


def _setup_logging() -> None:
    import warnings

    from rich.logging import RichHandler

    # Logs go to stderr so that stdout stays clean for results (`data inspect --json`, `config show`).
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # PEFT hands prompt-learning prefixes to the model as `past_key_values`, which transformers 5 renamed `cache`
    # (and maps itself); its deprecation warning is attributed to torch's module call, so the filter above misses it
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    # bitsandbytes warns on import (through peft) that an optional CPU kernel package is absent: not actionable.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # absl: rouge-score logs "Using default tokenizer." at INFO for every scorer it builds (eval, train's samples)
    for noisy in ("httpx", "datasets", "urllib3", "filelock", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command(epilog=_examples(
    "tunelab train examples/beginner/lora-own-chat-data.yaml --set data.train=my_data.jsonl",
    "tunelab train CONFIG --set training.max_steps=20 --set output.dir=runs/short",
    "tunelab train CONFIG --resume          # after Ctrl-C: continue from the checkpoint",
))
def train(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's latest checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """Fine-tune a model as the config says; writes a run folder (see `tunelab runs`)."""
    _setup_logging()
    from tunelab.api import load_config, train as run_train  # start-up time (torch), as every command below
    from tunelab.distributed import launcher_prefix  # start-up time (accelerate)
    from tunelab.training.restart import prepare_training_process  # start-up time

    try:
        cfg = load_config(config, set_)
        prepare_training_process(cfg, _PROCESS_IS_THE_COMMAND)  # before anything is computed (may restart)
        # The way back after Ctrl-C: this very command with --resume, every --set repeated.
        again = ["train", str(config), "--resume", *(f"--set={item}" for item in set_ or [])]
        _run_training(lambda: run_train(cfg, resume=resume, progress=progress),
                      resume_command=f"{launcher_prefix()}{invoked_as()} {shlex.join(again)}")
    except _USER_ERRORS as exc:
        _fail(str(exc))


def _run_training(start: Callable[[], Any], resume_command: str) -> None:
    """Run ``start()`` (a training run), then print its before/after table or how to continue it."""
    try:
        result = start()
    except KeyboardInterrupt:  # Ctrl-C outside the loop's step boundary (set-up, final evaluation) or a second one
        _fail(f"interrupted. If the run folder has a checkpoint, continue with: {resume_command} ; if it has none, "
              "the same command without --resume starts over.", code=130, wrap=False)  # a command to copy
    if result.status == "interrupted":
        console.print(Text.assemble((f"Interrupted at step {result.step}.", "yellow"), " Continue with: ", resume_command),
                      highlight=False,
                      soft_wrap=True)  # soft_wrap: no line breaks inside a command meant to be copied
        raise typer.Exit(130)
    print_before_after(result.evaluation)
    steps = "step" if result.step == 1 else "steps"
    console.print(Text.assemble((result.status, "bold green"), f" after {result.step} {steps}. Run folder: {result.run_dir}"))


@app.command(epilog=_examples(
    "tunelab compare examples/beginner/lora-own-chat-data.yaml --techniques full,lora,ia3 --seeds 3 --out runs/compare",
    "tunelab compare CONFIG --techniques lora,prompt_tuning --lr-sweep --set data.packing=false --out runs/sweep",
    "tunelab compare CONFIG --techniques full,lora,ia3 --seeds 3 --out runs/compare   # again after Ctrl-C: resumes",
))
def compare(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file (its technique section applies to that technique only)")],
    techniques: Annotated[str, typer.Option(help="Comma-separated techniques, e.g. full,lora,qlora,prompt_tuning,ia3,adapter")],
    out: Annotated[Path, typer.Option(help="Folder of the compare: one run folder per run, compare.json, report.md, report.html")] = Path("runs/compare"),
    seeds: Annotated[int, typer.Option(help="Seeds per technique (training.seed, +1, ...): intervals need 2 or more")] = 1,
    lr_sweep: Annotated[bool, typer.Option("--lr-sweep", help="Also try each technique's default learning rate /3 and x3, and report the best")] = False,
    set_: SetOption = None,
) -> None:
    """Train techniques head to head on the same data and token budget, and compare them.

    Each technique trains at its own default learning rate; each run is an ordinary run folder under --out. Run
    the same command again after Ctrl-C: finished runs are kept, the interrupted one resumes. --set
    technique.KEY=VALUE applies to every technique compared (refused where one has no KEY). Quality is the
    objective's own validation figure (a DPO run's preference accuracy), else the config's first task metric
    computed on 20 generations or more (eval.num_samples), else the validation loss; how to read the report:
    docs/choosing.md, "How to read a compare report".
    """
    _setup_logging()
    from tunelab.api import compare as run_compare  # start-up time
    from tunelab.compare import CompareInterrupted  # start-up time
    from tunelab.compare.report import table  # start-up time

    names = [name.strip() for name in techniques.split(",") if name.strip()]
    try:
        # the Python API's compare: it gives --set technique.KEY=VALUE to every technique compared
        result = run_compare(config, names, out, seeds=seeds, lr_sweep=lr_sweep, overrides=set_)
    except (CompareInterrupted, KeyboardInterrupt) as exc:  # KeyboardInterrupt: while planning or writing the report
        _fail(f"interrupted{f' during run {exc}' if str(exc) else ''}; run the same command again to resume "
              "(finished runs are kept)", code=130)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    headers, rows = table(result)
    grid = Table(title=f"Techniques compared ({out})")
    for header in headers:
        grid.add_column(header, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    console.print(grid)
    if result["primary_metric"]:
        quality = result["primary_metric"]
        console.print(f"quality: {quality['name']} ({'higher' if quality['higher_is_better'] else 'lower'} is better)"
                      + (f"; {quality['note']}" if quality.get("note") else ""), highlight=False)
    for warning in result["warnings"]:
        err_console.print(warning, style="bold yellow", highlight=False)
    console.print(f"compare.json, report.md and report.html in {out}", highlight=False)


@config_app.command("show", epilog=_examples(
    "tunelab config show examples/beginner/lora-own-chat-data.yaml",
    "tunelab config show CONFIG --set technique.r=16 --no-descriptions",
))
def config_show(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file")], set_: SetOption = None,
    descriptions: Annotated[bool, typer.Option(help="Put each field's description above it, as a YAML comment")] = True,
) -> None:
    """Print the resolved config, every default filled in, each field with its description."""
    import yaml

    from tunelab.api import load_config  # start-up time
    from tunelab.config.describe import describe_yaml  # start-up time

    try:
        cfg = load_config(config, set_)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(describe_yaml(cfg, yaml.safe_load(cfg.to_yaml())) if descriptions else cfg.to_yaml())


JsonOption = Annotated[bool, typer.Option("--json", help="Print the table's data as JSON instead (for scripts)")]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@data_app.command("inspect", epilog=_examples(
    "tunelab data inspect my_data.jsonl --config examples/beginner/lora-own-chat-data.yaml",
    "tunelab data inspect my_data.jsonl --index 10 --count 3   # records 10, 11 and 12",
    "tunelab data inspect a.jsonl b.csv --set data.max_length=512 --json",
))
def data_inspect(
    file: Annotated[list[Path], typer.Argument(metavar="FILE...", help="Data file(s) to inspect")],
    config: Annotated[Optional[Path], typer.Option(help="Config whose model/tokenizer and data settings to use; the records must be the kind its objective trains on")] = None,
    set_: DataSetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    index: Annotated[int, typer.Option(min=0, help="First record to show tokenized (0 = the first, counted over the files in order)")] = 0,
    count: Annotated[int, typer.Option(min=1, help="How many records to show from --index on")] = 1,
) -> None:
    """Validate data files and print the data report, with records' supervised tokens highlighted."""
    _setup_logging()
    from tunelab.api import inspect_data  # start-up time

    try:
        report = inspect_data(file, config, set_, index=index, count=count)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_data_report(report)


@app.command(epilog=_examples("tunelab runs", "tunelab runs path/to/folder-of-runs",
                             "tunelab runs show runs/quickstart"))
def runs(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER|show", help="Folder holding run folders and compare folders (default runs/), or 'show'")] = Path("runs"),
    run: Annotated[Optional[list[Path]], typer.Argument(metavar="[RUN]...", help="With 'show': the run folder to describe, or several to show side by side")] = None,
    as_json: JsonOption = False,
) -> None:
    """List runs with their key figures, or describe one: `tunelab runs show RUN`; several side by side:
    `tunelab runs show RUN RUN ...`.

    Figures come from each run folder's files (config.yaml, status.json, metrics.jsonl, eval.json, run_info.json).
    """
    from tunelab.runs import list_run_groups, run_details  # start-up time

    if str(folder) == "show" and run:
        try:
            details = [run_details(path) for path in run]
        except _USER_ERRORS as exc:
            _fail(str(exc))
        try:
            if as_json:
                _print_json(details[0] if len(details) == 1 else details)
            elif len(details) == 1:
                print_run_details(details[0])
            else:
                print_runs_side_by_side(details)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a run file edited into other types
            _fail(f"{', '.join(map(str, run))}: a run file (run_info.json, eval.json, status.json) holds a value of "
                  f"another type than tunelab writes ({type(exc).__name__}: {exc})")
        return
    if run:
        _fail(f"unexpected argument {run[0]}: use `tunelab runs [FOLDER]` or `tunelab runs show RUN [RUN ...]`")
    if str(folder) == "show" and not folder.is_dir():  # 'show' alone said "show: no such folder"
        _fail("tunelab runs show needs the run folder(s) to describe: tunelab runs show RUN [RUN ...]")
    if not folder.is_dir():  # a file was named 'no such folder' too
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        _fail(f"{folder}: {what} (give the folder that holds run folders, by default runs/)")
    # with the runs of each compare folder in it: `tunelab compare` writes to runs/compare by default, and
    # `tunelab runs` then said 'no runs in runs'
    found = list_run_groups(folder)[0]
    if as_json:
        _print_json(found)
    elif not found:
        console.print(f"no runs in {folder}")
    else:
        print_runs(found)


@app.command("eval")
def eval_command(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="A run folder, a model folder or name, or a PEFT adapter folder")],
    data: Annotated[list[Path], typer.Option("--data", help="Evaluation file(s), in any training data format")],
    against: Annotated[Optional[list[str]], typer.Option("--against", help="Compare with 'base' (the target's base model), a run folder or a model (repeatable)")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="A PEFT adapter to put on TARGET (a model)")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Report folder (default: RUN/evals/<data name>[-vs-<systems>], or evals/<target>-<data name>[-vs-<systems>])")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the report of a different evaluation (other data, systems or settings) in the output folder")] = False,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="Generation metric (repeatable): exact_match, bleu, chrf, rouge_1, rouge_2, rouge_l, or module:function. Default: all built-in ones")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Classification: comma-separated labels, chosen by their log-likelihood")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Token budget of each generation")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass / generation batch")] = 8,
    max_examples: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N examples")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding (seeded by --seed)")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample)")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (with --sample)")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of sampling and of the bootstrap")] = 0,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals")] = 1000,
    top_n: Annotated[int, typer.Option(help="Biggest improvements and regressions shown")] = 5,
    primary: Annotated[Optional[str], typer.Option(help="Metric that ranks improvements/regressions (default rouge_l, accuracy or exact_match)")] = None,
    keep_case: Annotated[bool, typer.Option("--keep-case", help="Exact match: do not lowercase")] = False,
    keep_punctuation: Annotated[bool, typer.Option("--keep-punctuation", help="Exact match: do not strip punctuation")] = False,
    dtype: Annotated[str, typer.Option(help="Weight dtype: auto, float32, bfloat16, float16")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report (eval.json) as JSON instead of tables")] = False,
) -> None:
    """Task metrics of a model on a data file, compared with its base or other runs, with 95% intervals.

    Examples: tunelab eval runs/quickstart --data test.jsonl --against base ;
    tunelab eval runs/lora --data test.jsonl --against runs/full --against base
    """
    _setup_logging()
    from tunelab.eval.runner import EvalSettings, evaluate  # start-up time
    from tunelab.metrics import Normalization  # start-up time
    from tunelab.techniques import figure_tables  # start-up time

    defaults = EvalSettings()
    settings = EvalSettings(
        metrics=metric or defaults.metrics, labels=[x.strip() for x in labels.split(",")] if labels else None,
        normalization=Normalization(lowercase=not keep_case, strip_punctuation=not keep_punctuation),
        max_new_tokens=max_new_tokens, batch_size=batch_size, max_examples=max_examples, do_sample=sample,
        temperature=temperature, top_p=top_p, seed=seed, resamples=resamples, top_n=top_n, primary=primary, dtype=dtype,
    )
    try:
        report = evaluate(target, data, against or [], adapter=adapter, output=output, settings=settings,
                          progress=progress, overwrite=overwrite)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    if as_json:
        _print_json(report)
    else:
        print_eval_report(report, figure_tables(report.get("technique") or {}))


def _bytes(text: str) -> int:
    """'24GiB', '512MiB', '8GB' or '1000000B'. A bare number is refused: '--budget 8' meant 8 bytes, and the plan
    answered 'budget 0.00 GiB: does NOT fit' to a user who meant 8 GiB."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit) and lowered[: -len(unit)].strip().replace(".", "", 1).isdigit():
            size = int(float(lowered[: -len(unit)]) * factor)
            if size <= 0:
                raise typer.BadParameter(f"'{text}': expected a size above zero, such as 24GiB")
            return size
    if lowered.replace(".", "", 1).isdigit():
        raise typer.BadParameter(f"'{text}': give a unit, e.g. {text}GiB or {text}MiB ({text}B for bytes)")
    raise typer.BadParameter(f"'{text}': expected a size such as 24GiB, 512MiB or 8GB")


@app.command(epilog=_examples(
    "tunelab plan examples/beginner/lora-own-chat-data.yaml",
    "tunelab plan CONFIG --budget 8GiB --solve micro_batch_size",
    "tunelab plan CONFIG --budget 4GiB --recommend --json",
))
def plan(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file")],
    set_: SetOption = None,
    device: Annotated[str, typer.Option(help="cpu (peak RSS) or cuda (max_memory_allocated + context)")] = "cpu",
    budget: Annotated[Optional[str], typer.Option(help="Memory budget for --solve and --recommend, e.g. 24GiB")] = None,
    solve: Annotated[Optional[str], typer.Option(help="Find the largest micro_batch_size or max_length that fits --budget")] = None,
    recommend: Annotated[bool, typer.Option("--recommend", help="Rank technique x dtype x checkpointing set-ups that fit --budget; "
                                     "times the config's technique by training shallow copies of the model (about a minute on a CPU)")] = False,
    time: Annotated[Optional[str], typer.Option("--time", metavar="TECHNIQUES", help="With --recommend: time these techniques' "
                                                "set-ups too (comma-separated names, or all; about a minute each on a CPU)")] = None,
    processes: Annotated[int, typer.Option(help="Processes training together (torchrun --nproc_per_node x nodes); "
                                           "with training.distributed: fsdp each holds 1/N of the model")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Predict a run's peak memory, term by term, without loading weights (docs/choosing.md). With --processes N
    (torchrun) the figures are each process's."""
    _setup_logging()
    from tunelab.api import load_config  # start-up time
    from tunelab.plan import data_shape, plan_memory  # start-up time (torch, transformers)
    from tunelab.plan.solve import SOLVABLE, context_ceiling, solve_ceiling, timed_techniques  # start-up time
    from tunelab.plan.solve import (RECOMMEND_HEADROOM, recommend as rank_setups, recommend_dtypes,  # start-up time
                                    solve as solve_knob)

    if device not in ("cpu", "cuda"):
        _fail(f"--device {device}: expected cpu or cuda")
    if (solve or recommend) and budget is None:
        _fail("--solve and --recommend need --budget (e.g. --budget 24GiB)")
    if time is not None and not recommend:
        _fail("--time times --recommend's set-ups: add --recommend (and --budget)")
    if processes < 1:
        _fail(f"--processes {processes}: expected 1 or more")
    if solve is not None and solve not in SOLVABLE:  # before planning, which takes seconds to minutes
        _fail(f"--solve {solve}: expected one of {', '.join(SOLVABLE)}")
    times = [name.strip() for name in time.split(",") if name.strip()] if time else None
    limit = _bytes(budget) if budget is not None else None
    try:
        cfg = load_config(config, set_)
        timed = timed_techniques(cfg, times)  # recommend's own check of the names, made here before any planning
        shape = data_shape(cfg)
        result = plan_memory(cfg, device, shape, processes=processes)
        out: dict[str, Any] = result.as_dict()
        if limit is not None:
            out["budget_bytes"], out["fits"] = limit, result.peak_bytes <= limit
        if solve:
            value, solved = solve_knob(cfg, shape, limit or 0, solve, device, processes=processes)
            ceiling = solve_ceiling(solve, solved)  # the model's context for max_length, where its config says it
            out["solve"] = {"knob": solve, "value": value, "peak_bytes": solved.peak_bytes if value is not None else None,
                            "at_ceiling": value == ceiling, "ceiling": ceiling,  # the search stops there
                            "ceiling_is_context": ceiling == context_ceiling(solved) and solve == "max_length",
                            "virtual_tokens": solved.virtual_tokens}  # what the context holds beside max_length
            if value is None:  # what the smallest value (1, or 16 tokens) would need
                out["solve"]["smallest"] = {"value": solved.shape.micro_batch_size if solve == "micro_batch_size"
                                            else solved.shape.length, "peak_bytes": solved.peak_bytes}
        if recommend:
            dtypes, why = recommend_dtypes(device)
            out["recommend_dtypes"] = {"dtypes": dtypes, "why": why}
            out["recommend_within"] = f"{1 - RECOMMEND_HEADROOM:.0%}"
            ranked = rank_setups(cfg, shape, limit or 0, device, processes, timed)
            out["recommend_timing"] = ranked.timing
            out["recommend"] = [{"technique": s.technique, "gradient_checkpointing": s.checkpointing, "dtype": s.dtype,
                                 "peak_bytes": s.plan.peak_bytes, "seconds_per_step":
                                 None if s.seconds_per_step is None else round(s.seconds_per_step, 3),
                                 "why": s.why, "notes": s.plan.notes} for s in ranked.set_ups]
    except _USER_ERRORS as exc:
        _fail(str(exc))
    if as_json:
        _print_json(out)
        return
    _print_plan(out)


def _rows(out: dict[str, Any]) -> str:
    """' (8 rows)' when a record is several rows (a preference pair's two sides), else nothing."""
    rows = out.get("rows", out["micro_batch_size"])
    return f" ({rows} rows)" if rows != out["micro_batch_size"] else ""


def _print_plan(out: dict[str, Any]) -> None:
    gib = 2**30
    console.print(f"Planned peak ({'RSS' if out['device'] == 'cpu' else 'max_memory_allocated + context'}): "
                  f"{out['peak_bytes'] / gib:.2f} GiB at the {out['peak_phase']}, "
                  f"micro-batch {out['micro_batch_size']}{_rows(out)} x {out['length']} tokens, {out['dtype']}", highlight=False)
    _print_peak_terms(out)
    for note in out["notes"]:
        console.print(f"note: {note}", highlight=False)
    if "fits" in out:
        console.print(f"budget {out['budget_bytes'] / gib:.2f} GiB: {'fits' if out['fits'] else 'does NOT fit'}", highlight=False)
    if "solve" in out:
        solved = out["solve"]
        if solved["value"] is None:
            smallest = solved["smallest"]
            console.print(f"no {solved['knob']} fits the budget: even {smallest['value']} needs "
                          f"{smallest['peak_bytes'] / gib:.2f} GiB", highlight=False)
        elif solved.get("at_ceiling") and solved.get("ceiling_is_context"):
            virtual = solved.get("virtual_tokens") or 0
            less = f" less the technique's {virtual} virtual tokens, which every row adds" if virtual else ""
            console.print(f"{solved['knob']} {solved['value']} fits: the model's context (its config's "
                          f"max_position_embeddings){less}, the longest the search tries", highlight=False)
        elif solved.get("at_ceiling"):
            console.print(f"{solved['knob']} {solved['value']} fits, and more may: the search stops at "
                          f"{solved['value']}", highlight=False)
        else:
            console.print(f"largest {solved['knob']} that fits: {solved['value']}", highlight=False)
    if "recommend_dtypes" in out:
        console.print(f"set-ups ranked in {' and '.join(out['recommend_dtypes']['dtypes'])} "
                      f"({out['recommend_dtypes']['why']}), each planned within {out['recommend_within']} of the "
                      f"budget (the planner's measured error)", highlight=False)
        if not out["recommend"]:
            console.print("no set-up fits the budget", highlight=False)
    if "recommend_timing" in out:
        console.print(out["recommend_timing"], highlight=False)
    noted: dict[str, list[int]] = {}  # each note once, after the list, with the set-ups it is about
    for rank, setup in enumerate(out.get("recommend", []), 1):
        console.print(f"{rank}. {setup['technique']} {setup['dtype']} checkpointing "
                      f"{'on' if setup['gradient_checkpointing'] else 'off'}: {setup['why']}", highlight=False)
        for note in setup["notes"]:
            noted.setdefault(note, []).append(rank)
    for note, ranks in noted.items():
        console.print(f"note ({_ranks(ranks)}): {note}", highlight=False)


def _print_peak_terms(out: dict[str, Any]) -> None:
    """How the peak is made: the runtime term and the peak phase's terms, summed to the peak, then every phase's sum
    (the largest is the peak) and the terms held in other phases only. Every term of every phase in one table
    (loading and runtime among them) did not add up to the peak, and did not say which terms did."""
    gib, phase = 2**30, out["peak_phase"]
    terms = {**out["phase_terms"][phase], "runtime": out["components"]["runtime"]}
    table = Table(title=f"Peak at the {phase}", title_justify="left", show_footer=True)
    table.add_column("term", footer="peak", **NAME_COLUMN)
    table.add_column("GiB", justify="right", footer=f"{out['peak_bytes'] / gib:.3f}")
    for name, value in terms.items():
        table.add_row(name, f"{value / gib:.3f}")
    print_table(table)
    phases = ", ".join(f"{name} {value / gib:.3f}" for name, value in out["phases"].items())
    console.print(f"phases (GiB, runtime not included; the peak is the largest): {phases}", highlight=False)
    # the loading term is the load phase's sum, on the phases line
    elsewhere = {name: value for name, value in out["components"].items() if name not in terms and name != "loading"}
    if elsewhere:
        listed = ", ".join(f"{name} {value / gib:.3f}" for name, value in elsewhere.items())
        console.print(f"terms of other phases only (GiB): {listed}; --json lists each phase's terms", highlight=False)


def _ranks(ranks: list[int]) -> str:
    """'set-up 3' or 'set-ups 2, 4, 5'."""
    return f"set-up {ranks[0]}" if len(ranks) == 1 else f"set-ups {', '.join(map(str, ranks))}"


@app.command()
def techniques(
    model: Annotated[str, typer.Option(help="Model to count trainable parameters for (no weights are read)")] = "smollm2-135m-instruct",
    as_json: JsonOption = False,
) -> None:
    """List every technique: what it does, the parameters it trains on MODEL, whether it merges and packs."""
    _setup_logging()
    from tunelab.techniques.catalog import catalog  # start-up time

    try:
        entries = catalog(model)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    if as_json:
        _print_json([{"technique": e.name, "trainable": e.trainable, "total": e.total, "merges": e.merges is None,
                      "why_not_merge": e.merges, "packs": e.packs is None, "why_not_pack": e.packs,
                      "summary": e.summary, "problem": e.problem} for e in entries])
        return
    table = Table(title=f"Techniques (parameter counts for {model}, default settings)", title_justify="left")
    for column in ("technique", "trains", "share", "merges", "packs", "summary"):
        table.add_column(column, justify="right" if column in ("trains", "share") else "left",
                         **(NAME_COLUMN if column == "technique" else {"overflow": "fold"}))
    for e in entries:
        trains = f"{e.trainable:,}" if e.trainable is not None else "does not fit"
        share = f"{100 * e.trainable / e.total:.3f}%" if e.trainable is not None else ""
        table.add_row(e.name, trains, share, "yes" if e.merges is None else "no", "yes" if e.packs is None else "no",
                      e.summary if e.problem is None else f"{e.summary} ({e.problem})")
    print_table(table)
    console.print("Why a technique does not merge or pack: docs/techniques/compatibility.md", highlight=False)


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A finished run folder")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the merged model (default: RUN/merged)")] = None,
) -> None:
    """Fold the run's adapter into the base weights: a standalone model, checked against the adapter model."""
    _setup_logging()
    from tunelab.export.merge import merge_run  # start-up time

    try:
        outcome = merge_run(run, out)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    check = outcome.check
    console.print(check.note, highlight=False)
    console.print(f"merge check on {check.tokens} tokens of {check.batches} batches ({check.source}): "
                  f"max logit difference {check.max_logit_diff:.3g}, mean KL {check.mean_kl:.3g}", highlight=False)
    if check.figures is not None:  # an objective's own batches: its loss per unit, adapter against merged
        adapter, merged = check.figures["adapter"]["loss"], check.figures["merged"]["loss"]
        console.print(f"{check.objective} loss per unit: adapter {adapter:.6g}, merged {merged:.6g}; largest "
                      f"difference of its figures {check.max_figure_diff:.3g}", highlight=False)
        if check.figures_note:  # training's final validation loss of the same records may read otherwise
            console.print(f"note: {check.figures_note}", highlight=False)
    console.print(Text.assemble(("merged", "bold green"), f" into {outcome.out_dir} (loads with plain transformers; "
                                "the check is saved there as merge_check.json)"), highlight=False)


@app.command(epilog=_examples(
    "tunelab quickstart                       # run again after Ctrl-C: it resumes",
    "tunelab quickstart --set training.max_steps=10",
))
def quickstart(
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar")] = True,
) -> None:
    """LoRA on the embedded SmolLM2-135M-Instruct with the shipped pydoc Q&A data, then a before/after table."""
    _setup_logging()
    from tunelab.api import quickstart as run_quickstart, quickstart_config  # start-up time
    from tunelab.training.restart import prepare_training_process  # start-up time

    try:
        prepare_training_process(quickstart_config(set_), _PROCESS_IS_THE_COMMAND)  # before anything is computed
        # Running the same command again resumes an interrupted quickstart by itself.
        again = f"{invoked_as()} {shlex.join(['quickstart', *(f'--set={item}' for item in set_ or [])])}"
        _run_training(lambda: run_quickstart(set_, progress=progress), resume_command=again)
    except _USER_ERRORS as exc:
        _fail(str(exc))


RunArgument = Annotated[Path, typer.Argument(metavar="RUN", help="A finished run folder (e.g. runs/quickstart)")]
# The sampling options of `generate` and `chat`, with the meaning the server gives its request fields of these names
TemperatureOption = Annotated[float, typer.Option(min=0.0, help="0 is greedy (the default); 1e-05 and above samples (a smaller one would overflow the logits and is refused)")]
TopPOption = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Sample only from the most likely tokens that together reach this probability (with --temperature above 0); 1 keeps all")]
TopKOption = Annotated[int, typer.Option("--top-k", min=0, help="Sample only from the k most likely tokens (with --temperature above 0); 0 is off")]
RepetitionPenaltyOption = Annotated[Optional[float], typer.Option("--repetition-penalty", min=0.0, help="Above 1 makes tokens already in the prompt or answer less likely (greedy too); default: the model's own setting")]
StopOption = Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT", help="End the answer where this text appears, without it (repeatable)")]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed for sampling: the same seed gives the same answers")]
# generate, chat and serve load a run alike (result.load_for_generation), so their greedy answers are equal
GenerationDtypeOption = Annotated[str, typer.Option("--dtype", help="Weights' dtype: auto (the run's model.dtype; if that is auto too, bfloat16 on a CPU with native bfloat16, AMX or AVX512-BF16, else float32), float32 or bfloat16. bfloat16 on a CPU is computed row by row, so a batched answer is the one a request gets alone (float32 where this CPU's kernels do not allow it, said at start)")]


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float | None,
              stop: list[str] | None, seed: int | None) -> Sampling:
    from tunelab.generation import Sampling  # start-up time (torch)

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=tuple(s for s in stop or () if s), seed=seed)


# generate and chat open an adapter folder on its own as well (on the base its adapter_config.json names)
ResultArgument = Annotated[Path, typer.Argument(metavar="RUN", help="A finished run folder (e.g. runs/quickstart), or "
                                                "an adapter folder (on the base its adapter_config.json names)")]


@app.command(epilog=_examples('tunelab generate runs/quickstart --prompt "What does json.dumps do?"', "tunelab generate runs/quickstart --data prompts.jsonl --json > outputs.jsonl"))
def generate(
    run: ResultArgument,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="JSONL/JSON/CSV/Parquet file of prompts: messages, instruction, prompt or text")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate per prompt")] = 128,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    repetition_penalty: RepetitionPenaltyOption = None,
    stop: StopOption = None,
    seed: SeedOption = None,
    raw: Annotated[Optional[bool], typer.Option("--raw/--chat", help="Raw text or the run's chat template (default: as the run was trained)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per prompt (prompt, output, finish reason)")] = False,
    dtype: GenerationDtypeOption = "auto",
) -> None:
    """Generate from a finished run: one-shot (--prompt) or batch (--data), greedy by default."""
    _setup_logging()
    from tunelab.use import generate_from_run  # start-up time

    if bool(prompt) == bool(data):
        _fail("give --prompt TEXT (repeatable) or --data FILE, not both and not neither")
    try:
        sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
        for record in generate_from_run(run, prompt, data, sampling, raw, batch_size, dtype):
            typer.echo(json.dumps(record, ensure_ascii=False) if as_json or data else record["output"])
    except _USER_ERRORS as exc:
        _fail(str(exc))


@app.command(epilog=_examples("tunelab chat runs/quickstart", 'tunelab chat runs/quickstart --system "Answer briefly."'))
def chat(
    run: ResultArgument,
    system: Annotated[Optional[str], typer.Option(help="A system message to start the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per reply")] = 256,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    repetition_penalty: RepetitionPenaltyOption = None,
    stop: StopOption = None,
    seed: SeedOption = None,
    dtype: GenerationDtypeOption = "auto",
) -> None:
    """Talk to a finished run in the terminal, with the run's chat template and end tokens.
    /reset starts over, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply."""
    _setup_logging()
    from tunelab.use import chat_loop  # start-up time

    try:
        chat_loop(run, system, _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed),
                  dtype=dtype)
    except _USER_ERRORS as exc:
        _fail(str(exc))


# The HTTP guard options `serve` and `ui` share.
ApiKeyOption = Annotated[Optional[str], typer.Option(
    envvar="TUNELAB_API_KEY", show_default=False,
    help="Require 'Authorization: Bearer KEY' on every route but /health and the page (401 otherwise); "
         "prefer the environment variable, which stays out of shell history and process lists")]
MaxBodyOption = Annotated[int, typer.Option(min=1, help="Largest request body in bytes; a larger one gets 413 unread")]


@app.command(epilog=_examples("tunelab serve runs/quickstart", "tunelab serve runs/lora-a runs/lora-b --port 8080"))
def serve(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run (or adapter) folders to serve: LoRA adapters "
                                               "of one base together, any other result alone")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Requests at once; more get 429")] = 64,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="The most tokens one request may ask for")] = 1024,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds before a request is cancelled (408)")] = 120.0,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests generated together")] = 16,
    runs_root: Annotated[Optional[Path], typer.Option(help="Folder of runs the web UI lists (default: the first run's parent)")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a model that needs remote code")] = False,
    api_key: ApiKeyOption = None,
    max_body_bytes: MaxBodyOption = DEFAULT_MAX_BODY_BYTES,
    scheduling: Annotated[str, typer.Option(hidden=True, help=f"{' | '.join(SCHEDULINGS)}: the server as it runs, "
                                            "or a comparison point of benchmarks/serve.py")] = "continuous",
    dtype: GenerationDtypeOption = "auto",
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) and web UI
    over one base with each run's adapter; a request picks its adapter with `model` (run name, or 'base')."""
    _setup_logging()
    from tunelab.serve.app import ServeSettings  # start-up time
    from tunelab.serve.server import build_app, serve as run_server  # start-up time

    if scheduling not in SCHEDULINGS:
        _fail(f"--scheduling {scheduling}: expected one of {', '.join(SCHEDULINGS)}")
    continuous, mixed = SCHEDULINGS[scheduling]
    try:
        settings = ServeSettings(max_concurrent=max_concurrent, max_tokens_limit=max_tokens_limit,
                                 request_timeout_s=timeout, max_batch_size=max_batch_size,
                                 runs_root=runs_root or runs[0].resolve().parent, api_key=api_key,
                                 max_body_bytes=max_body_bytes, continuous=continuous, mix_adapters=mixed, dtype=dtype)
        application = build_app(runs, settings, allow_remote_code=trust_remote_code)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    _announce(application, host, port)
    run_server(application, host, port)


def _announce(application: Any, host: str, port: int) -> None:
    from tunelab.serve.server import exposure_warning  # start-up time

    warning = exposure_warning(host, application.state.settings.api_key)
    if warning:
        err_console.print(warning, style="bold yellow", highlight=False)
    elif application.state.settings.api_key is not None:
        err_console.print(f"every route but /health and the page needs 'Authorization: Bearer <key>'; the page asks "
                          f"for the key, or open http://{host}:{port}/#key=<key>", highlight=False)
    engine = application.state.engine
    names = ", ".join(engine.served)
    if names:
        err_console.print(f"serving {names} at http://{host}:{port}/v1 ; web UI at http://{host}:{port}/", highlight=False)
    else:
        err_console.print(f"web UI at http://{host}:{port}/ (runs in {application.state.settings.runs_root}; no model "
                          "loaded: give run folders to chat with them)", highlight=False)


@app.command(epilog=_examples("tunelab ui", "tunelab ui runs/quickstart --port 8080",
                              "tunelab ui --runs-root experiments/runs"))
def ui(
    runs: Annotated[Optional[list[Path]], typer.Argument(metavar="[RUN]...", help="Run folders to chat with (one base); none: browse only")] = None,
    runs_root: Annotated[Optional[Path], typer.Option(help="Folder of runs to browse (default: the first run's parent, else runs/)")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a model that needs remote code")] = False,
    api_key: ApiKeyOption = None,
    max_body_bytes: MaxBodyOption = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Web UI in the browser: runs with their loss curves, eval reports and quantization tables, a compare view,
    and chat with the given runs side by side with their base. It is the page `tunelab serve` serves at /, over
    the same OpenAI-compatible API; with no RUN nothing is loaded and the page only browses runs."""
    _setup_logging()
    from tunelab.serve.app import ServeSettings  # start-up time
    from tunelab.serve.server import build_ui_app, serve as run_server  # start-up time

    runs = list(runs or [])
    root = runs_root or (runs[0].resolve().parent if runs else Path("runs"))
    try:
        settings = ServeSettings(runs_root=root, api_key=api_key, max_body_bytes=max_body_bytes)
        application = build_ui_app(runs, settings, allow_remote_code=trust_remote_code)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    _announce(application, host, port)
    run_server(application, host, port)


@app.command(epilog=_examples("tunelab quantize runs/quickstart", "tunelab quantize runs/quickstart --methods int8,dynamic-int8", "tunelab quantize runs/quickstart --methods nf4 --save nf4"))
def quantize(
    run: RunArgument,
    methods: Annotated[str, typer.Option(help="Comma-separated: int8, nf4, fp4, dynamic-int8, gptq, awq")] = "int8,nf4,fp4,dynamic-int8,gptq,awq",
    samples: Annotated[int, typer.Option(min=1, help="Validation prompts for the speed and same-answer figures")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per prompt when timing")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table's data (quantize.json) as JSON instead")] = False,
    save: Annotated[Optional[str], typer.Option(metavar="METHOD", help="Also keep this method's quantized model, as measured, in RUN/quantized-METHOD/ (loadable by plain transformers) with its figures: int8, nf4 or fp4")] = None,
) -> None:
    """Quantize a run's result several ways and compare size, memory, speed and validation loss with the
    unquantized model; the table is saved as RUN/quantize.json. Methods that cannot run here say why."""
    _setup_logging()
    from tunelab.export.quantize import parse_methods, quantize_run  # start-up time

    say = logging.getLogger("tunelab.quantize").info
    try:
        report = quantize_run(run, parse_methods(methods), samples=samples, max_new_tokens=max_new_tokens,
                              on_row=lambda row: say("%s: %s", row.method, "measured" if row.status == "ok" else row.reason),
                              save=save)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    if as_json:
        _print_json(report)
        return
    print_quantize_table(report)
    typer.echo(f"saved {run / 'quantize.json'}")
    if report.get("saved"):
        typer.echo(f"saved the {save} model in {report['saved']} (its figures: quantization.json there)")


@app.command(epilog=_examples("tunelab export runs/quickstart --quant q8_0", "tunelab export runs/quickstart --out model.gguf"))
def export(
    run: RunArgument,
    format_: Annotated[str, typer.Option("--format", help="Export format: gguf")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF type: f32, f16, q8_0, q5_1, q5_0, q4_1, q4_0")] = "f16",
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN/exports/<run>-<quant>.gguf)")] = None,
    check: Annotated[bool, typer.Option(help="Read the file back and compare greedy tokens with the float model")] = True,
) -> None:
    """Export a run's merged model to one GGUF file (llama.cpp, Ollama, LM Studio), chat template included,
    then load it back and compare its greedy tokens with the unexported model."""
    _setup_logging()
    from tunelab.export.gguf import export_gguf  # start-up time

    if format_ != "gguf":
        _fail(f"--format {format_}: only gguf is exported here (merged safetensors come from `tunelab merge`)")
    try:
        report = export_gguf(run, quant, out, check=check)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    if report["kept"]:
        console.print(f"wrote {report['file']} ({report['size_mb']} MiB, {report['type']})", highlight=False)
    result = report.get("check")
    if result:
        console.print(f"check ({result['loader']}): greedy tokens equal on {result['same_greedy_tokens']:.0%} of "
                      f"{result['prompts']} prompts (required {result['required_same_greedy_tokens']:.0%} for "
                      f"{report['type']}), tokenization equal on {result['same_tokenization']:.0%}, chat template "
                      f"{'carried' if result['chat_template_carried'] else 'LOST'}", highlight=False)
        if not result["passed"]:  # the file was never put at its name: a failed export is not there to be used
            _fail(f"the exported file does not reproduce the model within this type's tolerance, so it was removed "
                  f"(nothing was written at {report['file']}); the check is in "
                  f"{Path(report['file']).with_suffix('.json')}", code=1)


def main() -> None:
    global _PROCESS_IS_THE_COMMAND
    _PROCESS_IS_THE_COMMAND = True
    app(prog_name="tunelab")


if __name__ == "__main__":
    sys.exit(main())
