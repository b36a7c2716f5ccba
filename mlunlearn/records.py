"""Run records: "train or load" for the book's heavy experiment grids (book chapter 4).

A chapter whose grid takes too long to run at every build stores each piece of it as a *run record*, a
JSON file ``<folder>/<name>.json`` holding

- ``key``: everything the result depends on (the task, the method specs with their learning rates, the
  seed and optimisation settings, the model, device and data names, the evaluation settings, and the
  versions of mlunlearn and torch), and
- ``value``: exactly what the code returned, as JSON (tables as lists of row dicts, monitor frames too).

:func:`cached` returns the stored value when the record exists and its key equals the key asked for, and
otherwise runs the computation and stores its record. Records are only ever written by this module: a
record is the output of :func:`compute` on its own key, and :func:`recheck` proves it by recomputing it
from scratch and comparing every value exactly (``tools/recheck_records.py`` runs it in CI).

A key describes the whole computation (``key["task"]`` names a function of :data:`TASKS`), so a record can
be recomputed without the notebook that made it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

FORMAT = 1  # the layout of a record file


# -- the cache -----------------------------------------------------------------------------------------


def canonical(obj):
    """``obj`` as it reads back from JSON (tuples become lists, numpy scalars plain numbers), so a value
    just computed and the same value loaded from its record are equal and print the same."""
    return json.loads(json.dumps(obj, default=_json_default, allow_nan=True))


def _json_default(obj):
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        np = None
    if np is not None:
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r}")


def record_path(name: str, folder) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"record name {name!r}: use a plain file name without folders")
    return Path(folder) / f"{name}.json"


def read_record(path) -> dict:
    """The record at ``path`` (``{"format", "name", "key", "value"}``); ValueError if it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable run record ({err})") from err
    if not isinstance(record, dict) or not {"key", "value"} <= set(record):
        raise ValueError(f"{path}: not a run record (needs 'key' and 'value')")
    return record


def write_record(path, name: str, key: dict, value) -> None:
    """Write the record atomically (a temporary file renamed over the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "name": name, "key": canonical(key), "value": canonical(value)},
                      indent=1, allow_nan=True, ensure_ascii=False, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a record is meant to be read and committed
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(name: str, fn: Callable[[], object], key: dict, folder, recompute: bool = False):
    """The value of ``fn()``, from ``<folder>/<name>.json`` when that record's key equals ``key``.

    Otherwise (no record, another key, or ``recompute``) ``fn()`` runs, its value is stored with ``key``
    and returned. Either way the value is returned as it reads back from JSON (:func:`canonical`), so a
    notebook prints the same thing whether it computed or loaded it.
    """
    path = record_path(name, folder)
    key = canonical(key)
    if not recompute and path.exists():
        try:
            stored = read_record(path)
        except ValueError:
            stored = None  # unreadable: recompute and replace it
        if stored is not None and stored["key"] == key:
            return stored["value"]
    value = canonical(fn())
    write_record(path, name, key, value)
    return value


# -- keys and tasks -----------------------------------------------------------------------------------


def environment() -> dict:
    """The versions a record's numbers depend on beyond its settings."""
    import torch

    import mlunlearn

    return {"mlunlearn": mlunlearn.__version__, "torch": torch.__version__}


# UnlearnConfig fields added after the record format was fixed. A key leaves each one out while it holds
# its default, so every committed record keeps its key (and its chapter does not recompute); a record made
# with another value names it. _config rebuilds the config either way (a missing field takes its default).
LATER_FIELDS = ("gradient_checkpointing",)


def _config_dict(config) -> dict:
    """``dataclasses.asdict(config)`` without the :data:`LATER_FIELDS` that hold their default."""
    out = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name in LATER_FIELDS:
        if name in out and out[name] == defaults.get(name):
            del out[name]
    return out


def _methods(methods: dict) -> dict:
    return {label: [name, dict(hp)] for label, (name, hp) in methods.items()}


def sweep_key(model: str, data: str, methods: dict, lrs, config, forget: int = 5,
              device: str = "cpu") -> dict:
    """The key of an :func:`mlunlearn.experiments.lr_sweep` run (its default :class:`Probes`)."""
    return canonical({"task": "lr_sweep", "model": model, "device": device, "data": data,
                      "forget": forget, "methods": _methods(methods), "lrs": [float(lr) for lr in lrs],
                      "config": _config_dict(config), **environment()})


def monitor_spec(every: int = 10, images: int = 8, max_tokens: int | None = None) -> dict:
    """Settings of the :class:`mlunlearn.analysis.ProjectorMonitor` a compare task attaches to each run:
    the first ``images`` portraits of the forget split and of the retain split, every ``every`` steps."""
    return {"every": every, "images": images, "max_tokens": max_tokens}


def measure_spec(images: int = 8, examples: int = 16) -> dict:
    """A compare task's ``measure`` (:class:`mlunlearn.analysis.projector.ProjectorMeasure`, chapter 3),
    taken on the vanilla model and after each run: the median input-Jacobian spectrum over the tokens of
    the first ``images`` portraits of the forget split (kept in the record's ``spectra``), and the loss
    Jacobian's ``loss-J cond`` and ``loss-J eff. rank`` (table columns) on the first ``examples`` of
    ``unlearning_data(bench, forget).forget``."""
    return {"projector": {"images": images, "examples": examples}}


def compare_key(model: str, data: str, methods: dict, config, forget: int = 5, vanilla: bool = True,
                batch_size: int = 64, monitor: dict | None = None, device: str = "cpu",
                runs: bool = False, detail: bool = False, show: int = 3, replies: int = 5,
                reply_chars: int = 120, measure: dict | None = None,
                benign_accuracy: bool = False) -> dict:
    """The key of an :func:`mlunlearn.experiments.compare` run; ``monitor``: :func:`monitor_spec`;
    ``runs``: also store each run's learning rate, what trained and its steps (only then is it part of
    the key, so records made without it keep their keys).

    ``detail`` (also only then part of the key): also store what chapter 2 reads beyond the table, in
    compact form (:meth:`mlunlearn.experiments.Comparison.detail`): each run's per-step loss log, the
    greedy replies to the first ``show`` examples of the unlearning data's forget set
    (``unlearning_data(bench, forget).forget[:show]``, the ``show=`` of :func:`compare`), the first
    ``replies`` forget questions with the image of each task of :data:`DETAIL_TASKS` with every method's
    reply, and one entry per benign question (group, in forget, refused, reply, a reply longer than
    ``reply_chars`` cut to that length); with ``benign_accuracy`` (part of the key only then) also
    whether each benign answer was correct.

    ``measure`` (part of the key only when given): :func:`measure_spec`, measured on the vanilla model
    and after each run."""
    key = {"task": "compare", "model": model, "device": device, "data": data,
           "forget": forget, "methods": _methods(methods), "config": _config_dict(config),
           "vanilla": vanilla, "batch_size": batch_size, "monitor": monitor, **environment()}
    if runs:
        key["runs"] = True
    if detail:
        key["detail"] = {"show": {"split": "forget", "first": show},
                         "replies": {"mode": "forget", "modality": "Image_Textual",
                                     "tasks": list(DETAIL_TASKS), "first": replies},
                         "logs": True, "benign": {"reply_chars": reply_chars}}
        if benign_accuracy:
            key["detail"]["benign"]["accuracy"] = True
    elif benign_accuracy:
        raise ValueError("benign_accuracy is kept with the benign records: pass detail=True")
    if measure is not None:
        key["measure"] = measure
    return canonical(key)


# The benchmark tasks whose first forget replies a ``detail`` compare record keeps (chapter 2 prints them).
DETAIL_TASKS = ("generation", "classification")


def safety_key(model: str, data: str, methods: dict, config, vanilla: bool = True, batch_size: int = 64,
               device: str = "cpu") -> dict:
    """The key of an :func:`mlunlearn.experiments.safety_compare` run (greedy replies, the rule judge)."""
    return canonical({"task": "safety_compare", "model": model, "device": device, "data": data,
                      "methods": _methods(methods), "config": _config_dict(config), "vanilla": vanilla,
                      "batch_size": batch_size, "judge": "rule", **environment()})


class Context:
    """The loaded model, processor and benchmark a task runs on, loaded once per (model, device, data).

    A notebook passes its own (``Context.of(model, processor, bench, ...)``) so nothing loads twice; the
    recheck loads them from the key's names.
    """

    def __init__(self):
        self._loaded: dict = {}

    def add(self, model_name: str, device: str, data: str, model, processor, bench) -> "Context":
        self._loaded[(model_name, device, data)] = (model, processor, bench)
        return self

    def get(self, key: dict):
        ident = (key["model"], key["device"], key["data"])
        if ident not in self._loaded:
            from mlunlearn.benchmarks import get_benchmark
            from mlunlearn.benchmarks.safety import is_safety_source
            from mlunlearn.data import open_benchmark
            from mlunlearn.models import load_model

            model, processor = load_model(key["model"], device=key["device"])
            bench = get_benchmark(key["data"]) if is_safety_source(key["data"]) else open_benchmark(key["data"])
            self._loaded[ident] = (model, processor, bench)
        return self._loaded[ident]

    def fresh(self, key: dict):
        """A function giving an untouched model for each run: a deep copy of the tiny model, a fresh load
        of anything larger (as the chapters do)."""
        if key["model"] in ("tiny", "tiny-safety"):
            return None  # experiments' default: copy.deepcopy of the loaded model
        from mlunlearn.models import load_model

        loaded = self._loaded.get((key["model"], key["device"], key["data"]))
        # a model the chapter loaded in 4 bits is reloaded in 4 bits (a full-precision 7B is +13 GiB on a T4)
        quantization = "4bit" if loaded is not None and getattr(loaded[0], "is_loaded_in_4bit", False) else None
        dtype = loaded[0].dtype if loaded is not None else None
        return lambda: load_model(key["model"], device=key["device"], dtype=dtype, quantization=quantization)[0]


def check_environment(key: dict) -> None:
    """Raise :class:`EnvironmentMismatch` unless the key names the running mlunlearn and torch."""
    here = environment()
    differ = {k: (key.get(k), v) for k, v in here.items() if key.get(k) != v}
    if differ:
        raise EnvironmentMismatch(
            "the record was made with " + ", ".join(f"{k} {a}" for k, (a, _) in differ.items())
            + "; this is " + ", ".join(f"{k} {b}" for k, (_, b) in differ.items()))


class EnvironmentMismatch(RuntimeError):
    """A record's key names other versions than the running ones: it cannot be recomputed here."""


def _config(key: dict):
    from mlunlearn.engine import UnlearnConfig

    return UnlearnConfig(**key["config"])


def _specs(key: dict) -> dict:
    return {label: (name, dict(hp)) for label, (name, hp) in key["methods"].items()}


def _task_lr_sweep(key: dict, context: Context) -> dict:
    from mlunlearn.experiments import lr_sweep

    model, processor, bench = context.get(key)
    sweep = lr_sweep(model, processor, bench, _specs(key), key["lrs"], _config(key), key["forget"],
                     progress=False, fresh=context.fresh(key))
    return {"sweep": sweep.to_dict(orient="records")}


def _task_compare(key: dict, context: Context) -> dict:
    from mlunlearn.experiments import compare

    model, processor, bench = context.get(key)
    monitor = None
    if key["monitor"] is not None:
        from mlunlearn.analysis import ProjectorMonitor
        from mlunlearn.data import decode_image

        spec, forget = key["monitor"], key["forget"]
        first = lambda split: [decode_image(r["image"]) for r in bench.load(split)][: spec["images"]]
        retain_images, forget_images = first(f"retain_{100 - forget}"), first(f"forget_{forget}")
        monitor = lambda: ProjectorMonitor(retain_images, forget_images, processor, every=spec["every"],
                                           max_tokens=spec["max_tokens"])
    measure = None
    if key.get("measure") is not None:
        measure = _measure(key, processor, bench)
    detail = key.get("detail")
    show = None
    if detail:
        from mlunlearn.data.unlearning import add_refusals, unlearning_data

        if detail["show"]["split"] != "forget":
            raise ValueError(f"detail: show examples of the forget split only, not {detail['show']}")
        show = add_refusals(unlearning_data(bench, key["forget"])).forget[: detail["show"]["first"]]
    out = compare(model, processor, bench, _specs(key), _config(key), key["forget"],
                  vanilla=key["vanilla"], batch_size=key["batch_size"], progress=False,
                  fresh=context.fresh(key), monitor=monitor, show=show, measure=measure)
    value = {"table": out.table.reset_index().to_dict(orient="records"),
             "monitors": {label: m.frame().to_dict(orient="records") for label, m in out.monitors.items()}}
    if key.get("runs"):
        value["runs"] = {label: {"lr": run["config"]["lr"], "parametrisation": run["parametrisation"],
                                 "steps": run["steps"]} for label, run in out.runs.items()}
    if detail:
        spec = detail["replies"]
        value["detail"] = out.detail(spec["mode"], spec["tasks"], spec["modality"], spec["first"],
                                     detail["benign"]["reply_chars"],
                                     accuracy=detail["benign"].get("accuracy", False))
    if measure is not None:
        labels = (["vanilla"] if key["vanilla"] else []) + list(key["methods"])
        value["spectra"] = {label: s.tolist() for label, s in zip(labels, measure.spectra, strict=True)}
    return value


def _measure(key: dict, processor, bench):
    """The measure of a key's :func:`measure_spec` (the images and examples chapter 3 measures)."""
    from mlunlearn.analysis.projector import ProjectorMeasure
    from mlunlearn.data import decode_image
    from mlunlearn.data.unlearning import unlearning_data

    if set(key["measure"]) != {"projector"}:
        raise ValueError(f"unknown measure {key['measure']!r}; known: projector (measure_spec)")
    spec, forget = key["measure"]["projector"], key["forget"]
    images = [decode_image(r["image"]) for r in bench.load(f"forget_{forget}")][: spec["images"]]
    examples = unlearning_data(bench, forget).forget[: spec["examples"]]
    return ProjectorMeasure(processor, images, examples)


def _task_safety_compare(key: dict, context: Context) -> dict:
    from mlunlearn.experiments import safety_compare

    model, processor, bench = context.get(key)
    out = safety_compare(model, processor, bench, _specs(key), _config(key), vanilla=key["vanilla"],
                         batch_size=key["batch_size"], progress=False, fresh=context.fresh(key))
    return out.to_record()


# key["task"] -> function(key, context) -> JSON-able value. Every record's value is one of these on its key.
TASKS: dict[str, Callable[[dict, Context], object]] = {
    "lr_sweep": _task_lr_sweep,
    "compare": _task_compare,
    "safety_compare": _task_safety_compare,
}


def compute(key: dict, context: Context | None = None):
    """Run the task the key describes (refusing keys made with other versions of mlunlearn or torch)."""
    if key.get("task") not in TASKS:
        raise ValueError(f"unknown task {key.get('task')!r}; known: {sorted(TASKS)}")
    check_environment(key)
    return canonical(TASKS[key["task"]](key, context or Context()))


def cached_task(name: str, key: dict, folder, context: Context | None = None, recompute: bool = False):
    """:func:`cached` for a key of :data:`TASKS`: load the record, or compute and store it."""
    return cached(name, lambda: compute(key, context), key, folder, recompute=recompute)


# -- recheck ------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def diff(stored, recomputed, path: str = "value") -> list[str]:
    """Every place where two JSON values differ, as ``"path: stored X, recomputed Y"`` lines (exact
    comparison: 1e-12 apart is a difference; NaN equals NaN)."""
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = []
        for k in list(stored) + [k for k in recomputed if k not in stored]:
            if k not in recomputed:
                out.append(f"{path}[{k!r}]: stored {stored[k]!r}, recomputed (missing)")
            elif k not in stored:
                out.append(f"{path}[{k!r}]: stored (missing), recomputed {recomputed[k]!r}")
            else:
                out += diff(stored[k], recomputed[k], f"{path}[{k!r}]")
        return out
    if isinstance(stored, list) and isinstance(recomputed, list):
        out = [line for i, (a, b) in enumerate(zip(stored, recomputed)) for line in diff(a, b, f"{path}[{i}]")]
        if len(stored) != len(recomputed):
            out.append(f"{path}: stored {len(stored)} items, recomputed {len(recomputed)}")
        return out
    return [] if _same(stored, recomputed) else [f"{path}: stored {stored!r}, recomputed {recomputed!r}"]


def recheck(path, context: Context | None = None) -> list[str]:
    """Recompute the record at ``path`` from its key alone; the differences (empty: identical)."""
    record = read_record(path)
    return diff(record["value"], compute(record["key"], context))
