"""Re-execute the book's chapter notebooks in place, top to bottom, one fresh kernel each.

Usage: python tools/execute_notebooks.py [NOTEBOOK ...]
Without arguments: every notebook listed in _toc.yml. Run through `make execute`, which sets the same
environment (one thread, PYTHONHASHSEED=0, offline hubs) as `make test`, so nbval sees the same outputs.

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
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"ok     {name} ({time.perf_counter() - start:.0f} s)")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in _toc.yml")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or toc_notebooks()
    if not paths:
        print("No notebooks to execute (none listed in _toc.yml exists).")
        return 0
    results = [execute(p) for p in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
