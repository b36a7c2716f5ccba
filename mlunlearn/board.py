"""The leaderboard of one or more ``mlunlearn bench`` folders, read back (book chapter 10).

    from mlunlearn.board import merged_board, ranks
    board = merged_board(["bench/ga-npo_forget5", "bench/po-kl_forget5", "bench/ga-npo_forget15"])
    ranks(board, "forget_cls_img", lower_is_better=True)      # methods x forget sizes

A grid too long for one process is run as several bench folders (disjoint method subsets, or forget sizes;
each its own ``bench.json``; one process each, on as many cores). Each folder evaluates the vanilla model
once per forget size it holds; :func:`merged_board` checks that evaluations of the same forget size agree
to the last digit (they are the same computation) and keeps one, and refuses a cell that two folders both
hold. :func:`run_board` runs a grid as bench does, and a 7B one in 4 bits (bench has no option for it).

The chapter loads a committed grid instead of running it; :func:`recheck_grid` proves that a committed
grid is what ``mlunlearn bench`` computes here: it copies the folder, deletes one cell, lets bench resume
it, and compares every file of the copy with the committed one byte for byte (``run.json`` without its
wall-clock timings). ``tools/recheck_records.py --grids`` runs it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from mlunlearn.bench import (BENCH_FILE, BOARD_FILE, MEAN_FILE, RUNS, Cell, GridError, GridSpec, leaderboard,
                             run_grid)

__all__ = ["run_board", "open_spec", "open_grid", "merged_board", "missing_cells", "bench_command", "cell_seconds",
           "ranks", "ENVIRONMENT_FILE", "write_environment", "check_environment", "compare_folders", "first_cell",
           "recheck_grid", "TIMING_KEYS", "is_timing"]

ENVIRONMENT_FILE = "environment.json"  # the versions a committed grid was computed with (written beside it)
KEY = ["method", "forget", "seed"]
# run.json entries that are wall-clock measurements, not results: left out of the byte comparison.
# (bench's ``eval_seconds``, ``mia_seconds``, ... are every key ending in ``_seconds``; the Trainer's last log entry
# holds the other three.)
TIMING_KEYS = ("seconds", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def open_spec(folder) -> GridSpec:
    """The :class:`GridSpec` a bench folder was run with, rebuilt from its ``bench.json`` (and checked to
    write the same ``bench.json`` back, so a resume with it is a resume, not another grid)."""
    folder = Path(folder)
    path = folder / BENCH_FILE
    if not path.is_file():
        raise GridError(f"{folder} has no {BENCH_FILE}: it is not a bench folder; give a folder written by "
                        "`mlunlearn bench --output`")
    stored = json.loads(path.read_text())
    extras = {}  # the per-cell extra evaluations (membership inference, relearning, benign questions)
    if "mia" in stored:
        extras["mia"] = bool(stored["mia"])
    for name, options in (("relearn", {"steps": "relearn_steps", "fraction": "relearn_fraction"}),
                          ("benign", {"limit": "benign_limit"})):
        if name in stored:
            extras[name] = bool(stored[name])
            extras.update({field: stored[name][key] for key, field in options.items() if stored[name]})
    spec = GridSpec(model=stored["model"], data=stored["data"], methods=tuple(stored["methods"]),
                    forget=tuple(stored["forget"]), seeds=tuple(stored["seeds"]), settings=stored["settings"],
                    limit=stored["eval"]["limit"], batch_size=stored["eval"]["batch_size"],
                    max_new_tokens=stored["eval"]["max_new_tokens"], **extras)
    if spec.to_json() != stored:
        raise GridError(f"{path} does not describe a grid this mlunlearn writes (its fields differ from "
                        "GridSpec's); rerun the grid with this version")
    return spec


def missing_cells(folder, spec: GridSpec | None = None) -> list:
    """The cells of the folder's grid without a ``result.json`` (not run yet, or interrupted)."""
    folder = Path(folder)
    spec = spec or open_spec(folder)
    return [c for c in spec.cells() if not (folder / c.folder / "result.json").is_file()]


def bench_command(spec: GridSpec, output) -> str:
    """The ``mlunlearn bench`` command line that runs (or resumes) ``spec`` into ``output``."""
    parts = ["mlunlearn bench", f"--model {spec.model}", f"--data {spec.data}",
             f"--methods {','.join(spec.methods)}"]
    if not spec.safety:
        parts.append(f"--forget {','.join(map(str, spec.forget))}")
    parts.append(f"--seeds {','.join(map(str, spec.seeds))}")
    parts += [f"--set {k}={v}" for k, v in sorted(spec.settings.items())]
    defaults = GridSpec()
    parts += [f"--{name.replace('_', '-')} {getattr(spec, name)}" for name in ("limit", "batch_size", "max_new_tokens")
              if getattr(spec, name) != getattr(defaults, name)]
    return " ".join(parts + [f"--output {output}"])


def open_grid(folder, complete: bool = True):
    """``(spec, board)`` of one bench folder: its spec and :func:`mlunlearn.bench.leaderboard` (one row per
    finished cell). With ``complete`` a grid with a missing cell is a :class:`GridError` naming the cell and
    the command that finishes it."""
    folder = Path(folder)
    spec = open_spec(folder)
    missing = missing_cells(folder, spec)
    if complete and missing:
        raise GridError(f"{folder}: {len(missing)} cell(s) not finished ({', '.join(map(str, missing[:3]))}"
                        f"{' ...' if len(missing) > 3 else ''}); finish them with: {bench_command(spec, folder)}")
    return spec, leaderboard(folder, spec)


def merged_board(folders, complete: bool = True):
    """The leaderboards of several bench folders as one (vanilla rows first, then each folder's methods in
    its order). The folders must share model, data and evaluation; each vanilla evaluation they repeat must
    be equal in every column (the same computation), and no other cell may be in two folders."""
    import pandas as pd

    specs, boards = [], []
    for folder in folders:
        spec, board = open_grid(folder, complete)
        specs.append(spec)
        boards.append(board)
    if not boards:
        raise GridError("no bench folder given; pass at least one folder written by `mlunlearn bench`")
    shared = ("model", "data", "limit", "batch_size", "max_new_tokens")
    for folder, spec in zip(folders[1:], specs[1:]):
        differ = [f"{k}: {getattr(specs[0], k)!r} vs {getattr(spec, k)!r}" for k in shared
                  if getattr(spec, k) != getattr(specs[0], k)]
        if differ:
            raise GridError(f"{folder} is another benchmark than {folders[0]} ({'; '.join(differ)}); merge "
                            "grids of one model, data and evaluation")
    both = pd.concat(boards, ignore_index=True)
    vanilla = both[both["method"] == "vanilla"]
    for forget, rows in vanilla.groupby("forget"):
        values = rows.drop(columns=KEY).astype(float)
        if not (values.nunique(dropna=False) <= 1).all():
            raise GridError(f"the folders' vanilla evaluations at forget {forget} differ; they were not computed "
                            "by the same code and environment, so their cells cannot be compared")
    methods = both[both["method"] != "vanilla"]
    twice = methods[methods.duplicated(KEY, keep=False)]
    if len(twice):
        method, forget, seed = twice.iloc[0][KEY]
        cell = Cell(str(method), int(forget), int(seed))
        raise GridError(f"cell {cell} is in more than one folder; merge grids over disjoint methods")
    vanilla = vanilla.drop_duplicates(KEY).sort_values("forget", kind="stable")
    board = pd.concat([vanilla, methods], ignore_index=True)
    board["seed"] = board["seed"].astype("Int64")
    return board


def cell_seconds(folder, spec: GridSpec | None = None):
    """Wall-clock seconds of each finished cell, from its ``run.json``: unlearning (the engine's
    ``seconds.total``; 0 for vanilla) and evaluation (``bench.eval_seconds``). On a shared machine these are
    not CPU time."""
    import pandas as pd

    folder = Path(folder)
    spec = spec or open_spec(folder)
    rows = []
    for cell in spec.cells():
        path = folder / cell.folder / "run.json"
        if not path.is_file() or not (folder / cell.folder / "result.json").is_file():
            continue
        run = json.loads(path.read_text())
        rows.append({"method": cell.method, "forget": cell.forget, "seed": cell.seed,
                     "unlearn s": 0.0 if cell.method == "vanilla" else _train_seconds(run),
                     "eval s": run["bench"]["eval_seconds"]})
    return pd.DataFrame(rows)


def _train_seconds(run: dict) -> float:
    """The engine's wall-clock ``seconds.total`` of a run (setup, training and saving)."""
    return float(run["seconds"]["total"])


def ranks(board, metric: str, lower_is_better: bool):
    """Each method's rank (1 = best) on ``metric`` at each forget size, over the methods (vanilla left
    out; seeds averaged first). Ties share the best rank of the tied ("min")."""
    means = board[board["method"] != "vanilla"].groupby(["method", "forget"], sort=False)[metric].mean()
    wide = means.unstack("forget")
    wide = wide[sorted(wide.columns)]
    order = list(dict.fromkeys(board.loc[board["method"] != "vanilla", "method"]))
    return wide.rank(ascending=lower_is_better, method="min").astype(int).loc[order]


# -------------------------------------------------------------------------------------- running

def run_board(spec: GridSpec, output, quantization: str | None = None, **kwargs):
    """:func:`mlunlearn.bench.run_grid` (same arguments, same files) with ``quantization`` set on the spec:
    ``"4bit"`` loads every copy of a LLaVA-1.5 model in 4 bits (a 16 GB T4), as ``mlunlearn bench
    --quantization 4bit`` does; bench frees the model before unlearning before each cell loads its own copy.
    The tiny models run in full precision (``quantization`` must then be None)."""
    import dataclasses

    from mlunlearn import bench

    if quantization is not None and spec.model in bench.TINY_MODELS:
        raise GridError(f"quantization={quantization!r} is for a LLaVA-1.5 model on a GPU; the tiny model "
                        f"{spec.model!r} runs in full precision (drop quantization)")
    if quantization is not None:
        spec = dataclasses.replace(spec, quantization=quantization)
    return bench.run_grid(spec, output, **kwargs)


# ------------------------------------------------------------------------------------- environment

def write_environment(folder) -> Path:
    """Write the versions this grid is computed with (``records.environment()``) into the folder."""
    from mlunlearn.records import environment
    from mlunlearn.utils import write_atomic

    return write_atomic(Path(folder) / ENVIRONMENT_FILE, json.dumps(environment(), indent=1) + "\n")


def check_environment(folder) -> None:
    """Raise :class:`mlunlearn.records.EnvironmentMismatch` unless the folder's ``environment.json`` names
    the running mlunlearn and torch (another torch moves last digits: a byte comparison would fail)."""
    from mlunlearn.records import EnvironmentMismatch, check_environment as check

    path = Path(folder) / ENVIRONMENT_FILE
    if not path.is_file():
        raise EnvironmentMismatch(f"{path} is missing: the grid does not say which versions computed it")
    check(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------- recheck

def is_timing(key: str) -> bool:
    """A ``run.json`` key that holds a wall-clock measurement (:data:`TIMING_KEYS`, or ``*_seconds``)."""
    return key in TIMING_KEYS or key.endswith("_seconds")


def _without_timings(obj):
    """``obj`` without its timings (:func:`is_timing`), and with the package's own folder (where the tiny model's
    weights are read from: ``run.json``'s ``model``) written as ``<mlunlearn>``, so a clone elsewhere
    compares equal."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(_PACKAGE):
        return "<mlunlearn>" + obj[len(_PACKAGE):]
    return obj


_PACKAGE = str(Path(__file__).resolve().parent)


def _files(folder: Path) -> list:
    skip = {ENVIRONMENT_FILE}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in skip and not p.name.startswith("."))


def compare_folders(stored, recomputed) -> list:
    """Every difference between two bench folders: a file in one only, or a file whose bytes differ
    (``run.json``: its JSON without timings (:func:`is_timing`), so wall-clock times do not count, and with the
    package folder written as ``<mlunlearn>``)."""
    stored, recomputed = Path(stored), Path(recomputed)
    a, b = _files(stored), _files(recomputed)
    out = [f"{name}: only in {stored}" for name in a if name not in b]
    out += [f"{name}: only in the recomputed folder" for name in b if name not in a]
    for name in (n for n in a if n in b):
        old, new = (stored / name).read_bytes(), (recomputed / name).read_bytes()
        if Path(name).name == "run.json":
            old, new = (json.dumps(_without_timings(json.loads(x)), sort_keys=True) for x in (old, new))
        if old != new:
            out.append(f"{name}: differs")
    return out


def first_cell(folder) -> str:
    """The grid's first unlearning cell as ``method/forget<f>_seed<s>`` (the cheapest of its method's)."""
    spec = open_spec(folder)
    return next(c for c in spec.cells() if c.method != "vanilla").folder.split("/", 1)[1]


def recheck_grid(folder, cell: str | None = None, workdir=None, log=print) -> list:
    """Recompute one cell of a committed bench folder and compare: copy the folder (into ``workdir``, a
    temporary folder by default), delete the cell's folder (``cell`` as ``"ga/forget5_seed0"``; default:
    the last method cell of the grid), resume the grid with bench (which recomputes that cell only and
    rewrites the leaderboards and the figure), and return :func:`compare_folders` of the two: an empty list
    when the recomputed bytes equal the committed ones."""
    folder = Path(folder)
    check_environment(folder)
    spec = open_spec(folder)
    missing = missing_cells(folder, spec)
    if missing:
        raise GridError(f"{folder} is not a finished grid ({missing[0]} has no result); finish it with: "
                        f"{bench_command(spec, folder)}")
    cells = [c for c in spec.cells() if c.method != "vanilla"]
    chosen = cells[-1] if cell is None else next((c for c in spec.cells() if c.folder == f"{RUNS}/{cell}"), None)
    if chosen is None:
        raise GridError(f"no cell {cell!r} in {folder}; give one as method/forget<f>_seed<s>, e.g. "
                        f"{cells[0].folder.split('/', 1)[1]}")
    owned = tempfile.mkdtemp(prefix="recheck_grid_") if workdir is None else None
    copy = Path(workdir or owned) / folder.name
    try:
        shutil.copytree(folder, copy)
        shutil.rmtree(copy / chosen.folder)
        for name in (BOARD_FILE, MEAN_FILE):
            (copy / name).unlink()
        if log is not None:
            log(f"recompute {chosen} of {folder} in {copy}")
        run_grid(spec, copy, progress=False, log=log)
        return compare_folders(folder, copy)
    finally:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
