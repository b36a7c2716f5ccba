"""Re-execute the book's chapter notebooks in place, top to bottom, one fresh kernel each.

Usage: python tools/execute_notebooks.py [NOTEBOOK ...]
Without arguments: every notebook listed in _toc.yml. The kernel gets the environment of `make test`
(NOTEBOOK_ENV below, the Makefile's NB_ENV: one thread, PYTHONHASHSEED=0, offline hubs, progress bars
off) for every variable not already set, so a direct call stores the same outputs as `make execute`; a
variable set to another value is kept, with a warning.

A notebook whose outputs include an ipywidgets view (a tqdm bar in a notebook is one) is not written back
either: without a kernel the book renders it as noise. TQDM_DISABLE cannot prevent those bars, because
tqdm's environment variables only change defaults, and both `tqdm(..., disable=not progress)` and
tqdm.notebook (which turns `disable=None` into False) pass the argument explicitly: a chapter has to
call the package with `progress=False`.

One exception, for a chapter whose point is a live widget (chapter 11's explorer): a cell marked
`# NBVAL_IGNORE_OUTPUT` whose widget output also carries a `text/html` fallback (what to do without a
kernel) is written back with the fallback only: the widget view is dropped from that output, and so is
the widget state nbclient puts in the notebook's metadata. Any other widget output is still refused.

The kernel is always this interpreter (the project's venv), whatever kernelspecs the user has installed.
A notebook whose execution fails is not written back; the others still run; the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from sphinx_external_toc.parsing import parse_toc_yaml

ROOT = Path(__file__).resolve().parent.parent
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 3 * 3600  # generous: a chapter that trains may legitimately take long on 2 CPU cores
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# The Makefile's NB_ENV (tests/test_notebooks_executed.py checks that the two agree). One thread and a
# fixed hash seed make the outputs reproducible; the hubs are offline (CI has no network); progress bars
# are off (for the code that leaves tqdm's `disable` to its default) because nbval compares stderr.
NOTEBOOK_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}


def apply_notebook_env(environ=os.environ) -> list[str]:
    """Set every NOTEBOOK_ENV variable that is unset; return warnings for those set to other values.

    The kernel is started by jupyter_client with a copy of this process's environment, so setting them
    here sets them for the kernel.
    """
    warnings = []
    for key, value in NOTEBOOK_ENV.items():
        current = environ.setdefault(key, value)
        if current != value:
            warnings.append(f"{key}={current} from the environment (make test uses {value}): the stored "
                            "outputs may not match what nbval sees in CI")
    return warnings


IGNORE_OUTPUT = "# NBVAL_IGNORE_OUTPUT"  # nbval does not compare this cell's outputs
WIDGET_STATE = "widgets"  # the notebook metadata key where nbclient stores widget state


def widget_cells(nb) -> list[int]:
    """0-based indices of the cells whose outputs include an ipywidgets view."""
    return [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            and any(WIDGET_MIME in out.get("data", {}) for out in cell.get("outputs", []))]


def keep_widget_fallbacks(nb) -> list[int]:
    """Drop the widget view from each output that has a ``text/html`` fallback, in cells marked
    ``# NBVAL_IGNORE_OUTPUT`` (their stored output is for the page, not for nbval); then, if one was dropped
    and no widget view is left, the widget state in the notebook's metadata (it describes the dropped
    views, or a progress bar's). Returns the indices of the cells changed."""
    changed = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.lstrip().startswith(IGNORE_OUTPUT):
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data and "text/html" in data:
                del data[WIDGET_MIME]
                changed.append(i)
    if not widget_cells(nb):  # no view left: the state describes nothing (and pulls CDN scripts into the page)
        nb.metadata.pop(WIDGET_STATE, None)
    return sorted(set(changed))


class CurrentEnvKernelSpecManager(KernelSpecManager):
    """Resolve every kernel name to ipykernel running in this interpreter (as nbval's --nbval-current-env)."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())


class CurrentEnvKernelManager(KernelManager):
    def __init__(self, **kwargs):
        kwargs.setdefault("kernel_spec_manager", CurrentEnvKernelSpecManager())
        super().__init__(**kwargs)


def toc_notebooks() -> list[Path]:
    """The notebooks among the _toc.yml entries that exist, in reading order."""
    docnames = parse_toc_yaml(ROOT / "_toc.yml")  # the parser jupyter-book itself uses
    paths = [ROOT / f"{doc}.ipynb" for doc in docnames]
    return [p for p in paths if p.exists()]


def execute(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        kernel_manager_class=CurrentEnvKernelManager,  # the client owns the kernel and shuts it down
        timeout=CELL_TIMEOUT_S,
        record_timing=False,  # timing metadata would make every re-run a diff
        resources={"metadata": {"path": str(path.parent)}},  # chapters run from their own folder
    )
    name = os.path.relpath(path, ROOT)
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        print(f"FAILED {name}: not written back\n{err}", file=sys.stderr)
        return False
    seconds = time.perf_counter() - start
    keep_widget_fallbacks(nb)
    widgets = widget_cells(nb)
    if widgets:
        print(f"FAILED {name} ({seconds:.0f} s): not written back: cells {widgets} (0-based) output "
              "ipywidgets views (a progress bar? pass progress=False), which the book renders as noise; "
              f"a live widget needs a cell marked {IGNORE_OUTPUT} and a text/html fallback", file=sys.stderr)
        return False
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"ok     {name} ({seconds:.0f} s)")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in _toc.yml")
    args = parser.parse_args(argv)
    bad = [p for p in args.notebooks if p.suffix != ".ipynb" or not p.is_file()]
    if bad:  # why: a typo'd name was a FileNotFoundError traceback from nbformat
        what = "no such notebook" if bad[0].suffix == ".ipynb" else "not a notebook (.ipynb)"
        parser.exit(2, f"{parser.prog}: error: {bad[0]}: {what}; fix: pass chapter files such as "
                       "book/01_anatomy_and_world.ipynb\n")
    for warning in apply_notebook_env():
        print(f"warning: {warning}", file=sys.stderr)
    paths = [p.resolve() for p in args.notebooks] or toc_notebooks()
    if not paths:
        print("No notebooks to execute (none listed in _toc.yml exists).")
        return 0
    results = [execute(p) for p in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
