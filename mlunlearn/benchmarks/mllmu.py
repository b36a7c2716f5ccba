"""MLLMU-Bench (arXiv 2410.22108) and the tiny world in its exact layout, as a registered benchmark.

Splits are the forget percentages 5, 10 and 15. Unlearning trains on ``ft_Data``'s question-answer pairs
of the people in ``forget_N`` (forget) and ``retain_{100-N}`` (retain); the evaluation is the official
protocol's four modes × three tasks × two modalities (:mod:`mlunlearn.eval.protocol`).
"""

from __future__ import annotations

from pathlib import Path

from mlunlearn.data.bench import open_benchmark

from . import UnlearningBenchmark, register_benchmark


@register_benchmark
class MLLMUBench(UnlearningBenchmark):
    name = "mllmu-bench"
    summary_line = "toyworld[:seed], mllmu-bench, mllmu-bench:<folder> or a folder in its hub layout"
    splits = (5, 10, 15)

    def __init__(self, source: str = "toyworld", files=None):
        self.source = source
        self.files = files if files is not None else open_benchmark(source)

    @classmethod
    def accepts(cls, source: str) -> bool:
        return (source in ("toyworld", "mllmu-bench") or source.startswith(("toyworld:", "mllmu-bench:"))
                or Path(source).expanduser().is_dir())

    def unlearning_data(self, split):
        from mlunlearn.data.unlearning import unlearning_data

        self.check_split(split)
        return unlearning_data(self.files, split)

    def queries(self, split, **options) -> list:
        from mlunlearn.eval.protocol import build_queries

        self.check_split(split)
        return build_queries(self.files, split, **options)

    def evaluate(self, model, processor, split, **options):
        from mlunlearn.eval.protocol import evaluate

        self.check_split(split)
        return evaluate(model, processor, self.files, split, **options)

    def __repr__(self) -> str:
        return f"MLLMUBench({self.source!r})"
