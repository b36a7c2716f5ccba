"""The book's chapters are committed executed, top to bottom, in one kernel, without errors.

nbval (`make test`) only compares outputs that are stored: a notebook saved without outputs would pass it
trivially. These checks close that gap, and keep _toc.yml and book/ in step (a chapter missing from the
table of contents is silently left out of the book; a listed chapter that does not exist breaks it).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from sphinx_external_toc.parsing import parse_toc_yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
SOURCE_SUFFIXES = (".ipynb", ".md")


def _toc_docnames() -> list[str]:
    return list(parse_toc_yaml(ROOT / "_toc.yml"))  # the parser jupyter-book itself uses


def _source_of(docname: str) -> Path | None:
    for suffix in SOURCE_SUFFIXES:
        path = ROOT / f"{docname}{suffix}"
        if path.exists():
            return path
    return None


def _book_notebooks() -> set[Path]:
    return {p for p in BOOK.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and "_build" not in p.parts}


def _all_notebooks() -> list[Path]:
    listed = {p for p in map(_source_of, _toc_docnames()) if p is not None and p.suffix == ".ipynb"}
    return sorted(listed | _book_notebooks())


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("docname", _toc_docnames())
def test_toc_entry_exists(docname):
    assert _source_of(docname) is not None, (
        f"_toc.yml lists {docname!r} but none of {[docname + s for s in SOURCE_SUFFIXES]} exists"
    )


def test_every_notebook_is_in_toc():
    listed = {ROOT / f"{doc}.ipynb" for doc in _toc_docnames()}
    unlisted = sorted(_rel(p) for p in _book_notebooks() - listed)
    assert not unlisted, f"notebooks under book/ missing from _toc.yml: {unlisted}"


@pytest.mark.parametrize("path", _all_notebooks(), ids=_rel)
def test_notebook_executed_in_order_without_errors(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)

    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
    assert code, f"{_rel(path)} has no code cells"

    counts = [c.execution_count for _, c in code]
    unexecuted = [i for (i, _), n in zip(code, counts) if n is None]
    assert not unexecuted, f"{_rel(path)}: cells {unexecuted} (0-based) were never executed; run `make execute`"
    expected = list(range(1, len(code) + 1))
    assert counts == expected, (
        f"{_rel(path)}: execution counts {counts} are not 1..{len(code)} in order: "
        "re-execute the notebook top to bottom in a fresh kernel (`make execute`)"
    )

    errors = [
        (i, out.get("ename"))
        for i, c in code
        for out in c.get("outputs", [])
        if out.output_type == "error"
    ]
    assert not errors, f"{_rel(path)}: error outputs (cell index, exception): {errors}"
