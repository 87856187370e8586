"""`tunelab plan --solve` and `--recommend` against measured runs (issue 17's solver acceptance).

Solver: for each cell (model x technique x checkpointing at 256 tokens, the planner grid's set-up in
``plan_grid.py``), training processes at micro-batches 2, 3 and 4 report their own peak RSS. For each pair of
neighbours (m, m + 1) the budget is halfway between their two plans; the solver must choose m, the measured peak
at m must fit that budget and the measured peak at m + 1 must not ("the solved value runs, and the next step up
does not fit").

Recommend: for each model and budget, the first set-up `--recommend` ranks (technique with its default settings,
dtype, checkpointing) is trained for real at micro-batch 2; its measured peak must fit the budget.

Every run is a fresh process, 2 optimizer steps, one at a time (peak RSS does not depend on the machine's load)::

    python benchmarks/plan_solver.py measure --out bench/plan_solver.jsonl [--models smollm2,llama-narrow]
    python benchmarks/plan_solver.py report bench/plan_solver.jsonl     # runs the recommended set-ups it lacks

Records already in the output file are reused, so an interrupted measurement continues. Every run starts with
glibc's per-thread cache off where glibc keeps freed aligned blocks (``child_env``: tunelab's remedy for glibc bug
30723, docs/choosing.md). ``report --measured-only`` trains nothing (a pair whose solved value
lacks a run is listed as not measured). The run-to-run spread of a cell's peak, each run a fresh process::

    python benchmarks/plan_solver.py spread --out bench/spread.jsonl --cells llama-narrow:adapter:off:3 \
        --variants glibc,no-tcache,fixed-threshold --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import plan_grid as grid  # noqa: E402 - the grid's models, data and child process

SOLVER_TECHNIQUES = ("full", "lora", "prompt_tuning", "adapter", "qlora")
MICRO_BATCHES = (2, 3, 4)
LENGTH = 256
BUDGETS_GIB = {"smollm2": (1.25, 1.75, 2.5, 4.0), "llama-narrow": (0.5, 0.65, 0.8, 1.2),
               "llama-wide": (0.9, 1.2, 1.6, 2.4)}


def _key(record: dict[str, Any]) -> str:
    return json.dumps(record["key"])


def _load(out: Path) -> dict[str, dict[str, Any]]:
    return {_key(r): r for r in map(json.loads, out.read_text().splitlines())} if out.is_file() else {}


def child_env(config: dict[str, Any], tcache: str = "tunelab") -> dict[str, str]:
    """The environment a training process starts with: glibc's per-thread cache off
    (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``) where ``tcache`` says: ``tunelab``, as `tunelab train` has it
    (``tcache_off_reason``: every CPU run, where glibc keeps freed aligned blocks, ``aligned_blocks_kept``, glibc
    bug 30723; set here so the process need not restart itself), ``off`` for every run; ``on`` keeps it (a
    tcache_count of glibc's default, which tunelab leaves as the user's)."""
    from tunelab.config import build_config
    from tunelab.plan.memory import NO_TCACHE, TCACHE_COUNT, aligned_blocks_kept
    from tunelab.plan.planner import tcache_off_reason

    if tcache == "on":
        return {"GLIBC_TUNABLES": f"{TCACHE_COUNT}=7"}
    if tcache == "tunelab":
        wanted = tcache_off_reason(build_config(config), "cpu") is not None and aligned_blocks_kept() is not None
    else:
        wanted = tcache == "off"
    return {"GLIBC_TUNABLES": NO_TCACHE} if wanted else {}


def _measure(out: Path, known: dict[str, dict[str, Any]], key: list[Any], config: dict[str, Any],
             tcache: str = "tunelab") -> dict[str, Any]:
    """The record of ``key``: known, or measured now (one training process) and appended to ``out``."""
    record = known.get(json.dumps(key))
    if record is None:
        env = child_env(config, tcache)
        peak, seconds = grid.measure_cell(config, env)
        record = {"key": key, "config": config, "env": env, "peak_rss": peak, "seconds": round(seconds, 1)}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        known[_key(record)] = record
        print(f"{key}: {peak / 2**20:.0f} MiB in {seconds:.0f} s", flush=True)
    return record


def _solver_config(model: str, technique: str, checkpointing: bool, micro_batch: int, work: Path,
                   length: int = LENGTH) -> dict[str, Any]:
    name = "-".join(map(str, (model, technique, checkpointing, micro_batch) + ((length,) if length != LENGTH else ())))
    config = grid.cell_config(grid.model_dir(model, work), technique, checkpointing, length, work,
                              work / "runs" / name)
    config["training"]["micro_batch_size"] = micro_batch
    return config


def measure(args: argparse.Namespace) -> None:
    out, work = Path(args.out), Path(args.out).parent / "plan_grid_work"
    work.mkdir(parents=True, exist_ok=True)
    known = _load(out)
    for technique in SOLVER_TECHNIQUES:  # technique by technique, so one can be measured again alone
        if args.techniques and technique not in args.techniques.split(","):
            continue
        for model in args.models.split(","):
            for checkpointing in (False, True):
                for micro_batch in MICRO_BATCHES:
                    key = ["solver", model, technique, checkpointing, micro_batch]
                    try:
                        _measure(out, known, key, _solver_config(model, technique, checkpointing, micro_batch, work))
                    except RuntimeError as exc:
                        print(f"{key}: {exc}", file=sys.stderr)


# The decidable design: a pair (m, m + 1) can only test the solver where half the plans' step exceeds the plan's own
# error; below that, which side of the budget a run lands on is the planner's error and the run-to-run spread, not the
# solver. So each cell (model x technique x checkpointing) is trained at the shortest of these lengths where both of
# its pairs' planned steps are at least DECIDABLE_STEP of the plan at m + 1 (half a step: the planner's 5% median-error
# target), chosen from the plans before anything is measured; a cell decidable at none of them is listed, not run.
DECIDABLE_LENGTHS = (256, 1024, 2048)
DECIDABLE_STEP = 0.10


def decidable_length(model: str, technique: str, checkpointing: bool, work: Path) -> tuple[int | None, list[int]]:
    """The length the decidable design trains ``model``'s cell at (None: none qualifies), and its plans at
    micro-batches 2, 3 and 4 there (or at the longest length tried)."""
    from tunelab.plan import plan_memory

    peaks: list[int] = []
    for length in DECIDABLE_LENGTHS:
        peaks = [plan_memory(_plan(_solver_config(model, technique, checkpointing, m, work, length))[0], "cpu").peak_bytes
                 for m in MICRO_BATCHES]
        if all(upper - lower >= DECIDABLE_STEP * upper for lower, upper in zip(peaks, peaks[1:])):
            return length, peaks
    return None, peaks


def measure_decidable(args: argparse.Namespace) -> None:
    out, work = Path(args.out), Path(args.out).parent / "plan_grid_work"
    work.mkdir(parents=True, exist_ok=True)
    known = _load(out)
    for model in args.models.split(","):
        for technique in SOLVER_TECHNIQUES:
            if args.techniques and technique not in args.techniques.split(","):
                continue
            for checkpointing in (False, True):
                length, peaks = decidable_length(model, technique, checkpointing, work)
                print(f"{model} {technique} checkpointing {'on' if checkpointing else 'off'}: length {length}, plans "
                      f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB", flush=True)
                if length is None:
                    continue
                for micro_batch in MICRO_BATCHES:
                    key = ["decidable", model, technique, checkpointing, length, micro_batch]
                    try:
                        _measure(out, known, key, _solver_config(model, technique, checkpointing, micro_batch, work,
                                                                 length))
                    except RuntimeError as exc:
                        print(f"{key}: {exc}", file=sys.stderr)


VARIANTS = {"glibc": ("tunelab", None), "no-tcache": ("off", None), "fixed-threshold": ("tunelab", True),
            "dynamic-threshold": ("tunelab", False), "tcache-kept": ("on", None)}


def spread(args: argparse.Namespace) -> None:
    """Each cell (MODEL:TECHNIQUE:on|off:MICRO_BATCH) trained ``--repeats`` times, each a fresh process, under each
    variant: glibc as tunelab runs it (no-tcache: its per-thread cache off; tcache-kept: on; fixed- or dynamic-threshold:
    training.return_freed_memory forced on or off); every run appended to ``--out``, then each cell's peaks."""
    out, work = Path(args.out), Path(args.out).parent / "plan_grid_work"
    work.mkdir(parents=True, exist_ok=True)
    records = list(map(json.loads, out.read_text().splitlines())) if out.is_file() else []
    for repeat in range(args.repeats):  # repeats interleaved, so a drift in the machine spreads over variants
        for cell in args.cells.split(","):
            model, technique, checkpointing, micro_batch = cell.split(":")
            for variant in args.variants.split(","):
                tcache, returned = VARIANTS[variant]
                key = ["spread", model, technique, checkpointing == "on", int(micro_batch), variant, repeat]
                if any(r["key"] == key for r in records):
                    continue
                config = _solver_config(model, technique, checkpointing == "on", int(micro_batch), work)
                if returned is not None:
                    config["training"]["return_freed_memory"] = returned
                config["output"] = {"dir": str(work / "runs" / "-".join(map(str, key)))}
                env = child_env(config, tcache)
                peak, seconds = grid.measure_cell(config, env)
                records.append({"key": key, "config": config, "env": env, "peak_rss": peak, "seconds": round(seconds, 1)})
                with out.open("a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
                print(f"{key}: {peak / 2**20:.1f} MiB in {seconds:.0f} s", flush=True)
    cells: dict[tuple[Any, ...], list[float]] = {}
    for r in records:
        cells.setdefault(tuple(r["key"][1:6]), []).append(r["peak_rss"] / 2**20)
    for cell, peaks in sorted(cells.items()):
        print(f"{cell}: {', '.join(f'{p:.0f}' for p in peaks)} MiB (spread {max(peaks) - min(peaks):.0f})")


def _plan(config: dict[str, Any]) -> Any:
    from tunelab.config import build_config
    from tunelab.plan import data_shape

    built = build_config(config)
    return built, data_shape(built)


def solver_rows(out: Path, known: dict[str, dict[str, Any]], measured_only: bool = False) -> list[dict[str, Any]]:
    """Each measured (m, m + 1) pair's budget, the solver's answer for it, and the measured peaks at the answer and
    one above (trained now when not yet measured: a flat cell's answer can be far above m)."""
    from tunelab.plan import plan_memory
    from tunelab.plan.solve import solve

    work = out.parent / "plan_grid_work"
    rows = []
    for record in list(known.values()):
        if record["key"][0] not in ("solver", "decidable"):  # the recommended set-ups' runs
            continue
        kind, model, technique, checkpointing, *length, m = record["key"]  # "decidable" keys carry the length
        upper = known.get(json.dumps([kind, model, technique, checkpointing, *length, m + 1]))
        if upper is None or m not in MICRO_BATCHES[:-1]:  # the budgets: the measured grid's
            continue
        config, shape = _plan(record["config"])
        planned = [plan_memory(_plan(r["config"])[0], "cpu").peak_bytes for r in (record, upper)]
        budget = sum(planned) // 2
        solved, _ = solve(config, shape, budget, "micro_batch_size", ceiling=16)
        peaks = []
        for value in ([] if solved is None else [solved, solved + 1]):
            key = [kind, model, technique, checkpointing, *length, value]
            if measured_only and json.dumps(key) not in known:  # the solved value or the next not yet run
                break
            config = _solver_config(model, technique, checkpointing, value, work, *length)
            peaks.append(_measure(out, known, key, config)["peak_rss"])
        measured = solved is None or len(peaks) == 2
        # the plans' step: the criterion holds only if the plan's error at m and at m + 1 is under half of it
        rows.append({"design": kind, "length": length[0] if length else LENGTH,
                     "model": model, "technique": technique, "checkpointing": checkpointing, "m": m,
                     "budget": budget, "plan_step": planned[1] - planned[0], "solved": solved,
                     "peak_m": peaks[0] if measured and peaks else None,
                     "peak_next": peaks[1] if measured and peaks else None,
                     "ok": None if not measured else bool(peaks) and peaks[0] <= budget < peaks[1]})
    return rows


def recommend_rows(out: Path, known: dict[str, dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    from tunelab.plan.solve import recommend

    work = out.parent / "plan_grid_work"
    rows = []
    for model in models:
        for gib in BUDGETS_GIB[model]:
            budget = int(gib * 2**30)
            base = _solver_config(model, "lora", False, 2, work)
            config, shape = _plan(base)
            ranked = recommend(config, shape, budget).set_ups
            if not ranked:
                rows.append({"model": model, "budget": budget, "set_up": None, "peak": None, "ok": True})
                continue
            top = ranked[0]
            run = dict(base, technique={"name": top.technique},
                       model={**base["model"], "dtype": top.dtype},
                       training={**base["training"], "gradient_checkpointing": top.checkpointing},
                       output={"dir": str(work / "runs" / f"recommend-{model}-{gib}")})
            key = ["recommend", model, top.technique, top.dtype, top.checkpointing, 2]
            record = _measure(out, known, key, run)
            rows.append({"model": model, "budget": budget, "set_up": f"{top.technique} {top.dtype} "
                         f"checkpointing {'on' if top.checkpointing else 'off'}", "planned": top.plan.peak_bytes,
                         "peak": record["peak_rss"], "ok": record["peak_rss"] <= budget})
    return rows


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "yes" if ok else "NO"


def report(args: argparse.Namespace) -> None:
    out = Path(args.results)
    known = _load(out)
    every = solver_rows(out, known, args.measured_only)
    mib = 2**20
    for design in ("solver", "decidable"):  # each design's table and count
        solver = sorted((r for r in every if r["design"] == design),
                        key=lambda r: (r["model"], r["technique"], r["checkpointing"], r["m"]))
        if not solver:
            continue
        print(f"design: {'every cell at 256 tokens' if design == 'solver' else 'the decidable cells (DECIDABLE_STEP)'}\n")
        print("| model | technique | checkpointing | length | budget MiB (between the plans at m and m+1) | plans' step MiB | m | solved | peak at the solved value MiB | one above MiB | ok |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in solver:
            peaks = ("-", "-") if r["peak_m"] is None else (f"{r['peak_m'] / mib:.0f}", f"{r['peak_next'] / mib:.0f}")
            print(f"| {r['model']} | {r['technique']} | {'on' if r['checkpointing'] else 'off'} | {r['length']} | "
                  f"{r['budget'] / mib:.0f} | {r['plan_step'] / mib:.0f} | {r['m']} | {r['solved']} | {peaks[0]} | "
                  f"{peaks[1]} | {_verdict(r['ok'])} |")
        good, unmeasured = sum(r["ok"] is True for r in solver), sum(r["ok"] is None for r in solver)
        if unmeasured:
            print(f"\n{unmeasured} pairs not measured at their solved value (--measured-only)")
        decided = len(solver) - unmeasured
        print(f"\nsolver ({design}): in {good} of {decided} ({100 * good / max(decided, 1):.0f}%) the solved micro-batch ran "
              "within the budget and the next one up did not fit (target 90%)\n")
    if args.measured_only:
        return
    models = sorted({r["model"] for r in every}, key=list(BUDGETS_GIB).index)
    rows = recommend_rows(out, known, models)
    print("| model | budget GiB | first recommended set-up | planned GiB | measured GiB | fits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        measured = "-" if r["peak"] is None else f"{r['peak'] / 2**30:.2f}"
        planned = f"{r['planned'] / 2**30:.2f}" if r.get("planned") else "-"
        print(f"| {r['model']} | {r['budget'] / 2**30:.2f} | {r['set_up'] or 'none fits'} | {planned} | {measured} | "
              f"{'yes' if r['ok'] else 'NO'} |")
    fits = sum(r["ok"] for r in rows)
    print(f"\nrecommend: {fits} of {len(rows)} first set-ups fit their budget (target: all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("measure-decidable", help="the decidable design: each cell at the length DECIDABLE_STEP picks")
    d.add_argument("--out", required=True)
    d.add_argument("--models", default="smollm2,llama-narrow")
    d.add_argument("--techniques", default="", help="only these (comma-separated); default all")
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--models", default="smollm2,llama-narrow")
    m.add_argument("--techniques", default="", help="only these (comma-separated); default all")
    s = sub.add_parser("spread")
    s.add_argument("--out", required=True)
    s.add_argument("--cells", required=True, help="MODEL:TECHNIQUE:on|off:MICRO_BATCH, comma-separated")
    s.add_argument("--variants", default="glibc,no-tcache")
    s.add_argument("--repeats", type=int, default=3)
    r = sub.add_parser("report")
    r.add_argument("results")
    r.add_argument("--measured-only", action="store_true",
                   help="train nothing: pairs whose solved value (or the next) lacks a run are listed as not measured, "
                        "and the recommended set-ups are left out")
    args = parser.parse_args()
    {"measure": measure, "measure-decidable": measure_decidable, "spread": spread, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
