"""The README's "Bad input and what it gets" table: every row names tests, and every named test exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"bad_input": "test_bad_input.py", "runs": "test_runs.py", "cli": "test_cli.py",
           "engine": "test_engine.py", "mmunlearner": "test_mmunlearner.py", "nullspace": "test_nullspace.py",
           "continual": "test_continual.py", "cagul": "test_cagul.py", "saliency": "test_saliency.py",
           "safety": "test_safety.py", "bench": "test_bench.py", "protocol": "test_protocol.py",
           "clear": "test_clear.py", "multigpu": "test_multigpu.py", "memory": "test_memory.py",
           "faults": "test_faults.py",
           "benchmark_report": "test_benchmark_report.py"}


def _table_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Bad input and what it gets", 1)[1].split("\n#", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]


def _tests_in(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / module).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_row_of_the_bad_input_table_names_existing_tests():
    rows = _table_rows()
    assert len(rows) >= 20
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[1]
        names = re.findall(r"`(?:(\w+)::)?(test_\w+)`|`::(test_\w+)`", cell)
        assert names, f"row without a test: {row}"
        module = None
        for prefix, name, continued in names:
            module = prefix or module
            assert module in MODULES, f"unknown test module {module!r} in: {row}"
            assert (name or continued) in _tests_in(MODULES[module]), f"{module}::{name or continued} does not exist"
