"""`tunelab train` with and without its restart with glibc's per-thread cache off (docs/choosing.md, the heap policy):
peak RSS against the plan, and the price in process CPU time, A/B in alternating fresh processes.

Each run is a real `python -m tunelab train CONFIG --no-progress` (the CLI path users take): variant `restart` as
tunelab runs it (it restarts itself with GLIBC_TUNABLES=glibc.malloc.tcache_count=0 where the run needs it),
variant `kept` with `--set training.glibc_tcache_off=false`. The process's CPU time (user + kernel, os.wait4:
the same pid before and after the restart, so the restart's own cost is in it), its wall time, run_info.json's
peak RSS (VmHWM), planned peak, training phase and which cache it ran with are written as one JSON line a run.

    python benchmarks/tcache_ab.py measure --out bench/tcache_ab.jsonl --rounds 2 [--cells grid,grpo,ppo]
    python benchmarks/tcache_ab.py report bench/tcache_ab.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from plan_grid import cell_config, model_dir  # noqa: E402 - the grid's own cells

VARIANTS = {"restart": [], "kept": ["--set", "training.glibc_tcache_off=false"]}
# the online examples as docs/choosing.md measured them: 3 steps, no validation, the base SmolLM2 for PPO
ONLINE = {
    "grpo": (ROOT / "examples/intermediate/grpo-lora.yaml",
             ["training.max_steps=3", "data.val_size=0", "eval.num_samples=0"]),
    "ppo": (ROOT / "examples/intermediate/ppo-lora.yaml",
            ["training.max_steps=3", "data.val_size=0", "eval.num_samples=0", "model.name=smollm2-135m-instruct",
             "objective.rewards=[rouge_l]"]),
}


def cases(names: list[str], work: Path) -> dict[str, tuple[Path, list[str], Path]]:
    """name -> (config file, --set overrides, run folder): SmolLM2 QLoRA's 4 grid cells, and the online examples."""
    found: dict[str, tuple[Path, list[str], Path]] = {}
    if "grid" in names:
        for length in (64, 256):
            for checkpointing in (False, True):
                name = f"smollm2-qlora-{'ckpt' if checkpointing else 'plain'}-{length}"
                path, run_dir = work / f"{name}.yaml", work / "runs" / name
                config = cell_config(model_dir("smollm2", work), "qlora", checkpointing, length, work, run_dir)
                path.write_text(yaml.safe_dump(config))
                found[name] = (path, ["output.overwrite=true"], run_dir)
    for name in ("grpo", "ppo"):
        if name in names:
            config, overrides = ONLINE[name]
            run_dir = work / "runs" / name
            found[name] = (config, [*overrides, f"output.dir={run_dir}", "output.overwrite=true"], run_dir)
    return found


def run_once(config: Path, overrides: list[str], run_dir: Path, variant: str) -> dict[str, Any]:
    sets = [item for override in overrides for item in ("--set", override)]
    command = [sys.executable, "-m", "tunelab", "train", str(config), "--no-progress", *sets, *VARIANTS[variant]]
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES",
                                                                          "TUNELAB_RESTARTED_WITHOUT_TCACHE")}
    env["COLUMNS"] = "400"  # one log record a line
    log = run_dir.parent / f"{run_dir.name}.{variant}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(log.read_text()[-3000:])
    info = json.loads((run_dir / "run_info.json").read_text())
    return {"peak_rss": info["peak_memory"]["rss_bytes"], "planned": info["planned_peak"]["bytes"],
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2), "wall_s": round(wall, 1),
            "training_s": info["phases_s"].get("training"), "tcache": info["heap_policy"]["tcache"],
            "restarted": "restarting with GLIBC_TUNABLES" in log.read_text(), "load": os.getloadavg()[0]}


def measure(args: argparse.Namespace) -> None:
    out = Path(args.out)
    work = out.parent / "tcache_ab_work"
    work.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for name, (config, overrides, run_dir) in cases(args.cells.split(","), work).items():
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))  # alternate who goes first
            for variant in order:
                record = {"case": name, "variant": variant, "round": round_, **run_once(config, overrides, run_dir, variant)}
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{name} {variant}: {record['peak_rss'] / 2**20:.0f} MiB (plan {record['planned'] / 2**20:.0f}), "
                      f"cpu {record['user_s'] + record['sys_s']:.1f} s", flush=True)


def report(args: argparse.Namespace) -> None:
    records = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    print("| case | variant | planned MiB | measured MiB | predicted/actual | CPU s (user + kernel) | kernel s | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["case"] for r in records):
        for variant in VARIANTS:
            mine = [r for r in records if r["case"] == name and r["variant"] == variant]
            if not mine:
                continue
            peaks = ", ".join(f"{r['peak_rss'] / 2**20:.0f}" for r in mine)
            ratios = [r["planned"] / r["peak_rss"] for r in mine]
            cpu = ", ".join(f"{r['user_s'] + r['sys_s']:.1f}" for r in mine)
            kernel = ", ".join(f"{r['sys_s']:.1f}" for r in mine)
            print(f"| {name} | {variant} | {mine[0]['planned'] / 2**20:.0f} | {peaks} | "
                  f"{min(ratios):.3f}-{max(ratios):.3f} | {cpu} | {kernel} | {len(mine)} |")
        pairs = [(a, b) for a in records for b in records if a["case"] == b["case"] == name and
                 a["round"] == b["round"] and a["variant"] == "restart" and b["variant"] == "kept"]
        if pairs:
            ratio = statistics.median((a["user_s"] + a["sys_s"]) / (b["user_s"] + b["sys_s"]) for a, b in pairs)
            print(f"| {name} | restart / kept CPU time, median of {len(pairs)} pairs | | | | {ratio:.3f} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--cells", default="grid,grpo,ppo")
    r = sub.add_parser("report")
    r.add_argument("results")
    args = parser.parse_args()
    measure(args) if args.command == "measure" else report(args)


if __name__ == "__main__":
    main()
