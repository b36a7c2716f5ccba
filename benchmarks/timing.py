"""Interleaved timing for the benchmarks: the variants run in turn (A, B, A, B, ...) so that machine noise
hits them alike, and each is reported by its median over the repeats."""

from __future__ import annotations

import statistics
import time

# For every script here: the package's one-line argparse errors ("<script>: error: <what>; see <script>
# --help", exit 2) and its whole-number type.
from mlunlearn.cli import OneLineParser, at_least  # noqa: F401


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


def provenance(code: tuple[str, ...] = ("mlunlearn", "benchmarks/*.py")) -> dict:
    """``{"measured_date", "measured_commit", "measured_machine"}``: when, on which code and on what a result was
    measured, for the README's Performance table (benchmarks/report.py). ``commit`` is HEAD's short hash, with
    "+dirty" when the paths in ``code`` have uncommitted changes (what ran is then not exactly that commit).

    Flat strings, not a nested dict: chapter 4 reads sine_overhead.json and takes every dict in it for a
    timing (so would any reader that walks a result's measurements)."""
    import datetime
    import os
    import platform
    import subprocess
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git: the commit is unknown, the measurement still stands
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *code)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = machine_text({"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "torch": torch.__version__,
                            "python": platform.python_version()})
    return {"measured_date": datetime.date.today().isoformat(), "measured_commit": head + ("+dirty" if dirty else ""),
            "measured_machine": machine}


def machine_text(m: dict) -> str:
    """'2 cores, AMD EPYC, torch 2.13.0+cpu, python 3.11.7' (the GPU after the CPU when there is one)."""
    return (f"{m['cores']} cores, {m['cpu']}" + (f", {m['gpu']}" if m.get("gpu") else "")
            + f", torch {m['torch']}, python {m['python']}")
