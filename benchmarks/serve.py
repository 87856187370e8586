"""Latency and throughput of `tunelab serve` on the real SmolLM2-135M-Instruct base with two LoRA adapters.
Not part of the test suite (speed is measured here, never asserted in tests). Usage:

    .venv/bin/python benchmarks/serve.py [--runs RUN RUN] [--clients 1 4 16 64] [--modes continuous whole-batch]
                                         [--max-tokens 32] [--out FILE.json]

Without ``--runs`` it first trains two small LoRA runs on the embedded SmolLM2 (two steps each, on the bicycle
support chats and on the pydoc questions) into ``--work`` and reuses them on the next call.

What is measured: closed-loop clients (each sends its next request when the previous one has finished), every
request a streamed ``/v1/chat/completions`` with ``max_tokens`` new tokens at most, greedy; the requests cycle
over the two adapters and the base, so concurrent requests ask for different adapters. For each number of
clients, ``--rounds`` requests per client (8 requests at least, ``--max-requests`` at most); per request the
time to the first streamed token (TTFT) and to the end, p50 and p95 over all requests, and the steady TTFT:
over the requests after each client's first (the clients all start at once, so their first requests are one
burst); throughput is all completion tokens over the wall time of the level. Server modes over the same
requests (``--modes``): ``continuous`` (the server as it runs: requests join and leave the running batch at every decoding step, requests for different adapters share it
through PEFT's mixed-adapter inference), ``whole-batch`` (the scheduling the server had before: a batch of the
requests waiting runs to its end before the next starts; mixed adapters too) and ``per-adapter`` (continuous, but
the running batch holds one adapter's requests only, as a server without mixed batches would run).

The server runs in this process on a background thread (``BackgroundServer``, uvicorn) and the clients on this
process's asyncio loop: the generation itself runs in torch, which releases the GIL, and a client's work per
streamed token is small next to one decoding step of the model, so the clients cost little of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from smollm_runs import train_runs  # benchmarks/ is this script's folder, first on sys.path

MODES = {"continuous": (True, True), "whole-batch": (False, True), "per-adapter": (True, False)}  # (continuous, mixed)
QUESTIONS = ["My chain keeps slipping. What should I check?", "How do I use `json.dumps`?",
             "What tyre pressure should I use?", "Explain `atexit.register`.", "How often should I oil my chain?",
             "What does `os.path.join` do?", "My brakes squeal. Why?", "How do I sort a list of tuples by the second item?"]


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return {"model": model, "ttft_s": first if first is not None else total, "total_s": total, "tokens": tokens}


async def level(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` closed-loop clients sharing ``requests`` requests; request k asks models[k % len(models)]."""
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for k in range(requests):
        jobs.put_nowait(k)
    results: list[dict[str, Any]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        first = True  # every client's first request arrives at the same moment as the others' (the level's start)
        while not jobs.empty():
            k = jobs.get_nowait()
            result = await one_request(client, url, models[k % len(models)], QUESTIONS[k % len(QUESTIONS)], max_tokens)
            results.append({**result, "first": first})
            first = False

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarize(results, wall)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]  # nearest rank


def summarize(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in results]
    total = [r["total_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(results) / wall, 3),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3),
            "total_p50_s": round(percentile(total, 0.5), 3), "total_p95_s": round(percentile(total, 0.95), 3),
            "mean_tokens": round(statistics.mean(r["tokens"] for r in results), 1), **steady(results)}


def steady(results: list[dict[str, Any]]) -> dict[str, Any]:
    """TTFT over the requests after each client's first: all clients start at once, so their first requests
    arrive together (a burst no steady load has); the later ones arrive as the clients' previous answers end."""
    later = [r["ttft_s"] for r in results if not r["first"]]
    if not later:
        return {"steady_requests": 0, "steady_ttft_p50_s": None, "steady_ttft_p95_s": None}
    return {"steady_requests": len(later), "steady_ttft_p50_s": round(percentile(later, 0.5), 3),
            "steady_ttft_p95_s": round(percentile(later, 0.95), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs=2, type=Path, help="two LoRA run folders of one base (default: train two)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-serve-bench"), help="where the trained runs go")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["continuous", "whole-batch"])
    parser.add_argument("--other-clients", nargs="+", type=int, default=[1, 4, 16],
                        help="the levels of the modes other than continuous (the comparison points)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level (8 at least)")
    parser.add_argument("--max-requests", type=int, default=64, help="at most this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tunelab.serve.app import ServeSettings
    from tunelab.serve.server import BackgroundServer, build_app

    runs = args.runs or train_runs(args.work)
    settings = ServeSettings(max_concurrent=max(args.clients) * 2, max_tokens_limit=args.max_tokens,
                             max_batch_size=args.max_batch_size, request_timeout_s=900)
    started = time.perf_counter()
    app = build_app(list(runs), settings, device="cpu")
    load_s = time.perf_counter() - started
    engine = app.state.engine
    models = [m for m in engine.served if m != "base"] + ["base"]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "runs": [str(r) for r in runs], "models": models, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "max_batch_size": args.max_batch_size, "modes": args.modes, "max_requests": args.max_requests, "load_s": round(load_s, 2), "levels": [],
    }
    with BackgroundServer(app) as server:
        asyncio.run(level(server.url, models, 1, 1, 4))  # warm-up: first-call allocations are not measured
        for mode in args.modes:
            engine.continuous, engine.mix_adapters = MODES[mode]
            for clients in args.clients if mode == "continuous" else args.other_clients:
                batches, rows = engine.batches, engine.batch_rows
                requests = min(args.max_requests, max(8, clients * args.rounds))
                figures = asyncio.run(level(server.url, models, clients, requests, args.max_tokens))
                figures.update(mode=mode, clients=clients,
                               mean_batch_rows=round((engine.batch_rows - rows) / max(1, engine.batches - batches), 2),
                               load_average_1m=round(os.getloadavg()[0], 2))
                report["levels"].append(figures)
                print(json.dumps(figures), flush=True)
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict[str, Any]) -> None:
    print(f"\nSmolLM2-135M + {len(report['runs'])} LoRA adapters + base, {report['max_tokens']} new tokens max, "
          f"{report['rounds']} requests per client (8 at least, {report['max_requests']} at most), "
          f"{report['machine']['torch_threads']} torch threads\n")
    print("| mode | clients | requests | TTFT p50 / p95 s | steady TTFT p50 / p95 s | total p50 / p95 s | tokens/s | "
          "mean batch | load 1m |")
    print("| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |")
    for f in report["levels"]:
        steady_ttft = (f"{f['steady_ttft_p50_s']:.2f} / {f['steady_ttft_p95_s']:.2f}" if f["steady_requests"] else "-")
        print(f"| {f['mode']} | {f['clients']} | {f['requests']} | {f['ttft_p50_s']:.2f} / {f['ttft_p95_s']:.2f} | "
              f"{steady_ttft} | "
              f"{f['total_p50_s']:.2f} / {f['total_p95_s']:.2f} | {f['tokens_per_s']:.1f} | {f['mean_batch_rows']:.1f} | "
              f"{f['load_average_1m']:.1f} |")


if __name__ == "__main__":
    main()
