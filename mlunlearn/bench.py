"""A grid of unlearning runs, each evaluated, resumable: ``mlunlearn bench``.

    from mlunlearn.bench import GridSpec, run_grid
    spec = GridSpec(model="tiny", data="toyworld", methods=("ga", "npo"), forget=(5, 10), seeds=(0, 1))
    board = run_grid(spec, "bench/ga-npo")          # the leaderboard, one row per cell

The grid is methods × forget sizes × seeds (a safety benchmark has one forget request, its train file),
plus one ``vanilla`` evaluation per forget size (the model before unlearning; seed-independent). Each cell
unlearns a fresh copy of the model (no weights are saved unless ``keep_models``), evaluates it (MLLMU-Bench:
:func:`mlunlearn.eval.evaluate`; safety: :func:`mlunlearn.eval.safety.evaluate_safety` with the rule judge)
and writes, atomically, ``runs/<method>/forget<f>_seed<s>/run.json`` (the engine's run record) and then
``result.json`` (the JSON ``mlunlearn eval`` writes). A cell whose ``result.json`` exists is done: after a
crash or ``kill`` the same call skips it and computes only the rest. ``bench.json`` holds the grid's spec;
another spec in the same folder is refused (use a new folder or ``overwrite``).

"Does it stay forgotten?" (issue 13), on MLLMU-Bench-style data, each on by default (cheap on the tiny model:
about 1 s, 5-10 s and 10-20 s per cell) and written before ``result.json``:

- ``mia.json`` (``mia``): membership inference, forget people vs held-out people never trained on
  (:mod:`mlunlearn.eval.mia`: LOSS, zlib, Min-k%, Min-k%++ AUCs); only where the data has held-out people
  (the synthetic world; a folder with a ``Holdout_Data`` config), never the hub MLLMU-Bench;
- ``relearn.json`` (``relearn``): the relearning attack (:mod:`mlunlearn.relearn`): ``relearn_steps`` steps
  of NLL descent on ``relearn_fraction`` of the forget people, at the cell's learning rate, then the
  protocol's forget mode on the others, before and after (the vanilla row relearns a copy of the vanilla);
- ``benign.json`` (``benign``): :func:`mlunlearn.eval.evaluate_benign`, ``benign_limit`` questions per image
  group and forget membership, sampled over people, views and questions.

After the grid: ``leaderboard.csv`` (one row per cell, the headline metrics as columns: the evaluation's,
then ``mia_*_auc``, ``privleak``, ``heldback_forget_*`` / ``relearned_forget_*`` and ``benign_*``),
``leaderboard_mean.csv`` (mean and std over seeds), ``tradeoff.png`` (forget vs retain per method) and
``benign.png`` (benign accuracy and refusal rate per method, on the forget people's images and the others).
Evaluations use seed 0 for their own random choices (the test views), so every cell answers the same
questions; the seed of a cell is the unlearning run's.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlunlearn.methods import MethodError

__all__ = ["GridError", "GridSpec", "Cell", "run_grid", "leaderboard", "mean_leaderboard", "plot_tradeoff",
           "plot_benign", "mllmu_headline", "safety_headline", "extras_headline", "parse_list", "resolve_settings"]

FORGET_SIZES = (5, 10, 15)
SAFETY_FORGET = "train"  # a safety benchmark's one forget request: every harmful item of its train file
TINY_MODELS = ("tiny", "tiny-safety")  # small enough to load once and deep-copy for each cell
# Engine settings a grid sets itself: the seed of a cell comes from the seed list, a cell resumes as a whole.
GRID_OWNED = {"seed": "give the seeds with --seeds (e.g. --seeds 0,1)",
              "resume": "a bench resumes by itself: rerun the same command and finished cells are skipped"}
# MLLMU-Bench's modes as leaderboard column prefixes.
MODE_PREFIX = {"forget": "forget", "test": "test", "retain_shared": "retain", "retain_celebrity": "celebrity"}
BENCH_FILE, BOARD_FILE, MEAN_FILE, FIGURE_FILE, RUNS = ("bench.json", "leaderboard.csv", "leaderboard_mean.csv",
                                                        "tradeoff.png", "runs")
BENIGN_FIGURE = "benign.png"
WRITTEN = (BENCH_FILE, BOARD_FILE, MEAN_FILE, FIGURE_FILE, BENIGN_FIGURE, RUNS)  # what a grid writes in its folder
MIA_FILE, RELEARN_FILE, BENIGN_FILE = "mia.json", "relearn.json", "benign.json"  # a cell's, beside result.json
BENIGN_LIMIT = 40  # benign questions per (image group, in the forget set) cell


class GridError(MethodError):
    """A grid that cannot run (a bad list, setting or folder); the message is one line and names the fix."""


# ----------------------------------------------------------------------------------------- the spec

def parse_list(text, kind: str, option: str) -> tuple:
    """``"ga,npo"`` → ``("ga", "npo")``; ``kind`` "str" or "int". Empty items, duplicates and (for "int")
    non-integers are a :class:`GridError` naming ``option``."""
    items = [str(t).strip() for t in (text.split(",") if isinstance(text, str) else text)]
    example = f"{option} {'ga,npo' if kind == 'str' else '5,10' if option == '--forget' else '0,1'}"
    if not items or any(not t for t in items):
        raise GridError(f"{option} {text!r} has an empty item; give a comma-separated list, e.g. {example}")
    if kind == "int":
        bad = [t for t in items if not t.lstrip("-").isdigit()]
        if bad:
            raise GridError(f"{option} {text!r}: {bad[0]!r} is not an integer; give integers separated by commas, "
                            f"e.g. {example}")
        items = [int(t) for t in items]
    dup = sorted({str(t) for t in items if items.count(t) > 1})
    if dup:
        raise GridError(f"{option} {text!r} lists {', '.join(dup)} twice; give each once")
    return tuple(items)


@dataclass
class GridSpec:
    """What a grid runs; written to ``bench.json``. Two grids with equal specs are the same grid.

    ``forget``: forget percentages (MLLMU-Bench: 5, 10, 15); ``None`` = 5, or the train file of a safety
    benchmark. ``settings``: ``{key: value}`` as ``--set`` gives them (strings or values): an engine
    setting (``lr``, ``max_steps``, ...) for every method, ``METHOD.KEY`` for one method, and a bare
    hyper-parameter key for every method when each of them takes it. ``limit``, ``batch_size`` and
    ``max_new_tokens`` are the evaluation's options (as in ``mlunlearn eval``).

    ``mia``, ``relearn``, ``benign``: the extra evaluations of each cell (see the module). ``None`` (the
    default): on wherever they apply (MLLMU-Bench-style data; ``mia`` only with held-out people); ``True``
    where they do not apply is a :class:`GridError`; ``False``: off. ``relearn_steps``,
    ``relearn_fraction`` and ``benign_limit`` configure them.
    """

    model: str = "tiny"
    data: str = "toyworld"
    methods: tuple = ("ga", "npo")
    forget: tuple | None = None
    seeds: tuple = (0,)
    settings: dict = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 50
    mia: bool | None = None
    relearn: bool | None = None
    benign: bool | None = None
    relearn_steps: int = 10
    relearn_fraction: float = 0.2
    benign_limit: int = BENIGN_LIMIT
    quantization: str | None = None  # "4bit": every cell's model loads in 4 bits (a 7B grid on a T4)

    def __post_init__(self):
        from mlunlearn.benchmarks.safety import is_safety_source
        from mlunlearn.methods import METHODS

        self.methods = parse_list(self.methods, "str", "--methods")
        if "vanilla" in self.methods:
            raise GridError("--methods: 'vanilla' is not a method; every grid evaluates the model before "
                            "unlearning as its vanilla row already")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise GridError(f"--methods: unknown method {unknown[0]!r}; registered: {', '.join(sorted(METHODS))} "
                            "(see `mlunlearn methods`)")
        self.seeds = parse_list(self.seeds, "int", "--seeds")
        bad = [s for s in self.seeds if not 0 <= s < 2**32]
        if bad:
            raise GridError(f"--seeds: {bad[0]} is not a seed; use integers between 0 and 2**32 - 1")
        if is_safety_source(self.data):
            if self.forget not in (None, (SAFETY_FORGET,), [SAFETY_FORGET], SAFETY_FORGET):
                raise GridError(f"--forget does not apply to --data {self.data}: a safety benchmark has no forget "
                                "percentages (a run forgets every harmful item of its train file); drop it")
            self.forget = (SAFETY_FORGET,)
        else:
            self.forget = (5,) if self.forget is None else parse_list(self.forget, "int", "--forget")
            bad = [f for f in self.forget if f not in FORGET_SIZES]
            if bad:
                raise GridError(f"--forget: {bad[0]} is not a forget percentage; use 5, 10 or 15 "
                                "(comma-separated, e.g. --forget 5,10)")
        for name in ("limit", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise GridError(f"{name}={value!r}: must be an integer of at least 1")
        if self.quantization not in (None, "4bit"):
            raise GridError(f"--quantization {self.quantization!r}: use 4bit, or leave it out")
        self.settings = {str(k).strip(): v for k, v in dict(self.settings).items()}
        self.resolved = resolve_settings(self.methods, self.settings)
        self._resolve_extras()

    def _resolve_extras(self) -> None:
        """``mia`` / ``relearn`` / ``benign``: None → on where they apply; asked for where they cannot → error."""
        from mlunlearn.eval.mia import has_nonmembers

        for name in ("relearn_steps", "benign_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GridError(f"--{name.replace('_', '-')} {value!r}: must be an integer of at least 1")
        if isinstance(self.relearn_fraction, bool) or not isinstance(self.relearn_fraction, (int, float)) \
                or not 0 < self.relearn_fraction < 1:
            raise GridError(f"--relearn-fraction {self.relearn_fraction!r}: must be between 0 and 1 (e.g. 0.2: a "
                            "fifth of the forget people are relearned, the others evaluated)")
        self.relearn_fraction = float(self.relearn_fraction)
        for name in ("mia", "relearn", "benign"):
            value = getattr(self, name)
            if value not in (None, True, False):
                raise GridError(f"{name}={value!r}: use True, False or None (on where it applies)")
            if self.safety:
                if value:
                    raise GridError(f"--{name} does not apply to --data {self.data}: a safety benchmark has no forget "
                                    f"people; drop it (or pass --no-{name})")
                setattr(self, name, False)
            elif value is None:
                setattr(self, name, name != "mia" or has_nonmembers(self.data))
        if self.mia and not has_nonmembers(self.data):
            raise GridError(f"--mia needs people the model never saw, and --data {self.data} has none (MLLMU-Bench "
                            "fine-tuned all its people); add a Holdout_Data config (ft_Data's columns) to the "
                            "folder, or pass --no-mia")

    @property
    def safety(self) -> bool:
        return self.forget == (SAFETY_FORGET,)

    def to_json(self) -> dict:
        spec = {k: v for k, v in asdict(self).items()}
        spec["methods"], spec["forget"], spec["seeds"] = list(self.methods), list(self.forget), list(self.seeds)
        spec["settings"] = {k: str(v) for k, v in sorted(self.settings.items())}
        spec["eval"] = {k: spec.pop(k) for k in ("limit", "batch_size", "max_new_tokens")}
        spec["eval"]["seed"] = 0
        steps, fraction, limit = (spec.pop(k) for k in ("relearn_steps", "relearn_fraction", "benign_limit"))
        spec["relearn"] = {"steps": steps, "fraction": fraction} if self.relearn else False
        spec["benign"] = {"limit": limit} if self.benign else False
        if spec["quantization"] is None:  # written only when set: grids run before it existed keep their spec
            del spec["quantization"]
        return spec

    def cells(self) -> list:
        """Every cell: a vanilla evaluation per forget size, then methods × forget sizes × seeds."""
        out = [Cell("vanilla", f, None) for f in self.forget]
        return out + [Cell(m, f, s) for m in self.methods for f in self.forget for s in self.seeds]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``method`` (or ``"vanilla"``, then ``seed`` is None), ``forget``, ``seed``."""

    method: str
    forget: object
    seed: int | None

    @property
    def folder(self) -> str:
        f = f"forget{self.forget}" if isinstance(self.forget, int) else str(self.forget)
        return f"{RUNS}/{self.method}/{f}" + ("" if self.seed is None else f"_seed{self.seed}")

    def __str__(self) -> str:
        return self.folder.split("/", 1)[1].replace("/", " ")


def resolve_settings(methods, settings: dict) -> dict:
    """``{method: (method_kw, engine_kw)}`` from grid settings; every key and value checked (a one-line
    :class:`GridError` or :class:`MethodError`), each method built once so its own checks run too."""
    from mlunlearn.engine import UnlearnConfig, split_settings
    from mlunlearn.methods import METHODS, get_method

    engine_keys = UnlearnConfig.keys()
    per = {m: {} for m in methods}
    prefixed = {}
    for key, value in settings.items():
        head, dot, tail = key.partition(".")
        if key in GRID_OWNED or (dot and tail in GRID_OWNED):
            raise GridError(f"--set {key}: {GRID_OWNED[tail if dot else key]}")
        if dot:
            if head not in per:
                where = "is not in --methods" if head in METHODS else "is not a registered method"
                raise GridError(f"--set {key}={value}: {head!r} {where} ({', '.join(methods)}); prefix a setting "
                                "with a method of the grid, e.g. --set npo.beta=0.2")
            if tail not in METHODS[head].hyperparameters() and tail not in engine_keys:
                split_settings({tail: value}, head)  # raises "unknown setting ... for <method>; ..."
            prefixed.setdefault(head, {})[tail] = value
        elif key in engine_keys:
            for m in methods:
                per[m][key] = value
        else:
            takes = [m for m in methods if key in METHODS[m].hyperparameters()]
            if not takes:
                raise GridError(f"unknown setting {key!r}: not an engine setting ({', '.join(engine_keys)}) nor a "
                                f"hyper-parameter of {', '.join(methods)} (see `mlunlearn methods --verbose`)")
            if len(takes) < len(methods):
                others = [m for m in methods if m not in takes]
                raise GridError(f"--set {key}={value}: {key!r} is a hyper-parameter of {', '.join(takes)} but not of "
                                f"{', '.join(others)}; give it per method, e.g. --set {takes[0]}.{key}={value}")
            for m in methods:
                per[m][key] = value
    out = {}
    for m in methods:
        method_kw, engine_kw = split_settings({**per[m], **prefixed.get(m, {})}, m)
        try:
            get_method(m, **method_kw)  # a bad value fails now, before any model loads
            UnlearnConfig(**engine_kw)
        except MethodError as err:
            raise GridError(f"{m}: {' '.join(str(err).split())}") from None
        out[m] = (method_kw, engine_kw)
    return out


# ------------------------------------------------------------------------------------------ folders

def _is_done(out: Path, cell: Cell) -> bool:
    return _unfinished(out, cell) is None


def _unfinished(out: Path, cell: Cell) -> str | None:
    """``None`` if the cell is finished: its ``result.json`` and ``run.json`` exist, and they and every extra
    file it holds (``mia.json``, ``relearn.json``, ``benign.json``) parse as JSON objects. Else why not: ""
    for a cell never finished (no ``result.json``: killed before its last write), a one-line reason for a
    cell that looks finished but is damaged (a file cut short or overwritten by hand; the grid's own writes
    are atomic, so a kill cannot do it). A damaged cell is recomputed, never reported as finished."""
    folder = out / cell.folder
    if not (folder / "result.json").is_file():
        return ""
    for name in ("result.json", "run.json", MIA_FILE, RELEARN_FILE, BENIGN_FILE):
        path = folder / name
        if name not in ("result.json", "run.json") and not path.exists():
            continue
        try:
            if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                return f"{path} is not a JSON object"
        except FileNotFoundError:
            return f"{path} is missing"
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{path} is unreadable ({type(err).__name__}: cut short?)"
    return None


def check_folder(out, spec: GridSpec, overwrite: bool = False) -> Path:
    """Check, creating nothing, that ``out`` can take this grid: a new or empty folder, one holding the same
    spec (a resume), or anything with ``overwrite``. Returns it as a Path."""
    from mlunlearn.utils import check_writable

    out = check_writable(out, kind="folder", what="--output")
    if overwrite or not out.is_dir():
        return out
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not held:
        return out
    if not (out / BENCH_FILE).is_file():
        raise GridError(f"--output {out} already holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''} and no "
                        f"{BENCH_FILE}: it is not a bench folder; give a new folder, or pass --overwrite to write the "
                        "grid into it")
    try:
        old = json.loads((out / BENCH_FILE).read_text())
    except (OSError, ValueError) as err:
        raise GridError(f"{out / BENCH_FILE} cannot be read ({type(err).__name__}); give a new folder, or pass "
                        "--overwrite to start the grid over") from None
    if not isinstance(old, dict):  # why: a list or a number here was an AttributeError traceback
        raise GridError(f"{out / BENCH_FILE} holds a JSON {type(old).__name__}, not a grid's spec; give a new folder, "
                        "or pass --overwrite to start the grid over")
    new = spec.to_json()
    if old != new:
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
        raise GridError(f"--output {out} holds another grid ({'; '.join(diff) or 'another format'}); give a new "
                        "folder, or pass --overwrite to delete its runs and start over")
    return out


def _clear(out: Path) -> None:
    """Delete what a grid wrote in ``out`` (and nothing else)."""
    for name in WRITTEN:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_json(path: Path, obj) -> None:
    from mlunlearn.utils import write_atomic

    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------------ the grid

def run_grid(spec: GridSpec, output, *, overwrite: bool = False, keep_models: bool = False,
             device: str | None = None, threads: int | None = 1, progress: bool = True, log=print):
    """Run every cell of ``spec`` not yet done in ``output``; write the leaderboards and the figure; return
    the leaderboard (one row per cell). ``log(text)`` gets one line per finished cell (``None``: quiet).
    Everything that can be checked without a model is checked before anything is created."""
    from mlunlearn.utils import progress_bar, progress_enabled, set_seed

    out = check_folder(output, spec, overwrite)
    bench = _open_data(spec)
    cells = spec.cells()
    pending = cells if overwrite else [c for c in cells if not _is_done(out, c)]
    damaged = [] if overwrite else [reason for c in pending if (reason := _unfinished(out, c))]
    set_seed(0, threads=threads)
    models = _Models(spec.model, device, spec.quantization)
    if pending:
        models.base()  # a model that cannot load fails before the folder is created
    if overwrite and out.is_dir():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / BENCH_FILE, spec.to_json())
    for reason in damaged if log is not None else ():
        log(f"{reason}: the cell is not finished; computing it again")
    bar = progress_bar(pending, desc="bench", progress=progress, unit="cell")
    for cell in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(str(cell))
        seconds = run_cell(spec, cell, out, bench, models, keep_models=keep_models)
        if log is not None:
            line = f"{cell}: {_headline_text(spec, out, cell, getattr(bench, 'files', None))} ({seconds:.0f} s)"
            bar.write(line) if progress_enabled(progress) else log(line)
    board = leaderboard(out, spec)
    _write_csv(out / BOARD_FILE, board)
    _write_csv(out / MEAN_FILE, mean_leaderboard(board))
    plot_tradeoff(board, out / FIGURE_FILE, safety=spec.safety)
    if spec.benign:
        plot_benign(board, out / BENIGN_FIGURE)
    return board


class _Models:
    """The model before unlearning, loaded once (lazily); a fresh copy for each cell."""

    def __init__(self, name: str, device: str | None, quantization: str | None = None):
        self.name, self.device, self.quantization, self._base = name, device, quantization, None

    def base(self):
        from mlunlearn.models import load_model

        if self._base is None:
            self._base = load_model(self.name, device=self.device, quantization=self.quantization)
        return self._base

    def fresh(self):
        from mlunlearn.models import load_model

        if self.name in TINY_MODELS:
            model, processor = self.base()
            return copy.deepcopy(model), processor
        # a 7B model: drop the vanilla copy before loading this cell's (one model on the GPU, not two); a later
        # vanilla cell reloads it
        import torch

        self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return load_model(self.name, device=self.device, quantization=self.quantization)


def _open_data(spec: GridSpec):
    """The benchmark, with every file and image a cell will read checked now (before any model loads)."""
    if spec.safety:
        from mlunlearn.benchmarks import get_benchmark
        from mlunlearn.eval.protocol import check_images

        bench = get_benchmark(spec.data)
        bench.unlearning_data(SAFETY_FORGET)
        for split in bench.files:
            check_images([_ImageQuery(q) for q in bench.queries(split, limit=spec.limit)])
        return bench
    from mlunlearn.data import open_benchmark
    from mlunlearn.data.unlearning import unlearning_data
    from mlunlearn.eval.protocol import build_queries, check_images

    from mlunlearn.eval.mia import nonmember_examples
    from mlunlearn.eval.protocol import build_benign_queries
    from mlunlearn.relearn import relearn_split

    bench = open_benchmark(spec.data)
    for forget in spec.forget:
        check_images(build_queries(bench, forget, limit=spec.limit, seed=0))
        data = unlearning_data(bench, forget)
        if spec.relearn:
            try:
                relearn_split(data.forget_ids, spec.relearn_fraction)
            except MethodError as err:
                raise GridError(f"--forget {forget}: {err}") from None
        if spec.benign:
            check_images(build_benign_queries(_SampledBenign(bench), forget, limit=spec.benign_limit, seed=0))
    if spec.mia:
        bench.nonmembers = nonmember_examples(bench)  # drawn once for every cell
    return bench


class _SampledBenign:
    """The benchmark with its ``Benign_VQA`` rows in a fixed shuffled order, so that ``benign_limit``
    questions per cell are a sample over people, views and questions (not the first person's)."""

    def __init__(self, bench):
        self.bench, self.name = bench, getattr(bench, "name", "benchmark")

    def has(self, config: str) -> bool:
        return self.bench.has(config)

    def load(self, config: str) -> list:
        import random

        rows = self.bench.load(config)
        if config == "Benign_VQA":
            rows = list(rows)
            random.Random("bench-benign").shuffle(rows)
        return rows


class _ImageQuery:
    def __init__(self, query):
        self.images, self.source = [query.image], query.source


def run_cell(spec: GridSpec, cell: Cell, out: Path, bench, models, keep_models: bool = False) -> float:
    """Unlearn (unless vanilla) and evaluate one cell; write its run.json, then its result.json. Seconds."""
    from mlunlearn.engine import UnlearnConfig, unlearn
    from mlunlearn.methods import get_method

    t0 = time.time()
    folder = out / cell.folder
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted attempt left
    folder.mkdir(parents=True)
    if cell.method == "vanilla":
        model, processor = models.base()
        run = {"method": "vanilla", "model": spec.model, "data": spec.data, "forget": cell.forget, "seed": None}
    else:
        method_kw, engine_kw = spec.resolved[cell.method]
        config = UnlearnConfig(**{**engine_kw, "seed": cell.seed, "progress": False})
        model, processor = models.fresh()
        result = unlearn(model, bench, cell.forget, get_method(cell.method, **method_kw), config,
                         output=folder if keep_models else None, processor=processor, overwrite=True)
        model, run = result.model, dict(result.run)
    t1 = time.time()
    result = _evaluate(spec, model, processor, bench, cell.forget)
    seconds = {"eval_seconds": round(time.time() - t1, 2)}
    for name, extra in (("mia", _mia), ("benign", _benign), ("relearn", _relearn)):  # relearn last: it trains
        if getattr(spec, name):
            t1 = time.time()
            extra(spec, cell, folder, bench, model, processor, models, run)
            seconds[f"{name}_seconds"] = round(time.time() - t1, 2)
    run["bench"] = {"cell": cell.folder, "settings": {k: str(v) for k, v in spec.settings.items()}, **seconds}
    _write_json(folder / "run.json", run)
    result.save_json(folder / "result.json")  # last: a cell with a result.json is done
    return time.time() - t0


def _eval_options(spec: GridSpec) -> dict:
    return dict(batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, limit=spec.limit, seed=0,
                progress=False)


def _mia(spec, cell, folder, bench, model, processor, models, run) -> None:
    from mlunlearn.eval.mia import evaluate_mia

    _write_json(folder / MIA_FILE, evaluate_mia(model, processor, bench, cell.forget, nonmembers=bench.nonmembers))


def _benign(spec, cell, folder, bench, model, processor, models, run) -> None:
    from mlunlearn.eval.protocol import evaluate_benign

    options = {**_eval_options(spec), "limit": spec.benign_limit}
    result = evaluate_benign(model, processor, _SampledBenign(bench), cell.forget, **options)
    _write_json(folder / BENIGN_FILE, {"by_part": benign_parts(result.records), **result.to_benign()})


def benign_parts(records) -> dict:
    """Benign accuracy and refusal rate (%) in three parts: ``forget`` (questions about the forget people's
    images), ``other`` (every other question with a visible answer; on the real MLLMU-Bench, which has no
    reference answers, every other question) and ``idk`` (questions whose right answer is "I don't know":
    blank and noise images, a missing trait; refusing there is correct)."""
    from mlunlearn.data.refusals import IDK

    parts = {"forget": [], "other": [], "idk": []}
    for r in records:
        parts["forget" if r.in_forget else "idk" if r.reference == IDK else "other"].append(r.scores)
    out = {}
    for part, scores in parts.items():
        out[part] = {m: 100 * sum(s[m] for s in scores) / len(scores) for m in ("accuracy", "refusal_rate")
                     if scores and all(m in s for s in scores)}
        out[part]["n"] = len(scores)
    return out


def _relearn(spec, cell, folder, bench, model, processor, models, run) -> None:
    """The relearning attack on this cell's model (the vanilla row: on a fresh copy, the family's lr)."""
    from mlunlearn.relearn import relearning_attack

    if cell.method == "vanilla":
        model, processor = models.fresh()
        lr = batch_size = None
    else:
        lr, batch_size = run["config"]["lr"], run["config"]["batch_size"]
    attack = relearning_attack(model, processor, bench, cell.forget, fraction=spec.relearn_fraction,
                               steps=spec.relearn_steps, lr=lr, batch_size=batch_size, seed=cell.seed or 0,
                               eval_options=_eval_options(spec))
    _write_json(folder / RELEARN_FILE, attack)


def _evaluate(spec: GridSpec, model, processor, bench, forget):
    options = _eval_options(spec)
    if spec.safety:
        from mlunlearn.eval.safety import RuleJudge, evaluate_safety

        result = evaluate_safety(model, processor, bench, judge=RuleJudge(), samples=1, **options)
        result.meta["model"] = spec.model
        return result
    from mlunlearn.eval.protocol import evaluate

    return evaluate(model, processor, bench, forget, **options)


# -------------------------------------------------------------------------------------- leaderboards

def _column(label: str) -> str:
    """A summary column ("cls img %", "ROUGE-L text") as a leaderboard column part ("cls_img", "rougeL_text")."""
    return label.replace(" %", "").replace("ROUGE-L", "rougeL").replace(" ", "_")


def mllmu_headline(official: dict) -> dict:
    """The columns of :meth:`EvalResult.summary` flattened (``forget_cls_img``, ``retain_rougeL_text``, ...),
    read from the official result JSON (what ``result.json`` holds)."""
    from mlunlearn.eval.results import MODE_TITLES

    row = {}
    for mode, title in MODE_TITLES.items():
        section = official.get(title)
        if section is None:
            continue
        p = MODE_PREFIX[mode]
        cls, cloze, gen = section["classification"], section["fill_in_the_blank"], section["generation"]
        values = {"cls_img": cls.get("Image-Textual Question Accuracy"), "cls_text": cls.get("Pure Text Question Accuracy"),
                  "cloze_img": cloze.get("image_textual_accuracy"), "cloze_text": cloze.get("pure_text_accuracy"),
                  "rougeL_img": gen.get("Average ROUGE-L (Image_Textual)"),
                  "rougeL_text": gen.get("Average ROUGE-L (Pure_Text)")}
        row.update({f"{p}_{k}": v for k, v in values.items()})
    return row


def summary_headline(summary) -> dict:
    """The same flat columns from an :meth:`EvalResult.summary` table (for results still in memory)."""
    return {f"{MODE_PREFIX[mode]}_{_column(col)}": float(v) for mode, r in summary.iterrows()
            for col, v in r.items() if not (isinstance(v, float) and math.isnan(v))}


def safety_headline(result: dict, files: dict | None = None) -> dict:
    """``{split}_{metric}`` (``val_ASR``, ``val_RR``, ``val_SARR``, ``val_rougeL``) from a safety result JSON;
    ``files`` maps a split to its file name (SafeEraser: train → all_train.json)."""
    names = {v: k for k, v in (files or {}).items()}
    row = {}
    for name, metrics in result.items():
        if name == "settings" or not isinstance(metrics, dict):
            continue
        split = names.get(name, name.rsplit(".", 1)[0])
        for key in ("ASR", "RR", "SARR", "ROUGE-L"):
            row[f"{split}_{'rougeL' if key == 'ROUGE-L' else key}"] = metrics.get(key)
    return row


def extras_headline(folder) -> dict:
    """The columns of a cell's ``mia.json``, ``relearn.json`` and ``benign.json`` (those it has):
    ``mia_<attack>_auc`` and ``privleak`` (Min-k%'s, against AUC 0.5, as MUSE reports it);
    ``heldback_forget_<metric>`` (the unlearned model on the forget people left out of the relearning slice)
    and ``relearned_forget_<metric>`` (the same people after relearning), with ``heldback_nll`` /
    ``relearned_nll`` (their training answers' loss); ``benign_{forget,other,idk}_{accuracy,refusal}`` (%,
    :func:`benign_parts`)."""
    folder = Path(folder)
    row = {}
    if (folder / MIA_FILE).is_file():
        mia = json.loads((folder / MIA_FILE).read_text())
        row.update({f"mia_{attack}_auc": auc for attack, auc in mia["auc"].items()})
        row["privleak"] = mia["privleak"]["min_k"]
    if (folder / RELEARN_FILE).is_file():
        attack = json.loads((folder / RELEARN_FILE).read_text())
        for when, prefix in (("before", "heldback"), ("after", "relearned")):
            row.update({f"{prefix}_{k}": v for k, v in mllmu_headline(attack[when]).items()})
            row[f"{prefix}_nll"] = attack["rest_nll"][when]
    if (folder / BENIGN_FILE).is_file():
        benign = json.loads((folder / BENIGN_FILE).read_text())
        # A benign.json written before the parts existed (bench of d8bcbef) has the forget part only: the
        # same questions (in_forget); its "not_forget" mixes both other parts, so those columns stay empty.
        parts = benign.get("by_part") or {"forget": benign["by_forget_set"]["forget"]}
        for part, values in parts.items():
            for metric, short in (("accuracy", "accuracy"), ("refusal_rate", "refusal")):
                if metric in values:
                    row[f"benign_{part}_{short}"] = values[metric]
    return row


def leaderboard(output, spec: GridSpec):
    """One row per finished cell of ``spec`` in ``output``: method, forget, seed, then the headline metrics."""
    import pandas as pd

    out = Path(output)
    files = None
    if spec.safety:
        from mlunlearn.benchmarks import get_benchmark

        files = dict(get_benchmark(spec.data).files)
    rows = []
    for cell in spec.cells():
        path = out / cell.folder / "result.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        metrics = safety_headline(result, files) if spec.safety else mllmu_headline(result)
        rows.append({"method": cell.method, "forget": cell.forget, "seed": cell.seed, **metrics,
                     **extras_headline(out / cell.folder)})
    board = pd.DataFrame(rows)
    if len(board):
        board["seed"] = board["seed"].astype("Int64")
    return board


def mean_leaderboard(board):
    """Mean and std over seeds for each method and forget size (columns ``<metric>_mean``, ``<metric>_std``;
    the std of one seed is empty), with ``seeds``, the number of seeds averaged."""
    import pandas as pd

    if board.empty:
        return pd.DataFrame()
    metrics = [c for c in board.columns if c not in ("method", "forget", "seed")]
    order = list(dict.fromkeys(board["method"]))
    grouped = board.groupby(["method", "forget"], sort=False)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table.insert(0, "seeds", grouped.size())
    table = table.reset_index()
    table["method"] = pd.Categorical(table["method"], order, ordered=True)
    return table.sort_values(["method", "forget"], kind="stable").reset_index(drop=True).astype({"method": str})


def _write_csv(path: Path, table) -> None:
    from mlunlearn.utils import write_atomic

    write_atomic(path, table.to_csv(index=False))


# The extra columns the command line prints (the CSV files hold them all).
PRINTED_EXTRAS = ("mia_loss_auc", "mia_min_k_pp_auc", "privleak", "heldback_forget_cls_img", "relearned_forget_cls_img",
                  "benign_forget_accuracy", "benign_other_accuracy", "benign_other_refusal")


def printed_columns(columns) -> list:
    """What ``mlunlearn bench`` prints of a leaderboard: the image questions' metrics and :data:`PRINTED_EXTRAS`."""
    extra = ("mia_", "privleak", "heldback_", "relearned_", "benign_")
    return [c for c in columns if (not c.endswith("_text") and not c.startswith(extra)) or c in PRINTED_EXTRAS]


def tradeoff_axes(safety: bool) -> tuple:
    """The figure's (x, y) columns: forget quality vs what must be kept."""
    return ("val_ASR", "val_SARR") if safety else ("forget_cls_img", "retain_cls_img")


def plot_tradeoff(board, path, safety: bool = False) -> Path:
    """Forget vs retain, one marker per method and forget size (mean over seeds), vanilla in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = tradeoff_axes(safety)
    if not board.empty and x not in board.columns:  # another safety benchmark: its first file that is not train
        splits = [c[:-4] for c in board.columns if c.endswith("_ASR") and not c.startswith("train_")]
        x, y = (f"{splits[0]}_ASR", f"{splits[0]}_SARR") if splits else ("train_ASR", "train_SARR")
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    handles = []
    if not board.empty:
        means = board.groupby(["method", "forget"], sort=False)[[x, y]].mean().reset_index()
        shapes = dict(zip(dict.fromkeys(means["forget"]), "osD^vP*X"))
        methods = [m for m in dict.fromkeys(means["method"]) if m != "vanilla"]
        palette = [c for c in plt.get_cmap("tab10" if len(methods) <= 9 else "tab20").colors
                   if max(c) - min(c) > 0.05]  # no greys: grey is the vanilla's
        colour = {"vanilla": "grey", **{m: palette[i % len(palette)] for i, m in enumerate(methods)}}
        for _, r in means.iterrows():
            ax.scatter(r[x], r[y], marker=shapes[r["forget"]], s=70, color=colour[r["method"]], edgecolor="black",
                       linewidth=0.5, zorder=3)
        # One legend entry per method (colour) and per forget size (shape): readable for a whole grid.
        handles = [Line2D([], [], marker="o", linestyle="", color=colour[m], markeredgecolor="black", label=m)
                   for m in dict.fromkeys(means["method"])]
        if len(shapes) > 1:
            handles += [Line2D([], [], marker=shape, linestyle="", color="white", markeredgecolor="black",
                               label=f"forget {f}%" if isinstance(f, int) else str(f)) for f, shape in shapes.items()]
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    names = {"forget_cls_img": "forget: classification accuracy, image (%; lower: forgotten)",
             "retain_cls_img": "retain: classification accuracy, image (%; higher: kept)",
             "val_ASR": "val ASR (%; lower: safer)", "val_SARR": "val SARR (%; lower: fewer over-refusals)"}
    ax.set_xlabel(names.get(x, x))
    ax.set_ylabel(names.get(y, y))
    ax.set_title("forget vs retain (mean over seeds)")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically (a killed grid never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


BENIGN_PARTS = (("forget", "forget people's images"), ("other", "other images, answer visible"),
                ("idk", "right answer: \"I don't know\""))


def plot_benign(board, path) -> Path:
    """Benign visual questions per method (mean over seeds): accuracy and refusal rate (%) in the three parts
    of :func:`benign_parts` (refusing is over-refusal in the first two, correct in the third). The real
    MLLMU-Bench has no reference answers: refusal only, forget and other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in ("accuracy", "refusal") if any(c.startswith("benign_") and c.endswith(m) for c in board)]
    means = board.groupby(["method", "forget"], sort=False)[[c for c in board.columns if c.startswith("benign_")]] \
        .mean().reset_index() if not board.empty and metrics else None
    groups = 0 if means is None else len(means)
    fig, axes = plt.subplots(max(1, len(metrics)), 1, figsize=(max(6.0, 0.5 * groups + 2.0), 2.6 * max(1, len(metrics))
                                                                + 0.8), squeeze=False, sharex=True)
    if means is not None:
        several = means["forget"].nunique() > 1
        labels = [m + (f" {f}%" if several else "") for m, f in zip(means["method"], means["forget"])]
        x = np.arange(groups)
        for ax, metric in zip(axes[:, 0], metrics):
            for i, (part, text) in enumerate(BENIGN_PARTS):
                column = f"benign_{part}_{metric}"
                if column in means:
                    ax.bar(x + (i - 1) * 0.27, means[column], width=0.27, label=text, edgecolor="black",
                           linewidth=0.4, color=("tab:red", "tab:blue", "tab:grey")[i])
            ax.set_ylim(0, 105)
            ax.set_xlim(-0.6, groups - 0.4)
            ax.set_ylabel(f"{'accuracy' if metric == 'accuracy' else 'refusal rate'} (%)")
            ax.grid(alpha=0.3, axis="y")
        axes[-1, 0].set_xticks(x, labels, rotation=40 if groups > 4 else 0, ha="right" if groups > 4 else "center",
                               fontsize=8)
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.995))
    fig.suptitle("benign visual questions (mean over seeds)", y=0.94, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save_figure(fig, path)


def _headline_text(spec: GridSpec, out: Path, cell: Cell, files=None) -> str:
    result = json.loads((out / cell.folder / "result.json").read_text())
    if spec.safety:
        row = safety_headline(result, dict(files or {}))
        split = next((k[:-4] for k in row if k.endswith("_ASR") and not k.startswith("train")), "train")
        return f"{split} ASR {row[f'{split}_ASR']}, SARR {row[f'{split}_SARR']}"
    row = {**mllmu_headline(result), **extras_headline(out / cell.folder)}
    text = f"forget cls img {row['forget_cls_img']:.1f}%, retain cls img {row['retain_cls_img']:.1f}%"
    if "mia_loss_auc" in row:
        text += f", MIA AUC loss {row['mia_loss_auc']:.2f} min-k++ {row['mia_min_k_pp_auc']:.2f}"
    if "relearned_forget_cls_img" in row:
        text += (f", held-back cls img {row['heldback_forget_cls_img']:.1f}% -> relearned "
                 f"{row['relearned_forget_cls_img']:.1f}%")
    return text
