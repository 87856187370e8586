"""The planner's calibration grid: the peak RSS of real training processes against `tunelab plan`'s prediction.

Cells: model (SmolLM2-135M, two random-initialised Llama shapes, the second ~3x wider) x technique {full, lora,
qlora, prompt_tuning, adapter} x activation checkpointing {off, on} x 2 sequence lengths. Each cell trains
2 optimizer steps (the second step's backward is the peak: weights, Adam moments and activations at once) as a
`python -m tunelab train` process (the CLI path users take, with its restart where it restarts), whose run_info.json
records its own peak RSS (VmHWM, ``run_info.own_peak_rss_bytes``; not ru_maxrss, which holds at least the parent's
peak: once it had built the Llama models, every smaller cell read as that figure). Every example is longer than data.max_length, so every row is exactly max_length tokens (the planner's
input, from the same data report `tunelab train` writes).

    python benchmarks/plan_grid.py measure --out bench/plan_grid.jsonl [--models smollm2] [--lengths 64,256]
    python benchmarks/plan_grid.py report bench/plan_grid.jsonl      # errors against the planner, as markdown

Cells already in the output file are skipped, so an interrupted grid continues. Cells run one at a time,
shortest first (peak RSS does not depend on the machine's load; time does).
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

ROOT = Path(__file__).parents[1]
TECHNIQUES = ("full", "lora", "qlora", "prompt_tuning", "adapter")
# Random-initialised Llama shapes (SmolLM2's tokenizer and vocabulary); "wide" is 3x "narrow"'s width.
SHAPES: dict[str, dict[str, int]] = {
    "llama-narrow": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
                     "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama-wide": {"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 6,
                   "num_attention_heads": 12, "num_key_value_heads": 4},
}
MICRO_BATCH = 2


def model_dir(name: str, work: Path) -> str:
    """The model.name of a grid model: the embedded SmolLM2, or a random-initialised shape saved once under work."""
    if name == "smollm2":
        return "smollm2-135m-instruct"
    target = work / name
    if not (target / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from tunelab.models import embedded_model_dir

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **SHAPES[name])
        LlamaForCausalLM(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def long_texts(work: Path, count: int = 24) -> Path:
    """Plain-text records each longer than any grid length (so every row is cut to exactly max_length)."""
    path = work / "long_texts.jsonl"
    if not path.is_file():
        words = (ROOT / "README.md").read_text().split()
        records = [{"text": " ".join(words[i * 37:] + words[: i * 37])[:12000]} for i in range(count)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cell_config(model: str, technique: str, checkpointing: bool, length: int, work: Path, run_dir: Path) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "data": {"train": [str(long_texts(work))], "val_size": 0, "max_length": length, "dedup": False},
        "technique": {"name": technique},
        "training": {"max_steps": 2, "micro_batch_size": MICRO_BATCH, "grad_accum": 1,
                     "gradient_checkpointing": checkpointing},
        "eval": {"before_after": False, "forgetting": False, "num_samples": 0},
        "output": {"dir": str(run_dir)},
    }


def measure_cell(config: dict[str, Any], env: dict[str, str] | None = None) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of one training process, run as users run it: `python -m tunelab train`
    on the cell's config (so the process restarts itself with glibc's per-thread cache off where `tunelab train`
    does), its peak the VmHWM its run_info.json records. ``env``: variables added to the child's environment (read
    at its start, as glibc's tunables are)."""
    run_dir = Path(config["output"]["dir"])
    path = run_dir.with_name(run_dir.name + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))  # JSON is YAML
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), "--no-progress",
                           "--set", "output.overwrite=true"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"cell failed ({done.returncode}): {done.stderr[-2000:]}")
    info = json.loads((run_dir / "run_info.json").read_text())
    return int(info["peak_memory"]["rss_bytes"]), time.time() - started


def cells(models: list[str], lengths: list[int], techniques: tuple[str, ...] = TECHNIQUES) -> list[tuple[str, str, bool, int]]:
    grid = [(m, t, c, n) for m in models for n in lengths for t in techniques for c in (False, True)]
    order = {"smollm2": 0, "llama-narrow": 1, "llama-wide": 2}  # SmolLM2 first, then by size
    return sorted(grid, key=lambda cell: (order.get(cell[0], 3), cell[3]))


def measure(args: argparse.Namespace) -> None:
    out = Path(args.out)
    work = out.parent / "plan_grid_work"
    work.mkdir(parents=True, exist_ok=True)
    done = {tuple(r["cell"]) for r in map(json.loads, out.read_text().splitlines())} if out.is_file() else set()
    for model, technique, checkpointing, length in cells(args.models.split(","), [int(n) for n in args.lengths.split(",")],
                                                          tuple(args.techniques.split(","))):
        cell = [model, technique, checkpointing, length]
        if tuple(cell) in done:
            continue
        run_dir = work / "runs" / "-".join(map(str, cell))
        config = cell_config(model_dir(model, work), technique, checkpointing, length, work, run_dir)
        try:
            peak, seconds = measure_cell(config)
        except RuntimeError as exc:
            print(f"{cell}: {exc}", file=sys.stderr)
            continue
        with out.open("a") as f:
            f.write(json.dumps({"cell": cell, "config": config, "peak_rss": peak, "seconds": round(seconds, 1)}) + "\n")
        print(f"{cell}: {peak / 2**20:.0f} MiB in {seconds:.0f} s", flush=True)


def report(args: argparse.Namespace) -> None:
    from tunelab.config import build_config
    from tunelab.plan import plan_memory

    rows, errors = [], []
    for record in map(json.loads, Path(args.results).read_text().splitlines()):
        model, technique, checkpointing, length = record["cell"]
        predicted = plan_memory(build_config(record["config"]), device="cpu").peak_bytes
        error = predicted / record["peak_rss"] - 1
        errors.append(error)
        rows.append(f"| {model} | {technique} | {'on' if checkpointing else 'off'} | {length} | "
                    f"{predicted / 2**20:.0f} | {record['peak_rss'] / 2**20:.0f} | {100 * error:+.1f}% |")
    print("| model | technique | checkpointing | length | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    absolute = [abs(e) for e in errors]
    print(f"\n{len(errors)} cells: median |error| {100 * statistics.median(absolute):.1f}%, max |error| "
          f"{100 * max(absolute):.1f}%, lowest predicted/actual {1 + min(errors):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--models", default="llama-narrow,smollm2,llama-wide")
    m.add_argument("--lengths", default="64,256")
    m.add_argument("--techniques", default=",".join(TECHNIQUES), help="a subset, to re-measure only their cells")
    r = sub.add_parser("report")
    r.add_argument("results")
    args = parser.parse_args()
    measure(args) if args.command == "measure" else report(args)


if __name__ == "__main__":
    main()
