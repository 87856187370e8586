"""What each of tunelab's CPU speed-ups is worth: the bench's run with one of them switched off at a time.

The run is bench-vs-recipes' (SmolLM2-135M, LoRA r16 on q/k/v/o, micro-batch 4, length 256, the shipped pydoc
Q&A); each variant trains ``--steps`` steps in its own process and reports the non-pad tokens/s of the steps after
the first (warm-up). Variants:

- ``shipped``: as `tunelab train` runs it;
- ``no-cpu-dropout``: torch's ``nn.Dropout`` for the adapters' input dropout (one 32-bit draw per element);
- ``float32``: ``model.dtype: float32`` (no bf16 autocast; only meaningful on a CPU with native bf16);
- ``no-packing``: ``data.packing: false`` (rows padded to their batch's longest example);
- ``packed-mask``: transformers' SDPA attention on the packed rows' block-diagonal mask (instead of causal
  attention per packed example, re-batched by length, ``training/attention.py``);
- ``transformers-rms-norm``: transformers' RMSNorm (a float32 island, autograd's backward) instead of the same
  values in fewer passes (``norms.py``);
- ``full-logits``: the head over every position, (B, T, V) logits and a float32 cross-entropy, as transformers'
  own causal-LM loss computes it (instead of the chunked head at supervised positions only);
- ``none``: all six switched off at once.

Each feature's share is shipped tokens/s over that variant's (how much slower the run is without it). Speed is
measured here, never in a test; run it alone on a quiet machine, and compare figures within one invocation::

    .venv/bin/python benchmarks/ablation.py [--steps 8] [--out ablation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ["shipped", "no-cpu-dropout", "float32", "no-packing", "packed-mask", "transformers-rms-norm", "full-logits",
            "none"]
OFF = {"no-cpu-dropout": {"cpu-dropout"}, "float32": {"bf16"}, "no-packing": {"packing"},
       "packed-mask": {"per-example-attention"}, "transformers-rms-norm": {"rms-norm"},
       "full-logits": {"supervised-head"},
       "none": {"cpu-dropout", "bf16", "packing", "per-example-attention", "rms-norm", "supervised-head"}}


def switch_off(features: set[str]) -> list[str]:
    """Patch this process for the features switched off; returns the config overrides they need."""
    overrides = []
    if "bf16" in features:
        overrides.append("model.dtype=float32")
    if "packing" in features:
        overrides.append("data.packing=false")
    if "per-example-attention" in features:
        from contextlib import nullcontext

        from tunelab.training import session

        session.attention_per_packed_example = lambda device: nullcontext(False)
    if "cpu-dropout" in features:
        from tunelab.training import session

        session.use_cpu_dropout = lambda model: 0
    if "rms-norm" in features:
        from tunelab.training import session

        session.use_cpu_rms_norm = lambda model: 0
    if "supervised-head" in features:
        import torch
        import torch.nn.functional as F

        from tunelab.objectives import sft
        from tunelab.objectives.base import LossSum
        from tunelab.techniques.base import forward_inputs

        def full_logits_loss(model: Any, batch: dict[str, torch.Tensor], chunk_rows: int) -> LossSum:
            targets = batch["targets"]  # (B, T)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           **forward_inputs(model, batch)).logits  # (B, T, V) at every position
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=sft.IGNORE,
                                   reduction="sum")
            return LossSum(loss, int((targets != sft.IGNORE).sum()))

        sft.chunked_sft_loss_sum = full_logits_loss
    return overrides


def run_variant(name: str, steps: int, rows: int) -> dict[str, Any]:
    """Train the variant in this process; its tokens/s over the steps after the first, from metrics.jsonl."""
    sys.path.insert(0, str(HERE))
    from profile_step import bench_config

    from tunelab.training import session

    overrides = switch_off(OFF.get(name, set()))
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), rows, [f"training.max_steps={steps}", "training.log_every=1", *overrides])
        session.train(config, progress=False)
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        info = json.loads((Path(tmp) / "run" / "run_info.json").read_text())
    train = [x for x in lines if x.get("kind") == "train"]
    tokens = train[-1]["tokens"] - train[0]["tokens"]
    seconds = train[-1]["elapsed_s"] - train[0]["elapsed_s"]
    return {"variant": name, "tokens_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": seconds,
            "peak_rss_bytes": info.get("peak_memory", {}).get("rss_bytes"),
            "precision": info.get("precision", {}).get("dtype"), "dropout": info.get("dropout")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps, args.rows)))
        return
    results = []
    for name in args.variants:
        started = time.time()
        done = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                               "--rows", str(args.rows)], capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_s"] = round(time.time() - started, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    shipped = next((r["tokens_per_s"] for r in results if r["variant"] == "shipped"), None)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    report = {"cpu_flags": sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags}),
              "load_average": os.getloadavg(), "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "results": results}
    print("| variant | tokens/s | shipped is x times faster |\n|---|---:|---:|")
    for r in results:
        ratio = f"{shipped / r['tokens_per_s']:.2f}" if shipped else "-"
        print(f"| {r['variant']} | {r['tokens_per_s']} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
