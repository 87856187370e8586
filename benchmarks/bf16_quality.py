"""Does bf16 autocast keep quality? The shipped quickstart task trained at an equal budget in float32 and in bf16
autocast (fp32 master weights), for several seeds; prints and writes the final validation loss of each run, its
relative difference, and the training phase's tokens/s (the latter only means something on a quiet machine).

    .venv/bin/python benchmarks/bf16_quality.py [--seeds 0 1 2] [--out benchmarks/results/bf16_quality.json]

Each run is a subprocess of `tunelab train` with TUNELAB_CPU_BF16=0 (float32) or =1 (bf16 autocast; only
meaningful on a CPU with native bf16, which the script checks and records). Issue 18's bar: every seed's bf16
validation loss within 0.5% of the float32 run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "src" / "tunelab" / "recipes" / "quickstart.yaml"


def _final_validation_loss(run_dir: Path) -> float:
    """The saved weights' validation loss from the run's eval.json (with ``eval_every`` off, metrics.jsonl has no
    evaluation lines: the run measures its final weights once, at the end)."""
    report = json.loads((run_dir / "eval.json").read_text())
    if not isinstance(report.get("tuned"), dict) or "loss" not in report["tuned"]:
        raise SystemExit(f"{run_dir / 'eval.json'}: no tuned.loss (the run kept no validation set?)")
    return report["tuned"]["loss"]


def _tokens_per_s(run_dir: Path) -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [x for x in lines if x.get("kind") == "train"][-1]
    return round(last["tokens"] / last["elapsed_s"], 1)


def run_once(seed: int, bf16: bool, work: Path) -> dict[str, float]:
    run_dir = work / f"seed{seed}-{'bf16' if bf16 else 'fp32'}"
    overrides = [f"training.seed={seed}", "eval.num_samples=0", "eval.before_after=false", "eval.forgetting=false",
                 "training.eval_every=null", f"output.dir={run_dir}"]
    env = {**os.environ, "TUNELAB_CPU_BF16": "1" if bf16 else "0"}
    command = [sys.executable, "-m", "tunelab", "train", str(RECIPE), "--no-progress"]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return {"val_loss": _final_validation_loss(run_dir), "tokens_per_s": _tokens_per_s(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bf16_quality.json")
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            fp32, bf16 = run_once(seed, False, Path(tmp)), run_once(seed, True, Path(tmp))
            rel = (bf16["val_loss"] - fp32["val_loss"]) / fp32["val_loss"]
            rows.append({"seed": seed, "fp32": fp32, "bf16": bf16, "relative_difference": round(rel, 5)})
            print(f"seed {seed}: val loss fp32 {fp32['val_loss']:.4f}  bf16 {bf16['val_loss']:.4f}  "
                  f"({rel:+.2%})  tok/s fp32 {fp32['tokens_per_s']}  bf16 {bf16['tokens_per_s']}", flush=True)
    result = {"recipe": str(RECIPE.relative_to(ROOT)), "native_bf16": native, "load_average": os.getloadavg(),
              "within_half_percent": all(abs(r["relative_difference"]) <= 0.005 for r in rows), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
