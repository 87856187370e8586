"""--recommend's time per step against measured steps: the speed probe's prediction and the real run's median step.

For each setting (dtype, gradient checkpointing) of one technique (its default settings, as --recommend ranks it)
on the bench's run (``profile_step.bench_config``: SmolLM2-135M, 4 x 256 tokens, the shipped pydoc Q&A), the
prediction comes from one speed probe (``plan/speed.py``) over every setting asked for, and the measurement from
`tunelab train` itself (``python -m tunelab train``, its own process, ``--steps`` steps, the median of every step
after the first, from metrics.jsonl's elapsed seconds). Speed is measured here, never in a test; run it on a quiet
machine, at the thread count you want measured::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_speed.py [--technique lora] [--settings bfloat16:off ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = ["bfloat16:off", "bfloat16:on", "float32:off", "float32:on"]


def measured_step(work: Path, technique: str, dtype: str, checkpointing: bool, steps: int) -> float:
    """The median step of a real `tunelab train` run of the set-up (every step after the first)."""
    sys.path.insert(0, str(HERE))
    import yaml
    from profile_step import bench_config

    config = bench_config(work, 128, [f"training.max_steps={steps}", "training.log_every=1",
                                      f"model.dtype={dtype}", f"training.gradient_checkpointing={str(checkpointing).lower()}"])
    data = yaml.safe_load(config.to_yaml())
    data["technique"] = {"name": technique}
    data["data"].pop("packing", None)  # the technique's default (prompt tuning refuses an explicit packing: true)
    data["output"]["dir"] = str(work / f"run-{technique}-{dtype}-{checkpointing}")
    path = work / "setup.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{technique} {dtype}: tunelab train failed: {done.stderr.strip().splitlines()[-1:]}")
    lines = [json.loads(x) for x in (Path(data["output"]["dir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    elapsed = [x["elapsed_s"] for x in lines if x.get("kind") == "train"]
    return statistics.median(b - a for a, b in zip(elapsed, elapsed[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--technique", default="lora")
    parser.add_argument("--settings", nargs="*", default=DEFAULT, help="dtype:on|off (gradient checkpointing)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from profile_step import bench_config

    from tunelab.models import load_model_config
    from tunelab.plan import data_shape, speed

    settings = [(d, c == "on") for d, c in (s.split(":") for s in args.settings)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = bench_config(work, 128, [])
        config = config.model_copy(update={"technique": _settings(args.technique)})
        shape = data_shape(config)
        layers = load_model_config(config.model).num_hidden_layers
        times = speed.measure_step_times(config, shape, settings)
        for dtype, checkpointing in settings:
            predicted = times[(dtype, checkpointing)].predict(layers)
            measured = measured_step(work, args.technique, dtype, checkpointing, args.steps)
            rows.append({"technique": args.technique, "dtype": dtype, "checkpointing": checkpointing,
                         "predicted_s": round(predicted, 3), "measured_s": round(measured, 3),
                         "predicted_over_measured": round(predicted / measured, 3)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| set-up | predicted s/step | measured s/step | predicted / measured |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['technique']} {row['dtype']} checkpointing {'on' if row['checkpointing'] else 'off'} | "
              f"{row['predicted_s']} | {row['measured_s']} | {row['predicted_over_measured']} |")


def _settings(technique: str):  # noqa: ANN202 - a technique's default settings
    from tunelab.techniques import TECHNIQUES

    return TECHNIQUES[technique].config_class()


if __name__ == "__main__":
    main()
