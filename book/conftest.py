"""pytest plugin for the nbval run over book/ (`make test-notebooks`): each chapter's time, at the end.

Loaded because pytest is given book/ (or a notebook in it). Under pytest-xdist every test report reaches
the controller, so the per-chapter sums below are complete there too. A chapter's time is the sum of the
setup, call and teardown durations of its cells: kernel start, every cell, kernel stop; that is its wall
time on the worker that ran it (with `-n 2` two chapters run at once, so the sum over chapters is more than
the run's wall time).
"""

from __future__ import annotations

from collections import defaultdict

BUDGET_S = 5 * 60  # each chapter must stay under 5 minutes on one core (nine chapters, CI stops at 90)

_seconds: dict[str, float] = defaultdict(float)
_failed: set[str] = set()


def pytest_runtest_logreport(report):
    notebook = report.nodeid.split("::", 1)[0]
    if not notebook.endswith(".ipynb"):
        return
    _seconds[notebook] += report.duration
    if report.failed:
        _failed.add(notebook)


def pytest_terminal_summary(terminalreporter):
    if not _seconds:
        return
    terminalreporter.section("time per chapter (kernel start to stop)")
    for notebook in sorted(_seconds):
        minutes, seconds = divmod(round(_seconds[notebook]), 60)
        status = "FAILED" if notebook in _failed else "passed"
        over = "  (over the 5-minute budget)" if _seconds[notebook] > BUDGET_S else ""
        terminalreporter.write_line(f"{minutes:3d} min {seconds:02d} s  {status}  {notebook}{over}")
    total = round(sum(_seconds.values()))
    terminalreporter.write_line(f"{total // 60:3d} min {total % 60:02d} s  (sum over chapters)")
