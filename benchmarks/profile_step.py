"""Where a training step spends its time: torch's profiler over a few optimizer steps of `tunelab train`.

Runs the bench's set-up (SmolLM2-135M, LoRA r16 on q/k/v/o, micro-batch 4, length 256, the shipped pydoc Q&A) for
``--steps`` steps, profiles the steps after the first (warm-up) one, and prints:
- the ops by self CPU time, each with its share of the profiled time;
- the matmul share of the time and the matmuls' achieved GFLOP/s, against this host's measured GEMM peak in the
  step's compute dtype, so "share of the bf16 peak" is a measured figure, not a data-sheet one;
- tokens/s of the profiled steps.

Speed is measured here, never in a test. Run it alone on a quiet machine, with the thread count you want measured::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_step.py --steps 6 [--set model.dtype=float32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This host's GFLOP/s on an (n, n) @ (n, n) product in ``dtype``: the best of ``repeats`` after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def bench_config(work: Path, rows: int, overrides: list[str]) -> Any:
    """The bench-vs-recipes run configuration, on the first ``rows`` pydoc records, with ``overrides`` applied."""
    from tunelab.config import load_config

    source = Path(__file__).resolve().parents[1] / "src/tunelab/assets/pydoc_qa/pydoc_qa.jsonl"
    lines = source.read_text().splitlines()[:rows]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    (work / "cfg.yaml").write_text(
        f"model: {{name: smollm2-135m-instruct}}\n"
        f"data: {{train: {work / 'train.jsonl'}, val_size: 0, max_length: 256}}\n"
        "technique: {name: lora, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}\n"
        "training: {micro_batch_size: 4, grad_accum: 1, epochs: 1}\n"
        "eval: {before_after: false, num_samples: 0}\n"
        f"output: {{dir: {work / 'run'}}}\n")
    return load_config(work / "cfg.yaml", overrides)


def profile_steps(config: Any) -> tuple[Any, float, int]:
    """Train the configured steps; the profiler covers every step's forward and backward after the first.
    Returns the profiler, the profiled seconds and the profiled non-pad tokens (from the run's metrics.jsonl)."""
    from tunelab.training import loop, session

    calls = {"n": 0, "seconds": 0.0}
    # No with_flops: its per-op bookkeeping made elementwise ops look 10x slower than they are. FLOPs are counted from
    # the recorded input shapes instead (``matmul_flops``).
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    accumulate = loop.accumulate_gradients

    def profiled(model: Any, window: list[dict[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            prof.__enter__()
        start = time.perf_counter()
        out = accumulate(model, window, *args, **kwargs)
        if calls["n"] >= 2:
            calls["seconds"] += time.perf_counter() - start
        return out

    loop.accumulate_gradients = profiled
    try:
        session.train(config, progress=False)
    finally:
        loop.accumulate_gradients = accumulate
        prof.__exit__(None, None, None)
    lines = [json.loads(x) for x in (Path(config.output.dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens = [x["tokens"] for x in lines if x.get("kind") == "train"]
    return prof, calls["seconds"], tokens[-1] - tokens[0]


def matmul_flops(name: str, shapes: list[list[int]]) -> float:
    """FLOPs of one call from its input shapes: 2·M·K·N for the matmuls, and for CPU flash attention
    4·B·H·Tq·Tk·D forward and 2.5 times that backward (five products against two; no block is skipped: the packed
    rows' mask is explicit)."""
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2.0 * m * k * n
    if name == "aten::addmm":
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2.0 * m * k * n
    if name in ("aten::bmm", "aten::baddbmm"):
        # baddbmm(input, batch1, batch2, beta, alpha): the scalars' shapes come last and are empty
        (b, m, k), (_, _, n) = shapes[:2] if name == "aten::bmm" else shapes[1:3]
        return 2.0 * b * m * k * n
    if name.startswith("aten::_scaled_dot_product_flash_attention_for_cpu"):
        if name.endswith("_backward"):
            shapes = shapes[1:]  # the output gradient comes first
        (b, h, tq, d), (_, _, tk, _) = shapes[0], shapes[1]
        return 4.0 * b * h * tq * tk * d * (2.5 if name.endswith("_backward") else 1.0)
    return 0.0


def summarise(prof: Any, seconds: float, tokens: int, peak: float, dtype: str, top: int) -> dict[str, Any]:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    flops = sum(matmul_flops(e.key, e.input_shapes) * e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key in MATMULS)
    table = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
              "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in rows[:top]]
    achieved = flops / max(matmul_us / 1e6, 1e-9) / 1e9
    return {"tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "profiled_s": round(seconds, 2),
            "matmul_share_of_time": round(matmul_us / total, 4), "matmul_gflops": round(achieved, 1),
            "step_gflops": round(flops / max(seconds, 1e-9) / 1e9, 1), "gemm_peak_gflops": round(peak, 1),
            "peak_dtype": dtype, "share_of_peak": round(flops / max(seconds, 1e-9) / 1e9 / peak, 4), "top_ops": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", type=int, default=0, help="also print the N costliest (op, input shapes) pairs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        steps = [f"training.max_steps={args.steps}", "training.log_every=1"]
        config = bench_config(Path(tmp), args.rows, steps + args.overrides)
        prof, seconds, tokens = profile_steps(config)
        info = json.loads((Path(tmp) / "run" / "run_info.json").read_text())
    precision = json.dumps(info.get("precision", "?"))
    dtype = torch.bfloat16 if "bf16" in precision or "bfloat16" in precision else torch.float32
    if args.shapes:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.shapes,
                                                                  max_name_column_width=50, max_shapes_column_width=80))
    report = summarise(prof, seconds, tokens, gemm_peak(dtype), str(dtype), args.top)
    report["precision"] = precision
    report["threads"] = torch.get_num_threads()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    report["cpu_flags"] = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags})
    for row in report["top_ops"]:
        print(f"{row['op'][:60]:60s} {row['self_ms']:10.1f} ms {100 * row['share']:6.1f}% {row['calls']:7d}")
    print(json.dumps({k: v for k, v in report.items() if k != "top_ops"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
