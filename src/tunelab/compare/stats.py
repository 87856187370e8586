"""Means with Student-t 95% intervals over seeds, and the Pareto flag."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _t_density(x: float, df: int) -> float:
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return norm * (1 + x * x / df) ** (-(df + 1) / 2)


def _t_cdf_above_half(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for x >= 0: 0.5 plus the density integrated over [0, x] (Simpson's rule; smooth integrand)."""
    h = x / intervals
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The Student-t quantile for p in (0.5, 1), by bisection on the cdf (no scipy in the dependencies)."""
    low, high = 0.0, 1.0
    while _t_cdf_above_half(high, df) < p:
        high *= 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf_above_half(middle, df) < p else (low, middle)
    return (low + high) / 2


def mean_interval(values: Sequence[float], confidence: float = 0.95,
                  floor: float | None = None) -> dict[str, float | int | None]:
    """Mean over seeds with its Student-t interval; no interval from a single seed (its spread is unknown).
    ``floor``: the least the quantity can be (0 for a time, a size, a rate): the interval is cut there, as two
    seeds' wide interval would otherwise reach below it (a wall time of -636 s)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    low = mean - half if floor is None else max(mean - half, floor)
    return {"mean": mean, "low": low, "high": mean + half, "n": n}


def pareto_flags(costs: Sequence[Sequence[float]]) -> list[bool]:
    """For points whose every coordinate is a cost (lower is better): True for each point no other point
    dominates (at most as costly everywhere and cheaper somewhere)."""
    def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(other, point) for j, other in enumerate(costs) if j != i) for i, point in enumerate(costs)]
