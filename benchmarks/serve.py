"""Latency and throughput of `tunelab serve` on the real SmolLM2-135M-Instruct base with two LoRA adapters.
Not part of the test suite (speed is measured here, never asserted in tests). Usage:

    .venv/bin/python benchmarks/serve.py [--runs RUN RUN] [--clients 1 4 16 64] [--modes continuous whole-batch]
                                         [--threads 2] [--max-tokens 32] [--dtype auto] [--out FILE.json]

Without ``--runs`` it first trains two small LoRA runs on the embedded SmolLM2 (two steps each, on the bicycle
support chats and on the pydoc questions) into ``--work`` and reuses them on the next call.

The server is what a user runs: ``python -m tunelab serve RUN RUN`` in its own process (one per mode, its torch
threads set by ``OMP_NUM_THREADS``), so the clients, which run on this process's asyncio loop, never share its
interpreter lock. Its log goes to ``--work/serve-MODE.log``. ``--dtype`` is the server's (auto: bfloat16 weights on a
CPU with native bfloat16, float32 elsewhere; the dtype it chose, from /health, is in the JSON and the table's
heading).

What is measured: closed-loop clients (each sends its next request when the previous one has finished), every
request a streamed ``/v1/chat/completions`` with ``max_tokens`` new tokens at most, greedy; the requests cycle
over the two adapters and the base, so concurrent requests ask for different adapters. For each number of
clients, ``--rounds`` requests per client (8 requests at least, ``--max-requests`` at most). Per request: the
time to the first streamed token (TTFT) and to the end, p50 and p95 (nearest rank); throughput is all completion
tokens over the wall time of the level.

Arrivals (``--arrivals``):

- ``burst``: every client sends its first request at the same moment, the worst case. "TTFT" is over all
  requests; "steady TTFT" over the requests after each client's first, which arrive as the clients' previous
  answers end (the burst left out; what a server under steady closed-loop load sees once it has settled).
- ``staggered``: client i starts at i x S, S = the single-client level's median request time over the number of
  clients (``--stagger`` seconds if given), so the first requests are spread over one request's duration as they
  would be in a steady stream; every request counts, the first ones included.

Server modes (``--modes``, the hidden ``tunelab serve --scheduling``): ``continuous`` (the server as it runs:
requests join and leave the running batch at every step, requests for different adapters share it through PEFT's
mixed-adapter inference), ``whole-batch`` (the scheduling the server had before: the requests that arrive within
10 ms run as one batch to its end before the next starts; mixed adapters too) and ``per-adapter`` (continuous,
but the running batch holds one adapter's requests only). "Mean batch" is rows per forward pass (prefills and
decoding steps) for the continuous modes, rows per batch for ``whole-batch``, read from the server's /metrics, as
is the share of the level's prompt tokens taken from the adapters' cached prompt prefixes (``prompt_tokens_cached``
in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from smollm_runs import train_runs  # benchmarks/ is this script's folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("continuous", "whole-batch", "per-adapter")
QUESTIONS = ["My chain keeps slipping. What should I check?", "How do I use `json.dumps`?",
             "What tyre pressure should I use?", "Explain `atexit.register`.", "How often should I oil my chain?",
             "What does `os.path.join` do?", "My brakes squeal. Why?", "How do I sort a list of tuples by the second item?"]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


# ---------------------------------------------------------------- the server, in its own process


class Server:
    """``tunelab serve`` as a child process on a free local port; a context manager."""

    def __init__(self, runs: list[Path], mode: str, args: argparse.Namespace) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "tunelab", "serve", *map(str, runs), "--port", str(self.port),
                        "--max-concurrent", str(max(args.clients) * 2), "--max-tokens-limit", str(args.max_tokens),
                        "--max-batch-size", str(args.max_batch_size), "--timeout", "900", "--scheduling", mode,
                        "--dtype", args.dtype]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the server
        self.log_path = args.work / f"serve-{mode}.log"
        self.process: subprocess.Popen | None = None
        self.dtype: str | None = None  # the weights' dtype the server chose, from /health

    def __enter__(self) -> "Server":
        started = time.perf_counter()
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tunelab serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=5)
                if health.status_code == 200:
                    self.dtype = health.json().get("dtype")
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"tunelab serve did not answer /health within 600 s; see {self.log_path}")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down on SIGTERM
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def counters(self) -> tuple[float, float, float, float]:
        """(forward passes, rows in them, prompt tokens, prompt tokens taken from cached prefixes) so far, from
        /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        found = {name: float(value) for name, value in
                 re.findall(r"^(tunelab_batch(?:es|_rows)|tunelab_prefix_cached_tokens) (\S+)$", text, re.M)}
        prompt = sum(float(v) for v in re.findall(r"^tunelab_prompt_tokens_total\{.*\} (\S+)$", text, re.M))
        return found["tunelab_batches"], found["tunelab_batch_rows"], prompt, found.get("tunelab_prefix_cached_tokens", 0.0)


# ---------------------------------------------------------------- the clients, on this process's asyncio loop


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


async def level(url: str, models: list[str], clients: int, requests: int, max_tokens: int,
                stagger_s: float = 0.0) -> dict[str, Any]:
    """``clients`` closed-loop clients sharing ``requests`` requests, client i starting at i x ``stagger_s``;
    request k asks models[k % len(models)]."""
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for k in range(requests):
        jobs.put_nowait(k)
    results: list[dict[str, Any]] = []

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * stagger_s)
        first = True
        while not jobs.empty():
            k = jobs.get_nowait()
            result = await one_request(client, url, models[k % len(models)], QUESTIONS[k % len(QUESTIONS)], max_tokens)
            results.append({**result, "first": first})
            first = False

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
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
    """TTFT over the requests after each client's first (see the module's docstring)."""
    later = [r["ttft_s"] for r in results if not r["first"]]
    if not later:
        return {"steady_requests": 0, "steady_ttft_p50_s": None, "steady_ttft_p95_s": None}
    return {"steady_requests": len(later), "steady_ttft_p50_s": round(percentile(later, 0.5), 3),
            "steady_ttft_p95_s": round(percentile(later, 0.95), 3)}


# ---------------------------------------------------------------- the levels of one mode


def run_mode(runs: list[Path], mode: str, args: argparse.Namespace, report: dict[str, Any]) -> None:
    with Server(runs, mode, args) as server:
        models = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]]
        models = [m for m in models if m != "base"] + ["base"]
        report.update(models=models)
        report["server_start_s"][mode] = round(server.start_s, 2)
        report["dtype"][mode] = server.dtype  # what the server chose (/health)
        asyncio.run(level(server.url, models, 1, 1, 4))  # warm-up: first-call allocations are not measured
        counts = args.clients if mode == "continuous" else args.other_clients
        plan = [(c, "burst") for c in counts] + [(c, "staggered") for c in args.staggered if mode == "continuous"]
        single = None
        for clients, arrivals in plan:
            requests = min(args.max_requests, max(8, clients * args.rounds))
            stagger = 0.0
            if arrivals == "staggered":
                stagger = args.stagger if args.stagger is not None else (single or 1.0) / clients
            before = server.counters()
            figures = asyncio.run(level(server.url, models, clients, requests, args.max_tokens, stagger))
            after = server.counters()
            if clients == 1 and arrivals == "burst":
                single = figures["total_p50_s"]
            figures.update(mode=mode, clients=clients, arrivals=arrivals, stagger_s=round(stagger, 3),
                           mean_batch_rows=round((after[1] - before[1]) / max(1.0, after[0] - before[0]), 2),
                           prompt_tokens_cached=round((after[3] - before[3]) / max(1.0, after[2] - before[2]), 3),
                           load_average_1m=round(os.getloadavg()[0], 2))
            report["levels"].append(figures)
            print(json.dumps(figures), flush=True)


def machine(threads: int | None) -> dict[str, Any]:
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    return {"cpus": os.cpu_count(), "server_torch_threads": threads or "torch's default", "python": platform.python_version(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs=2, type=Path, help="two LoRA run folders of one base (default: train two)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-serve-bench"), help="the trained runs, the logs")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--staggered", nargs="*", type=int, default=[16],
                        help="continuous only: the client counts also measured with staggered starts")
    parser.add_argument("--stagger", type=float, default=None, help="seconds between staggered starts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["continuous", "whole-batch"])
    parser.add_argument("--other-clients", nargs="+", type=int, default=[1, 4, 16],
                        help="the levels of the modes other than continuous (the comparison points)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level (8 at least)")
    parser.add_argument("--max-requests", type=int, default=64, help="at most this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="the server's --dtype")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    runs = args.runs or train_runs(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(args.threads), "runs": [str(r) for r in runs], "max_tokens": args.max_tokens,
        "rounds": args.rounds, "max_batch_size": args.max_batch_size, "modes": args.modes,
        "max_requests": args.max_requests, "server_start_s": {}, "dtype": {}, "levels": [],
    }
    started = time.perf_counter()
    for mode in args.modes:
        run_mode(list(runs), mode, args, report)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nSmolLM2-135M + {len(report['runs'])} LoRA adapters + base, {report['max_tokens']} new tokens max, "
          f"{report['rounds']} requests per client (8 at least, {report['max_requests']} at most); server in its own "
          f"process, {m['server_torch_threads']} torch threads; {m['cpus']} CPUs ({', '.join(m['cpu_flags'])}); "
          f"load average {m['load_average_at_start'][0]:.2f} at the start, {m['load_average_at_end'][0]:.2f} at the "
          f"end; {report['wall_s']:.0f} s; weights in {', '.join(sorted(set(report['dtype'].values())))}\n")
    print("| scheduling | arrivals | clients | requests | TTFT p50 / p95 (s) | steady TTFT p50 / p95 (s) | "
          "total p50 / p95 (s) | tokens/s | mean batch | load (1 min) |")
    print("| --- | --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |")
    for f in report["levels"]:
        steady_ttft = (f"{f['steady_ttft_p50_s']:.2f} / {f['steady_ttft_p95_s']:.2f}" if f["steady_requests"] else "-")
        arrivals = f["arrivals"] + (f" ({f['stagger_s']:.2f} s)" if f["arrivals"] == "staggered" else "")
        print(f"| {f['mode']} | {arrivals} | {f['clients']} | {f['requests']} | {f['ttft_p50_s']:.2f} / "
              f"{f['ttft_p95_s']:.2f} | {steady_ttft} | {f['total_p50_s']:.2f} / {f['total_p95_s']:.2f} | "
              f"{f['tokens_per_s']:.1f} | {f['mean_batch_rows']:.1f} | {f['load_average_1m']:.1f} |")


if __name__ == "__main__":
    main()
