"""The book's chapters are committed executed, top to bottom, in one kernel, without errors.

nbval (`make test`) only compares outputs that are stored: a notebook saved without outputs would pass it
trivially. These checks close that gap, and keep _toc.yml and book/ in step (a chapter missing from the
table of contents is silently left out of the book; a listed chapter that does not exist breaks it).

They also check what the rendered page shows: code lines that fit the book's column, and stored outputs
that are static (no ipywidgets views, which render as noise without a kernel, and no progress bars).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from sphinx_external_toc.parsing import parse_toc_yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
SOURCE_SUFFIXES = (".ipynb", ".md")
# The book's code column holds about 88 monospace characters; longer lines are cut on the page.
MAX_CODE_LINE = 88
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# tqdm-style bars: " 45%|████▌     | 9/20 [00:01<00:01,  8.01it/s]", rates, or carriage-return redraws.
PROGRESS_BAR = re.compile(r"\d{1,3}%\|[^|\n]*\||\d\s?(?:it/s|s/it)\b|\r(?!\n)")


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


def _code_cells(path: Path) -> list[tuple[int, nbformat.NotebookNode]]:
    nb = nbformat.read(path, as_version=4)
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


@pytest.mark.parametrize("path", _all_notebooks(), ids=_rel)
def test_code_lines_fit_the_column(path):
    long_lines = [
        (i, n, len(line))
        for i, cell in _code_cells(path)
        for n, line in enumerate(cell.source.splitlines(), start=1)
        if len(line) > MAX_CODE_LINE
    ]
    assert not long_lines, (
        f"{_rel(path)}: code lines longer than {MAX_CODE_LINE} characters "
        f"(cell index, line, length): {long_lines}"
    )


@pytest.mark.parametrize("path", _all_notebooks(), ids=_rel)
def test_no_widget_outputs_stored(path):
    widgets = [
        i
        for i, cell in _code_cells(path)
        for out in cell.get("outputs", [])
        if WIDGET_MIME in out.get("data", {})
    ]
    assert not widgets, (
        f"{_rel(path)}: cells {widgets} (0-based) store {WIDGET_MIME} outputs, which render as noise "
        "without a kernel: store a static output (re-execute with tools/execute_notebooks.py, which "
        "turns progress bars off, and keeps only the text/html fallback of a live widget in a cell "
        "marked # NBVAL_IGNORE_OUTPUT)"
    )


@pytest.mark.parametrize("path", _all_notebooks(), ids=_rel)
def test_no_widget_state_stored(path):
    """With no widget view stored, widget state in the notebook's metadata describes nothing on the page,
    yet myst-nb loads require.js and the ipywidgets HTML manager from CDNs for it on every such page."""
    metadata = json.loads(path.read_text())["metadata"]
    assert "widgets" not in metadata, (
        f"{_rel(path)}: stores ipywidgets state (metadata 'widgets', left by a progress bar) but no widget "
        "view; re-execute it with tools/execute_notebooks.py, which drops it")


@pytest.mark.parametrize("path", _all_notebooks(), ids=_rel)
def test_no_progress_bars_in_stderr(path):
    bars = [
        (i, out.get("text", "").strip()[:60])
        for i, cell in _code_cells(path)
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.get("name") == "stderr"
        and PROGRESS_BAR.search(out.get("text", ""))
    ]
    assert not bars, f"{_rel(path)}: progress bars stored in stderr (cell index, match): {bars}"


def test_progress_bar_pattern_finds_tqdm_output():
    import io

    from tqdm import tqdm

    stream = io.StringIO()
    for _ in tqdm(range(3), file=stream, disable=False, desc="sweep"):  # TQDM_DISABLE may be set
        pass
    assert PROGRESS_BAR.search(stream.getvalue())
    assert PROGRESS_BAR.search("methods:  50%|█████     | 3/6 [00:10<00:10,  3.33s/it]")
    ordinary = "UserWarning: 100% of the retain answers were kept.\nrun took 12 s\n"
    assert not PROGRESS_BAR.search(ordinary)


def _execute_notebooks_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "tools" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_execute_tool_env_is_the_makefiles():
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("NB_ENV :="))
    makefile_env = dict(item.split("=", 1) for item in line.split(":=", 1)[1].split())
    assert _execute_notebooks_tool().NOTEBOOK_ENV == makefile_env


def test_execute_tool_fills_in_only_unset_variables():
    tool = _execute_notebooks_tool()
    environ = {"OMP_NUM_THREADS": "4"}
    warnings = tool.apply_notebook_env(environ)
    assert environ == {**tool.NOTEBOOK_ENV, "OMP_NUM_THREADS": "4"}
    assert len(warnings) == 1 and "OMP_NUM_THREADS=4" in warnings[0]


def _tiny_notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)
    return path


def test_direct_execution_gets_the_makefile_env(tmp_path, monkeypatch):
    """Called without the Makefile's environment, the tool still runs the kernel with it."""
    tool = _execute_notebooks_tool()
    for key in tool.NOTEBOOK_ENV:
        monkeypatch.delenv(key, raising=False)
    keys = ", ".join(repr(key) for key in tool.NOTEBOOK_ENV)
    path = _tiny_notebook(tmp_path / "chapter.ipynb", f"import os\nprint([os.environ.get(k) for k in ({keys})])")
    assert tool.main([str(path)]) == 0
    (output,) = nbformat.read(path, as_version=4).cells[0].outputs
    assert output["text"] == f"{list(tool.NOTEBOOK_ENV.values())}\n"


def test_widget_outputs_are_not_written_back(tmp_path):
    tool = _execute_notebooks_tool()
    bar = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='sweep'):\n    pass"
    path = _tiny_notebook(tmp_path / "chapter.ipynb", bar)
    before = path.read_bytes()
    assert tool.main([str(path)]) == 1  # TQDM_DISABLE does not stop a notebook bar: it is refused
    assert path.read_bytes() == before
    quiet = _tiny_notebook(tmp_path / "quiet.ipynb", bar.replace("desc='sweep'", "disable=True"))
    assert tool.main([str(quiet)]) == 0
    assert nbformat.read(quiet, as_version=4).cells[0].outputs == []


def test_chapter_times_are_summed_per_notebook_under_xdist(tmp_path):
    """book/conftest.py prints one line per chapter at the end of `make test-notebooks` (two workers)."""
    import shutil
    import subprocess
    import sys

    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(BOOK / "conftest.py", book / "conftest.py")
    _tiny_notebook(book / "01_fine.ipynb", "print('one')", "print('two')")
    _tiny_notebook(book / "02_broken.ipynb", "raise RuntimeError('broken chapter')")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope",
         "--nbval-lax", "--nbval-current-env", "book"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    summary = run.stdout.split("time per chapter", 1)[1].splitlines()
    assert re.search(r"^\s*0 min \d\d s  passed  book/01_fine\.ipynb$", "\n".join(summary), re.M)
    assert re.search(r"^\s*0 min \d\d s  FAILED  book/02_broken\.ipynb$", "\n".join(summary), re.M)
    assert "(sum over chapters)" in run.stdout


LIVE_WIDGET = """import ipywidgets
class Live:
    def _repr_mimebundle_(self, **kwargs):
        view = ipywidgets.Button(description="go")._repr_mimebundle_(**kwargs)
        return {**view, "text/html": "<p>run the notebook to use it</p>"}
Live()"""


def test_a_live_widget_is_stored_as_its_html_fallback_only_in_an_ignored_cell(tmp_path):
    """A widget in a cell marked NBVAL_IGNORE_OUTPUT with a text/html fallback (chapter 11's explorer) is
    written back as the fallback alone, without widget state; unmarked, or without a fallback, refused."""
    tool = _execute_notebooks_tool()
    path = _tiny_notebook(tmp_path / "live.ipynb", "# NBVAL_IGNORE_OUTPUT\n" + LIVE_WIDGET, "print('after')")
    assert tool.main([str(path)]) == 0
    nb = nbformat.read(path, as_version=4)
    (output,) = nb.cells[0].outputs
    assert output["data"]["text/html"] == "<p>run the notebook to use it</p>"
    assert WIDGET_MIME not in output["data"] and "widgets" not in nb.metadata
    assert nb.cells[1].outputs[0]["text"] == "after\n"
    for source in (LIVE_WIDGET, "# NBVAL_IGNORE_OUTPUT\nimport ipywidgets\nipywidgets.Button()"):
        refused = _tiny_notebook(tmp_path / "refused.ipynb", source)
        before = refused.read_bytes()
        assert tool.main([str(refused)]) == 1
        assert refused.read_bytes() == before
