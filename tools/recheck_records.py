"""Recompute the book's run records from scratch and fail unless they equal the stored ones exactly.

Usage: python tools/recheck_records.py [NAME ...] [--all] [--folder book/records]

A run record (``mlunlearn/records.py``) is a JSON file with a key (everything the computation depends on)
and the value the code returned for it; chapters load records instead of rerunning their heavy grids.
This tool reruns records from their keys alone, in a fresh process, and compares every stored value with
the recomputed one exactly (no tolerance: the chapters run on one CPU thread, bit-reproducibly).

Default: a subset (chapter 2's grid and its method comparison; chapter 3's unlearning runs, with the
projector monitor and measurements; one learning rate of chapter 4's sweep, every variant, and one seed
of its aggressive-rate comparison, with the projector monitor; the baseline scorecards chapters 5 and 6
share), about 25 minutes of one core, run two at a time by ``make test`` (``--jobs 2``). It also reads
every record in the folder and checks its key names this mlunlearn and torch. ``--all`` reruns every
record (chapter 4's: about 12 minutes more; chapter 9's safety runs,
``09_tiny-safety_*``: about 10 minutes each). Exit status 1 on any difference, with a diff of what differs.

``--grids`` also rechecks the bench folders in the records folder (chapter 10's ``10_tiny_bench_*``, each a
``mlunlearn bench`` grid with a ``bench.json``): for each it copies the folder, deletes one cell (``--cell
METHOD/forget<F>_seed<S>``; default: the grid's first unlearning cell), lets bench resume it, and compares every
file of the copy with the committed folder byte for byte (``run.json`` without its wall-clock timings;
:func:`mlunlearn.board.recheck_grid`). About half a minute of CPU per folder; not in the default set. ``--grids``
alone rechecks only the grids (add record names or ``--all`` for records too).
"""

from __future__ import annotations

import os

# The environment the records were made in (as `make test` / tools/execute_notebooks.py), set before
# torch is imported: one thread, so float sums run in the same order.
for _name, _value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                      "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "book" / "records"
# Rechecked by default: chapter 2's learning-rate grid (18 short runs, probes only), chapter 4's sweep at
# the rate where its variants differ most, chapter 2's method comparison (GA, GradDiff, KL, NPO, PO, PO+PD:
# 6 runs, 7 full scorecards, about 6 minutes alone) and chapter 3's runs (7 runs with the projector monitor,
# 8 full scorecards and measurements, about 4); the longest first. Left out to keep CI within 30 minutes
# (it also runs the LLaVA-1.5 path on the 7B-shaped model and the browser test), --all rechecks them:
# chapter 4's aggressive comparison, and the baselines chapters 5 and 6 share (vanilla, GA, GradDiff, NPO:
# the same methods and code path as chapter 2's comparison, at other settings).
DEFAULT = ["02_tiny_compare", "03_tiny_compare", "02_tiny_sweep", "04_tiny_sweep_lr3e-03"]


def describe(key: dict) -> str:
    runs = len(key.get("methods", {})) * len(key.get("lrs", [None])) + bool(key.get("vanilla"))
    seed = key.get("config", {}).get("seed")
    return f"{key.get('task')}, {runs} run(s), seed {seed}, model {key.get('model')}"


def _recheck_one(folder: Path, name: str):
    """Recompute one record in this (worker) process: (name, differences, seconds)."""
    import torch

    from mlunlearn import records

    torch.set_num_threads(1)
    t = time.perf_counter()
    return name, records.recheck(folder / f"{name}.json"), time.perf_counter() - t


def grid_folders(folder: Path) -> list[Path]:
    """The bench folders (a ``bench.json`` inside) among the records."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "bench.json").is_file())


def _recheck_grid(path: Path, cell: str | None):
    """Delete one cell of a committed bench folder's copy, resume it, compare: (name, differences, seconds)."""
    import torch

    from mlunlearn.bench import GridError
    from mlunlearn.board import first_cell, recheck_grid
    from mlunlearn.records import EnvironmentMismatch

    torch.set_num_threads(1)
    t = time.perf_counter()
    try:
        chosen = cell or first_cell(path)
        differences = recheck_grid(path, chosen, log=None)
    except (GridError, EnvironmentMismatch) as err:
        return f"{path.name} ({cell or 'first cell'})", [str(err)], time.perf_counter() - t
    return f"{path.name} ({chosen})", differences, time.perf_counter() - t


def _report(name: str, differences: list, seconds: float, max_diffs: int, failed: list) -> None:
    if differences:
        failed.append(name)
        print(f"FAIL   {name}: {len(differences)} value(s) differ from the record:")
        for line in differences[:max_diffs]:
            print(f"         {line}")
        if len(differences) > max_diffs:
            print(f"         ... and {len(differences) - max_diffs} more")
    else:
        print(f"ok     {name}: recomputed values equal the record exactly ({seconds:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"records to rerun (default: {' '.join(DEFAULT)})")
    parser.add_argument("--all", action="store_true", help="rerun every record in the folder")
    parser.add_argument("--folder", type=Path, default=FOLDER, help="default: book/records")
    parser.add_argument("--max-diffs", type=int, default=20, help="differences shown per record")
    parser.add_argument("--jobs", type=int, default=1,
                        help="records recomputed at once, each in its own one-thread process (default: 1)")
    parser.add_argument("--grids", action="store_true",
                        help="also recheck the bench folders (chapter 10): one cell of each deleted, resumed and "
                             "compared byte for byte")
    parser.add_argument("--cell", default=None,
                        help="with --grids: the cell to recompute, as METHOD/forget<F>_seed<S> (default: each "
                             "grid's first unlearning cell)")
    args = parser.parse_args(argv)
    # why here: a typo must fail in one line, not after minutes of rechecking (--jobs 0 ran everything serially)
    if args.jobs < 1:
        parser.exit(2, f"{parser.prog}: error: --jobs {args.jobs}: must be at least 1\n")
    if not args.folder.is_dir():
        parser.exit(2, f"{parser.prog}: error: --folder {args.folder}: no such folder; fix: pass the folder that "
                       "holds the records (default: book/records)\n")

    import torch

    from mlunlearn import records

    torch.set_num_threads(1)
    folder = args.folder
    paths = sorted(folder.glob("*.json"))
    failed = []

    # 1. every record: readable, and made with the versions running here (cheap).
    keys = {}
    for path in paths:
        try:
            key = records.read_record(path)["key"]
            records.check_environment(key)
            keys[path.stem] = key
        except (ValueError, records.EnvironmentMismatch) as err:
            print(f"FAIL   {path.name}: {err}")
            failed.append(path.stem)
    print(f"{len(paths)} records in {os.path.relpath(folder)}, {len(paths) - len(failed)} readable and "
          "made with this mlunlearn and torch")

    # 2. the chosen ones: recomputed from their keys and compared exactly.
    # --grids alone rechecks the grids only; with names or --all, those records too
    names = [p.stem for p in paths] if args.all else (args.names or ([] if args.grids else DEFAULT))
    missing = [n for n in names if n not in keys and n not in failed]
    for name in missing:
        print(f"FAIL   {name}: no record {name}.json in {os.path.relpath(folder)}")
    start = time.perf_counter()
    chosen = [n for n in names if n in keys]
    for name in chosen:
        print(f"rerun  {name} ({describe(keys[name])}) ...", flush=True)
    if args.jobs > 1 and len(chosen) > 1:  # one fresh process per record, args.jobs at a time
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_recheck_one, [folder] * len(chosen), chosen)
            for name, differences, seconds in results:
                _report(name, differences, seconds, args.max_diffs, failed)
    else:
        context = records.Context()
        for name in chosen:
            t = time.perf_counter()
            differences = records.recheck(folder / f"{name}.json", context)
            _report(name, differences, time.perf_counter() - t, args.max_diffs, failed)
    rerun = len([n for n in names if n in keys])
    print(f"rechecked {rerun} of {len(paths)} records in {time.perf_counter() - start:.0f} s"
          + ("" if args.all else " (pass --all to rerun every record)"))

    # 3. with --grids: the bench folders, one resumed cell each, compared byte for byte.
    if args.grids:
        grids = grid_folders(folder)
        start = time.perf_counter()
        for path in grids:
            print(f"resume {path.name}: {args.cell or 'its first unlearning cell'} deleted and recomputed ...",
                  flush=True)
        if args.jobs > 1 and len(grids) > 1:
            import concurrent.futures
            import multiprocessing

            with concurrent.futures.ProcessPoolExecutor(args.jobs,
                                                        mp_context=multiprocessing.get_context("spawn")) as pool:
                for name, differences, seconds in pool.map(_recheck_grid, grids, [args.cell] * len(grids)):
                    _report(name, differences, seconds, args.max_diffs, failed)
        else:
            for path in grids:
                _report(*_recheck_grid(path, args.cell), args.max_diffs, failed)
        print(f"rechecked {len(grids)} bench folder(s) in {time.perf_counter() - start:.0f} s")
    if failed or missing:
        print(f"FAILED: {', '.join(failed + missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
