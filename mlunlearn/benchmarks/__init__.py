"""Benchmarks as the engine and the evaluation see them: one interface, one registry (book chapter 2).

A benchmark says what a run unlearns and how it is judged:

- ``splits``: the forget requests it defines (MLLMU-Bench: forget 5, 10 or 15 % of its people);
- ``unlearning_data(split)``: the forget and retain examples a method trains on;
- ``queries(split)``: the evaluation questions, each with its scorer;
- ``evaluate(model, processor, split)``: the replies, scored (an :class:`~mlunlearn.eval.EvalResult`);
- ``summary(result)``: the benchmark's own table of that result.

Register a new one with :func:`register_benchmark` (a class with ``name`` and ``accepts(source)``);
:func:`get_benchmark` turns a command-line ``--data`` string into an instance. MLLMU-Bench and the tiny
synthetic world in its exact layout are the first (:mod:`mlunlearn.benchmarks.mllmu`); SafeEraser, VLGuard
and the tiny safety world in SafeEraser's layout follow (:mod:`mlunlearn.benchmarks.safety`), then CLEAR's
evaluation (:mod:`mlunlearn.benchmarks.clear`).
"""

from __future__ import annotations

from typing import ClassVar

from mlunlearn.data.bench import BenchmarkError

BENCHMARKS: dict = {}


class UnlearningBenchmark:
    """Base class of the registered benchmarks (see the module docstring)."""

    name: ClassVar[str] = ""
    summary_line: ClassVar[str] = ""
    splits: ClassVar[tuple] = ()
    source: str = ""  # the --data string it was opened from (recorded in run.json)

    @classmethod
    def accepts(cls, source: str) -> bool:
        """Whether a ``--data`` string names this benchmark."""
        raise NotImplementedError

    def check_split(self, split) -> None:
        if split not in self.splits:
            raise BenchmarkError(f"{self.name} has no split {split!r}; use one of "
                                 f"{', '.join(map(str, self.splits))}")

    def unlearning_data(self, split):
        raise NotImplementedError

    def queries(self, split, **options) -> list:
        raise NotImplementedError

    def evaluate(self, model, processor, split, **options):
        raise NotImplementedError

    def summary(self, result):
        return result.summary()


def register_benchmark(cls):
    """Class decorator: add an :class:`UnlearningBenchmark` subclass under its ``name``."""
    if not cls.name or cls.name in BENCHMARKS:
        raise ValueError(f"benchmark name {cls.name!r} is empty or taken")
    BENCHMARKS[cls.name] = cls
    return cls


def get_benchmark(source: str) -> UnlearningBenchmark:
    """The registered benchmark a ``--data`` string names (e.g. ``toyworld``, ``mllmu-bench:<folder>``)."""
    for cls in BENCHMARKS.values():
        if cls.accepts(source):
            return cls(source)
    raise BenchmarkError(f"no benchmark reads --data {source!r}; registered: "
                         + "; ".join(f"{n} ({c.summary_line})" for n, c in BENCHMARKS.items()))


def as_benchmark(data) -> UnlearningBenchmark:
    """A benchmark from a ``--data`` string, an :class:`UnlearningBenchmark`, or the files of one
    (:class:`mlunlearn.data.bench.Benchmark`, read as MLLMU-Bench's layout)."""
    from mlunlearn.data.bench import Benchmark

    from .mllmu import MLLMUBench

    if isinstance(data, UnlearningBenchmark):
        return data
    from .clear import Clear, ClearFiles

    if isinstance(data, ClearFiles):  # CLEAR's files are not MLLMU-Bench's layout
        return Clear(data.name, files=data)
    if isinstance(data, Benchmark):
        return MLLMUBench(data.name, files=data)
    if isinstance(data, str):
        return get_benchmark(data)
    raise BenchmarkError(f"cannot use {type(data).__name__} as a benchmark; pass a --data string such as "
                         "'toyworld' or the result of mlunlearn.data.open_benchmark")


# Why safety and CLEAR first: their prefixes are exact (CLEAR's folder check looks for forget01|05|10 and no
# forget_5), while MLLMU-Bench also takes any existing folder.
from . import safety  # noqa: E402,F401  (registers SafeEraser, the tiny safety world and VLGuard)
from . import clear  # noqa: E402,F401  (registers CLEAR)
from . import mllmu  # noqa: E402,F401  (registers MLLMU-Bench)

__all__ = ["BENCHMARKS", "UnlearningBenchmark", "as_benchmark", "get_benchmark", "register_benchmark"]
