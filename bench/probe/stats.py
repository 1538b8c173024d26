"""Percentiles and medians for the interference bench (nearest-rank on sorted samples)."""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

PCTS = (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def summary(values: Iterable[float]) -> dict[str, float]:
    v = sorted(values)
    out = {name: percentile(v, q) for name, q in PCTS}
    out["max"] = v[-1] if v else float("nan")
    out["n"] = float(len(v))
    return out


def median_of(dicts: Sequence[dict[str, float]], key: str) -> float:
    vals = [d[key] for d in dicts if key in d and d[key] == d[key]]
    return statistics.median(vals) if vals else float("nan")


def throughput(points: Sequence[tuple[float, int]], t0: float, t1: float) -> float:
    """Work units per second between host times t0 and t1 from (host time, cumulative units)
    lines; the first line at or after t0 and the last at or before t1 bound the window."""
    inside = [(t, n) for t, n in points if t0 <= t <= t1]
    if len(inside) < 2:
        return float("nan")
    (ta, na), (tb, nb) = inside[0], inside[-1]
    return (nb - na) / (tb - ta) if tb > ta else float("nan")
