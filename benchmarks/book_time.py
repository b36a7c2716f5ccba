"""Whole-book execution time: every chapter of _toc.yml, top to bottom, one fresh kernel each, on a copy.

Usage: python benchmarks/book_time.py [--chapters 03,07] [--gpu t4|a100 [--safeeraser FOLDER]] [--output PATH]

Each chapter runs as `tools/execute_notebooks.py` runs it (the same kernel: this interpreter; the same
environment, its NOTEBOOK_ENV: one thread, offline hubs, fixed hash seed, no progress bars), but on a
temporary copy of book/ (and of benchmarks/results/, which chapter 4 reads): the committed notebooks and
records are never rewritten. The package's cache (`MLUNLEARN_CACHE`: chapter 9's generated safety world,
chapter 11's explorer runs) is a new empty folder for each chapter, as on a fresh machine or in CI, so what
a chapter builds on its first run is timed. Per chapter it measures

- the wall time, kernel start to kernel stop, and
- the kernel's CPU time: after the last cell the kernel is asked for `resource.getrusage` of itself plus
  its waited-for children (user + system). Other processes on a shared machine stretch the wall time far
  more than the CPU time (which still moves some: caches and memory bandwidth are shared), so the CPU time
  is the headline on a CPU; on a GPU the wall time is (the CPU waits).

Ratios: each chapter's CPU time over the 5-minute chapter budget (book/conftest.py's BUDGET_S), the sum
over chapters over the 30-minute budget for the whole book in CI (issue 14; CI runs two chapters at a time,
so its wall time can be as little as half the sum). Results go to benchmarks/results/book_time.json with the machine
(cores, CPU model, torch, GPU), the date and the git commit, per chapter: `--chapters` replaces only the
entries it measures.

`--gpu t4` or `--gpu a100` runs the chapters' GPU path (on Colab: a GPU runtime), switched as each settings
cell's comments say: in chapters 1-8 `MODEL = "tiny"` and `DATA = "toyworld"` become MLLMU-Bench's vanilla
LLaVA-1.5-7B and MLLMU-Bench (4-bit, as those chapters load it off the tiny model), in chapter 9 LLaVA-1.5-7B
on SafeEraser's files (`--safeeraser FOLDER`: they are not on the hub), in chapter 10 `GPU = None` becomes
`GPU = "t4"` / `"a100"`. The hubs are left online (the weights and MLLMU-Bench download) and the entries are
stored under "gpu_t4" / "gpu_a100", beside the CPU ones.

On Colab (where `/content` exists) the chapters' first cell would pip-install the package from GitHub: in
the copy that line is a no-op, so what is timed is the chapter, run with the clone's installed package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from execute_notebooks import (  # noqa: E402  (the same kernel and environment as `make execute`)
    CELL_TIMEOUT_S, KERNEL_NAME, NOTEBOOK_ENV, CurrentEnvKernelManager, toc_notebooks)

import timing  # noqa: E402  benchmarks/timing.py (the script's folder is on sys.path): provenance()

CHAPTER_BUDGET_S = 5 * 60   # book/conftest.py's BUDGET_S: each chapter within 5 minutes on one core
BOOK_BUDGET_S = 30 * 60     # issue 14: the whole book within 30 minutes in CI
RESULTS = ROOT / "benchmarks" / "results" / "book_time.json"
CHAPTER = re.compile(r"^(\d\d)_\w+$")  # book/NN_name.ipynb

# Run in the kernel after the chapter's last cell: the kernel process's CPU time (user + system) and that of
# the children it waited for, its peak resident memory, and the GPU's peak allocation when torch used one.
PROBE = """\
import json as _json, resource as _resource, sys as _sys
_self = _resource.getrusage(_resource.RUSAGE_SELF)
_kids = _resource.getrusage(_resource.RUSAGE_CHILDREN)
_torch = _sys.modules.get("torch")
_gpu = _torch.cuda.max_memory_allocated() if _torch is not None and _torch.cuda.is_available() else None
print("BOOK_TIME_PROBE " + _json.dumps({"cpu_self_s": _self.ru_utime + _self.ru_stime,
                                       "cpu_children_s": _kids.ru_utime + _kids.ru_stime,
                                       "peak_rss_mib": _self.ru_maxrss / 1024,
                                       "peak_gpu_mib": None if _gpu is None else _gpu / 2**20}))
"""

# --gpu: the settings lines of a chapter's CPU path and what they become on a GPU, as the chapters' own
# comments say (chapters 1-8: MLLMU-Bench's vanilla 7B on MLLMU-Bench, in 4 bits; chapter 9: LLaVA-1.5-7B on
# SafeEraser's files, which are not on the hub: --safeeraser; chapters 10, 11: their GPU switch). A chapter needs one
# of the SWITCHES, the DATA lines follow; otherwise a one-line error before anything runs.
SWITCHES = [
    (re.compile(r'^MODEL = "tiny"(?=\s*(#|$))', re.M), 'MODEL = "mllmu-vanilla-7b"'),
    (re.compile(r'^MODEL = "tiny-safety"(?=\s*(#|$))', re.M), 'MODEL = "llava-hf/llava-1.5-7b-hf"'),
    (re.compile(r"^GPU = None(?=\s*(#|$))", re.M), 'GPU = "{gpu}"'),
]
DATA_SWITCHES = [
    (re.compile(r'^DATA = "toyworld"(?=\s*(#|$))', re.M), 'DATA = "mllmu-bench"'),
    (re.compile(r'^DATA = "toyworld-safety"(?=\s*(#|$))', re.M), 'DATA = "safeeraser:{safeeraser}"'),
]
ONLINE_ON_GPU = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Every chapter's first cell pip-installs the package from GitHub when it runs on Colab (`/content` exists).
# Timed from a clone, that would time pip and replace the clone's package: the line becomes a no-op.
INSTALL_LINE = re.compile(r"^(\s*)%pip install .*$", re.M)


class BookTimeError(Exception):
    """Bad input: printed as one line, exit status 2."""


def chapters(selected: str | None = None) -> list[Path]:
    """The chapter notebooks of _toc.yml (book/NN_*.ipynb) in reading order, or those whose number is listed
    in ``selected`` ("03,07")."""
    paths = [p for p in toc_notebooks() if p.parent.name == "book" and CHAPTER.match(p.stem)]
    if not selected:
        return paths
    by_number = {CHAPTER.match(p.stem).group(1): p for p in paths}
    wanted = [s.strip().zfill(2) for s in selected.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in by_number]
    if unknown or not wanted:
        raise BookTimeError(f"--chapters {selected!r}: no chapter {', '.join(unknown) or '(empty list)'} in "
                            f"_toc.yml; use numbers among {','.join(by_number)}")
    return [by_number[w] for w in wanted]


def switch_to_gpu(nb, gpu: str, name: str, safeeraser: str | None = None) -> None:
    """Rewrite the chapter's settings cell (the first code cell with a switch) to its GPU path, in the copy."""
    cell = next((c for c in nb.cells if c.cell_type == "code" and any(p.search(c.source) for p, _ in SWITCHES)),
                None)
    if cell is None:
        raise BookTimeError(f"{name} has no GPU switch book_time.py knows (a line 'MODEL = \"tiny\"' or "
                            "'GPU = None'); add its pattern to SWITCHES in benchmarks/book_time.py")
    if DATA_SWITCHES[1][0].search(cell.source) and not safeeraser:
        raise BookTimeError(f"{name} on a GPU needs SafeEraser's dataset folder (not on the hub): pass "
                            "--safeeraser /path/to/SafeEraser/dataset, or leave the chapter out with --chapters")
    for pattern, replacement in SWITCHES + DATA_SWITCHES:
        cell.source = pattern.sub(replacement.format(gpu=gpu, safeeraser=safeeraser), cell.source, count=1)


def prepare(nb, gpu: str | None, name: str, safeeraser: str | None = None):
    """The notebook as timed: the Colab install line a no-op, the GPU switch set (``gpu``), the probe last."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = INSTALL_LINE.sub(r"\1pass  # book_time.py: the package is installed already", cell.source)
    if gpu:
        switch_to_gpu(nb, gpu, name, safeeraser)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    return nb


def run_chapter(path: Path, gpu: str | None = None, safeeraser: str | None = None) -> dict:
    """Execute a copy of the chapter in a fresh kernel; its wall time and the kernel's CPU time (seconds)."""
    nb = prepare(nbformat.read(path, as_version=4), gpu, path.name, safeeraser)
    with tempfile.TemporaryDirectory(prefix="book_time_") as tmp:
        # the chapter's folder and what it reads beside it (`../benchmarks/results/`), copied
        book = Path(tmp, "book")
        shutil.copytree(path.parent, book, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
        shutil.copytree(ROOT / "benchmarks" / "results", Path(tmp, "benchmarks", "results"))
        client = NotebookClient(nb, kernel_name=KERNEL_NAME, kernel_manager_class=CurrentEnvKernelManager,
                                timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(book)}})
        saved = os.environ.get("MLUNLEARN_CACHE")
        os.environ["MLUNLEARN_CACHE"] = str(Path(tmp, "cache"))  # the kernel starts with this environment
        try:
            start = time.perf_counter()
            client.execute()
            wall = time.perf_counter() - start
        finally:
            if saved is None:
                del os.environ["MLUNLEARN_CACHE"]
            else:
                os.environ["MLUNLEARN_CACHE"] = saved
    lines = [line for out in nb.cells[-1].get("outputs", []) for line in out.get("text", "").splitlines()
             if line.startswith("BOOK_TIME_PROBE ")]
    probe = json.loads(lines[-1].split(" ", 1)[1])
    return {"wall_s": round(wall, 1), "cpu_s": round(probe["cpu_self_s"] + probe["cpu_children_s"], 1),
            "cpu_children_s": round(probe["cpu_children_s"], 1), "peak_rss_mib": round(probe["peak_rss_mib"]),
            "peak_gpu_mib": None if probe["peak_gpu_mib"] is None else round(probe["peak_gpu_mib"])}


def table(entries: dict[str, dict], names: list[str]) -> str:
    """The per-chapter table and the total, as book_time.py prints them."""
    rows = [f"{'chapter':<28} {'CPU min':>8} {'wall min':>9} {'CPU / 5 min':>12}"]
    for name in names:
        e = entries[name]
        rows.append(f"{name:<28} {e['cpu_s'] / 60:8.1f} {e['wall_s'] / 60:9.1f} {e['cpu_s'] / CHAPTER_BUDGET_S:12.2f}"
                    + ("  over budget" if e["cpu_s"] > CHAPTER_BUDGET_S else ""))
    cpu, wall = sum(entries[n]["cpu_s"] for n in names), sum(entries[n]["wall_s"] for n in names)
    rows.append(f"{'whole book':<28} {cpu / 60:8.1f} {wall / 60:9.1f}   CPU / 30 min: {cpu / BOOK_BUDGET_S:.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = timing.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapters", help="comma-separated chapter numbers, e.g. 03,07 (default: all)")
    parser.add_argument("--gpu", choices=["t4", "a100"], help="run the chapters' GPU path (see above)")
    parser.add_argument("--safeeraser", metavar="FOLDER", help="with --gpu: SafeEraser's dataset folder (chapter 9)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default: {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    try:
        paths = chapters(args.chapters)
        if args.gpu:  # check every chapter can be switched before spending hours on the first ones
            for p in paths:
                switch_to_gpu(nbformat.read(p, as_version=4), args.gpu, p.name, args.safeeraser)
    except BookTimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in NOTEBOOK_ENV.items():
        if args.gpu and key in ONLINE_ON_GPU:
            continue
        if os.environ.setdefault(key, value) != value:
            print(f"warning: {key}={os.environ[key]} from the environment (make test uses {value})", file=sys.stderr)

    key = f"gpu_{args.gpu}" if args.gpu else "cpu"
    measured, failed = [], []
    for path in paths:
        name = path.stem
        print(f"running {name} ...", flush=True)
        # date, commit (+dirty), machine: per chapter, as the shared working tree may change between chapters
        info = {k.removeprefix("measured_"): v for k, v in timing.provenance(code=("mlunlearn", "book")).items()}
        try:
            entry = run_chapter(path, args.gpu, args.safeeraser)
        except CellExecutionError as err:
            print(f"FAILED {name}: not recorded\n{err}", file=sys.stderr)
            failed.append(name)
            continue
        measured.append(name)
        print(f"  {name}: CPU {entry['cpu_s']:.0f} s, wall {entry['wall_s']:.0f} s", flush=True)
        # after each chapter, into the file as it is now (a crash keeps the chapters done; another run's
        # entries written meanwhile are kept): only this chapter's entry changes
        results = json.loads(args.output.read_text()) if args.output.is_file() else {}
        entries = {**results.get(key, {}), name: {**entry, **info}}
        results[key] = dict(sorted(entries.items()))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    entries = (json.loads(args.output.read_text()) if args.output.is_file() else {}).get(key, {})
    names = [p.stem for p in chapters() if p.stem in entries]
    if names:
        print(table(entries, names))
        if set(names) - set(measured):
            print(f"(from earlier runs in {args.output.name}: {', '.join(sorted(set(names) - set(measured)))})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
