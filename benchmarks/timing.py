"""Interleaved timing for the benchmarks: the variants run in turn (A, B, A, B, ...) so that machine noise
hits them alike, and each is reported by its median over the repeats."""

from __future__ import annotations

import statistics
import time


def interleaved(steps: dict, repeats: int, warmup: int = 3, baseline: str | None = None) -> dict:
    """``{"median_s": {name: s}, "ratio_<b>_over_<a>": …, "repeats": n}`` for ``steps`` = ``{name: fn}``;
    with two steps, the ratio is the second's median over the first's (``baseline`` names the first)."""
    times = {k: [] for k in steps}
    for _ in range(warmup):
        for f in steps.values():
            f()
    for _ in range(repeats):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"median_s": med}
    if len(steps) == 2:
        first, second = (baseline, next(k for k in steps if k != baseline)) if baseline else list(steps)
        out[f"ratio_{second}_over_{first}"] = med[second] / med[first]
    out["repeats"] = repeats
    return out
