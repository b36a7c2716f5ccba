"""The synthetic world and the benchmark loader (book chapter 1)."""

from .bench import Benchmark, BenchmarkError, decode_image, open_benchmark, require_columns, write_benchmark
from .portraits import TRAITS, View, draw_portrait, random_view
from .refusals import IDK, REFUSALS
from .world import ATTRIBUTES, World, build_world

__all__ = [
    "ATTRIBUTES", "Benchmark", "BenchmarkError", "IDK", "REFUSALS", "TRAITS", "View", "World",
    "build_world", "decode_image", "draw_portrait", "open_benchmark", "random_view", "require_columns",
    "write_benchmark",
]
