"""Timing of ``pack_rows`` (first-fit decreasing packing) at 20k and 200k examples, against the quadratic scan it
replaced, and the packing quality of both (rows and fill). Not part of the test suite. Usage:

    .venv/bin/python benchmarks/pack_rows.py [--sizes 20000 200000] [--max-length 1024] [--old-up-to 20000]

Lengths are drawn like chat data: log-normal around ~180 tokens, clipped to [8, max_length], seed 0.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from tunelab.data.batching import pack_rows


def quadratic_first_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    """The previous implementation: scan every row for each example (O(n^2)); the reference for quality."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        size = lengths[index]
        slot = next((r for r, room in enumerate(free) if room >= size), None)
        if slot is None:
            rows.append([index])
            free.append(max_length - size)
        else:
            rows[slot].append(index)
            free[slot] -= size
    return rows


def chat_like_lengths(count: int, max_length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(max_length, max(8, int(rng.lognormvariate(math.log(180), 0.8)))) for _ in range(count)]


def fill(rows: list[list[int]], lengths: list[int], max_length: int) -> float:
    return sum(lengths) / (len(rows) * max_length)


def timed(function, *args) -> tuple[float, list[list[int]]]:  # noqa: ANN001 - a packing function
    start = time.perf_counter()
    rows = function(*args)
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--old-up-to", type=int, default=20_000, help="run the quadratic scan only up to this size")
    args = parser.parse_args()
    print(f"{'examples':>9} {'pack_rows s':>12} {'rows':>8} {'fill':>7} {'old scan s':>11} {'same rows':>10}")
    for count in args.sizes:
        lengths = chat_like_lengths(count, args.max_length)
        seconds, rows = timed(pack_rows, lengths, args.max_length)
        old = "-"
        same = "-"
        if count <= args.old_up_to:
            old_seconds, old_rows = timed(quadratic_first_fit, lengths, args.max_length)
            old, same = f"{old_seconds:.2f}", str(old_rows == rows)
        print(f"{count:>9} {seconds:>12.3f} {len(rows):>8} {fill(rows, lengths, args.max_length):>7.2%} {old:>11} {same:>10}")


if __name__ == "__main__":
    main()
