"""Experiments the chapters run: learning-rate sweeps and method comparisons (book chapter 2 onwards).

Both start every run from the same vanilla weights (a fresh copy each time) with the same seed, so the
only thing that differs between two rows is what the row says.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from dataclasses import dataclass, field

import pandas as pd
import torch

from mlunlearn.data.unlearning import add_refusals, unlearning_data
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.eval.scorecard import scorecard, teacher_forced
from mlunlearn.utils import progress_bar


@dataclass
class Probes:
    """Example sets scored with :func:`teacher_forced` (no generation): the forget set's own training
    questions, a fixed sample of the retain set's, and the forget questions' refusal variants."""

    forget: list
    retain: list
    refusal: list

    @classmethod
    def build(cls, bench, forget: int = 5, retain_every: int = 5) -> "Probes":
        data = add_refusals(unlearning_data(bench, forget))
        return cls(data.forget, data.retain[::retain_every], data.forget_refusal)

    def score(self, model, processor) -> dict:
        f, r = teacher_forced(model, processor, self.forget), teacher_forced(model, processor, self.retain)
        return {"forget exact %": f["exact"], "retain exact %": r["exact"], "forget NLL": f["nll"],
                "retain NLL": r["nll"], "refusal NLL": teacher_forced(model, processor, self.refusal)["nll"]}


def _release_memory() -> None:
    """Free what a finished run held before the next model loads: without it, ``fresh()`` runs while the
    last unlearned model is still referenced, and a 7B sweep holds two or three models at once."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lr_sweep(model, processor, bench, methods, lrs, config: UnlearnConfig, forget: int = 5,
             probes: Probes | None = None, progress: bool = True, fresh=None) -> pd.DataFrame:
    """Unlearn with each method at each learning rate; score each result with :class:`Probes`.

    ``methods``: ``{label: (method name, {hyper-parameters})}``. Returns one row per (label, lr).
    ``fresh`` as in :func:`compare`.
    """
    fresh = fresh or (lambda: copy.deepcopy(model))
    probes = probes or Probes.build(bench, forget)
    rows = []
    jobs = [(label, spec, lr) for label, spec in methods.items() for lr in lrs]
    for label, (name, hp), lr in progress_bar(jobs, "sweep", progress):
        cfg = dataclasses.replace(config, lr=lr, progress=False)
        run = unlearn(fresh(), bench, forget, name, cfg, processor=processor, **hp)
        rows.append({"method": label, "lr": lr, **probes.score(run.model, processor)})
        del run  # before the next fresh(): one unlearned model alive at a time (a 7B one fills a GPU)
        _release_memory()
    return pd.DataFrame(rows)


def pick_lr(sweep: pd.DataFrame, max_forget: float = 20.0) -> pd.DataFrame:
    """Per method, the learning rate to compare at: among those that forgot (forget exact ≤
    ``max_forget`` %), the one that kept the most retain answers; if none forgot, the one that forgot
    most. Forgetting comes first: a rate that leaves the forget set intact has unlearned nothing, however
    well it keeps the rest. Returns one row per method (index: method)."""
    picks = []
    for method, rows in sweep.groupby("method", sort=False):
        forgot = rows[rows["forget exact %"].round(6) <= max_forget]  # 3/15 is 20.000000298 in float32
        if len(forgot):
            row = forgot.sort_values(["retain exact %", "lr"], ascending=[False, True]).iloc[0]
            rule = f"forgot (≤{max_forget:g}%), kept most"
        else:
            row = rows.sort_values(["forget exact %", "lr"]).iloc[0]
            rule = "never forgot: forgot most"
        picks.append({**row.to_dict(), "rule": rule})
    return pd.DataFrame(picks).set_index("method")


@dataclass
class Comparison:
    """Scorecards (one row per method) plus each run's per-step log and run record."""

    table: pd.DataFrame
    logs: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    benign: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # method -> greedy replies to the ``show`` examples
    monitors: dict = field(default_factory=dict)  # method -> the callbacks ``monitor`` made for its run
    # (mode, task, modality) -> the columns :meth:`replies` gives, kept by a record made with ``detail``
    stored_replies: dict = field(default_factory=dict)
    # method -> the median input-Jacobian spectrum a record's ``measure`` (chapter 3) took after its run
    spectra: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, value: dict) -> "Comparison":
        """The table of a ``compare`` run record (:mod:`mlunlearn.records`) and, if stored, each run's
        learning rate, parametrisation and steps, laid out as in a run's ``run.json`` (``config.lr``).

        A record made with ``detail`` (:meth:`detail`) also gives each run's per-step log (``.logs``, as
        :meth:`mlunlearn.engine.UnlearnRun.curves`), the replies to the ``show`` examples (``.samples``),
        the first replies of :meth:`replies` for the stored (mode, task, modality) and, in ``.benign``, one
        light record per benign question (``.group``, ``.in_forget``, ``.reply`` (cut to the record's
        ``reply_chars``) and ``.scores["refusal_rate"]``, 0.0 or 1.0, and ``.scores["accuracy"]`` when the
        record keeps it). A record with monitors gives, in ``.monitors``, objects whose ``.frame()`` is the
        monitor's :meth:`~mlunlearn.analysis.ProjectorMonitor.frame`; one with a ``measure`` spec gives
        ``.spectra`` (numpy arrays). The full evaluation records are not kept in records."""
        runs = {label: {"config": {"lr": run["lr"]}, "parametrisation": run["parametrisation"],
                        "steps": run["steps"]} for label, run in value.get("runs", {}).items()}
        out = cls(pd.DataFrame(value["table"]).set_index("method"), runs=runs)
        out.monitors = {label: StoredMonitor(rows) for label, rows in value.get("monitors", {}).items()}
        if "spectra" in value:
            import numpy as np

            out.spectra = {label: np.asarray(s, dtype=float) for label, s in value["spectra"].items()}
        detail = value.get("detail")
        if detail:
            out.logs = {label: pd.DataFrame(columns).set_index("step")
                        for label, columns in detail["logs"].items()}
            out.samples = {label: list(replies) for label, replies in detail["samples"].items()}
            out.stored_replies = {(e["mode"], e["task"], e["modality"]): e["columns"]
                                  for e in detail["replies"]}
            out.benign = {label: _stored_benign(detail["benign"]["questions"], stored)
                          for label, stored in detail["benign"]["methods"].items()}
        return out

    def detail(self, mode: str = "forget", tasks=("generation", "classification"),
               modality: str = "Image_Textual", n: int = 5, reply_chars: int = 120,
               accuracy: bool = False) -> dict:
        """What a ``detail`` compare record keeps beyond the table, as JSON (:meth:`from_record` reads it):

        - ``logs``: each run's per-step log, one list per column (``step`` first);
        - ``samples``: each method's replies to the ``show`` examples;
        - ``replies``: for each of ``tasks``, the first ``n`` questions of (``mode``, task, ``modality``)
          as :meth:`replies` gives them;
        - ``benign``: ``questions``, the benign questions' (group, in forget) in order, run-length coded
          (``[group, in_forget, count]``; the same for every method), and per method its distinct
          ``replies`` (most frequent first; a reply longer than ``reply_chars`` is kept as its first
          ``reply_chars - 1`` characters and "…"), ``reply``: each question's reply as an index into them,
          space-separated, and ``refused``: the positions of the questions whose reply was a refusal;
          with ``accuracy``, also ``accuracy``: one character per question, ``1`` (correct), ``0``
          (wrong) or ``-`` (no reference answer, not scored).
        """
        import itertools
        from collections import Counter

        logs = {label: {"step": [int(s) for s in log.index], **{c: log[c].tolist() for c in log.columns}}
                for label, log in self.logs.items()}
        replies = [{"mode": mode, "task": task, "modality": modality,
                    "columns": self.replies(mode, task, modality, n=n).to_dict(orient="list")}
                   for task in tasks]
        layout = None
        methods = {}
        for label, result in self.benign.items():
            questions = [(r.group, r.in_forget) for r in result.records]
            if layout is None:
                layout = questions
            elif questions != layout:
                raise ValueError(f"{label} was asked other benign questions than {next(iter(self.benign))}")
            said = [r.reply if len(r.reply) <= reply_chars else r.reply[: reply_chars - 1] + "…"
                    for r in result.records]
            distinct = [reply for reply, _ in Counter(said).most_common()]
            index = {reply: i for i, reply in enumerate(distinct)}
            methods[label] = {"replies": distinct, "reply": " ".join(str(index[reply]) for reply in said),
                              "refused": [i for i, r in enumerate(result.records)
                                          if r.scores["refusal_rate"]]}
            if accuracy:
                methods[label]["accuracy"] = "".join(_accuracy_char(r.scores) for r in result.records)
        runs = [[group, in_forget, len(list(items))]
                for (group, in_forget), items in itertools.groupby(layout or [])]
        return {"logs": logs, "samples": {label: list(s) for label, s in self.samples.items()},
                "replies": replies,
                "benign": {"reply_chars": reply_chars, "questions": runs, "methods": methods}}

    def __add__(self, other: "Comparison") -> "Comparison":
        """The rows of both, this one's first (e.g. baselines from a record, then the runs of a chapter)."""
        merged = Comparison(pd.concat([self.table, other.table]))
        for name in ("logs", "runs", "results", "benign", "samples", "monitors", "stored_replies",
                     "spectra"):
            setattr(merged, name, {**getattr(self, name), **getattr(other, name)})
        return merged

    def replies(self, mode: str = "forget", task: str = "generation", modality: str = "Image_Textual",
                n: int = 3) -> pd.DataFrame:
        """The first ``n`` questions of one (mode, task, modality) and each method's reply to them (from
        the evaluation records or, for a comparison loaded from a ``detail`` record, its stored ones)."""
        if not self.results and self.stored_replies:
            columns = self.stored_replies.get((mode, task, modality))
            if columns is None:
                raise ValueError(f"the record keeps no replies for {(mode, task, modality)}; it keeps "
                                 f"{', '.join(map(str, self.stored_replies))}")
            if n > len(columns["question"]):
                raise ValueError(f"the record keeps the first {len(columns['question'])} questions, not {n}")
            return pd.DataFrame({name: values[:n] for name, values in columns.items()})
        first = [r for r in next(iter(self.results.values())).records if (r.mode, r.task, r.modality) == (mode, task, modality)]
        keys = [(r.id, r.question) for r in first][:n]
        table = {"question": [q for _, q in keys],
                 "expected": [next(r.reference for r in first if (r.id, r.question) == k) for k in keys]}
        for label, result in self.results.items():
            by_key = {(r.id, r.question): r.reply for r in result.records if (r.mode, r.task, r.modality) == (mode, task, modality)}
            table[label] = [by_key.get(k, "") for k in keys]
        return pd.DataFrame(table)


class StoredMonitor:
    """A monitor's rows as a run record keeps them: ``.history`` and ``.frame()`` as a
    :class:`mlunlearn.analysis.ProjectorMonitor` gives them."""

    def __init__(self, rows: list):
        self.history = list(rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)


def _accuracy_char(scores: dict) -> str:
    if "accuracy" not in scores:
        return "-"
    if scores["accuracy"] not in (0.0, 1.0):
        raise ValueError(f"a benign accuracy of {scores['accuracy']!r}: only 0 or 1 can be stored")
    return str(int(scores["accuracy"]))


def _stored_benign(questions: list, stored: dict):
    """One method's benign results as :meth:`Comparison.detail` stores them, as light objects with
    ``.records``, each with ``.group``, ``.in_forget``, ``.reply``, ``.scores["refusal_rate"]`` and,
    when stored, ``.scores["accuracy"]`` (as the live records: only for a question with an answer)."""
    from types import SimpleNamespace

    layout = [(group, in_forget) for group, in_forget, count in questions for _ in range(count)]
    said = [stored["replies"][int(i)] for i in stored["reply"].split()]
    if len(said) != len(layout):
        raise ValueError(f"a stored benign result has {len(said)} replies for {len(layout)} questions")
    refused = set(stored["refused"])
    correct = stored.get("accuracy", "-" * len(said))
    if len(correct) != len(said):
        raise ValueError(f"a stored benign result has {len(correct)} accuracies for {len(said)} questions")

    def scores(i):
        refusal = {"refusal_rate": float(i in refused)}
        return refusal if correct[i] == "-" else {"accuracy": float(correct[i]), **refusal}

    return SimpleNamespace(records=[
        SimpleNamespace(group=group, in_forget=in_forget, reply=reply, scores=scores(i))
        for i, ((group, in_forget), reply) in enumerate(zip(layout, said))])


def compare(model, processor, bench, methods, config: UnlearnConfig, forget: int = 5, vanilla: bool = True,
            batch_size: int = 64, progress: bool = True, show=None, fresh=None, monitor=None,
            measure=None) -> Comparison:
    """Full evaluation (:func:`mlunlearn.eval.scorecard.scorecard`) of each method's unlearned model.

    ``methods``: ``{label: (method name, {hyper-parameters, and optionally "lr"})}``; an ``lr`` given
    there overrides ``config.lr`` for that method. With ``vanilla``, the first row is the model before
    unlearning. ``show``: examples (:class:`mlunlearn.collate.Example`) whose greedy replies are kept per
    method in ``.samples``. ``fresh``: a function returning an untouched model for each run (default: a
    deep copy of ``model``; for LLaVA-1.5-7B pass ``lambda: load_model(name, quantization="4bit")[0]`` on a
    16 GB card, rather than hold copies: the run's NPO ``reference="<folder>"`` then loads in 4 bits too).
    ``monitor``: a function returning a fresh ``TrainerCallback`` for each run (kept in ``.monitors``),
    e.g. ``lambda: ProjectorMonitor(...)``. ``measure``: a function ``model -> dict`` whose values are added
    to each row (the vanilla row too).
    """
    from mlunlearn.eval.protocol import generate_replies

    fresh = fresh or (lambda: copy.deepcopy(model))

    def sample(m):
        if show:
            return generate_replies(m, processor, [e.prompt for e in show],
                                    [[e.image] if e.image is not None else [] for e in show], batch_size=batch_size)
        return []

    rows, out = [], Comparison(pd.DataFrame())
    if vanilla:
        row, result, benign = scorecard(model, processor, bench, forget, batch_size=batch_size)
        rows.append({"method": "vanilla", "lr": None, **row, **(measure(model) if measure else {})})
        out.results["vanilla"], out.benign["vanilla"], out.samples["vanilla"] = result, benign, sample(model)
    for label, (name, hp) in progress_bar(methods.items(), "methods", progress):
        hp = dict(hp)
        cfg = dataclasses.replace(config, lr=hp.pop("lr", config.lr), progress=False)
        callbacks = [monitor()] if monitor else []
        run = unlearn(fresh(), bench, forget, name, cfg, processor=processor, callbacks=callbacks, **hp)
        row, result, benign = scorecard(run.model, processor, bench, forget, batch_size=batch_size)
        out.samples[label] = sample(run.model)
        if callbacks:
            out.monitors[label] = callbacks[0]
        rows.append({"method": label, "lr": cfg.lr, **row, **(measure(run.model) if measure else {})})
        out.logs[label], out.runs[label] = run.curves(), run.run
        out.results[label], out.benign[label] = result, benign
        del run  # before the next fresh(), as in lr_sweep
        _release_memory()
    out.table = pd.DataFrame(rows).set_index("method")
    return out


# The baselines every method chapter puts its method beside, each at its tuned default for the model's
# family (chapter 2), seed 0.
BASELINES = {"GA": ("ga", {}), "GradDiff": ("graddiff", {}), "NPO": ("npo", {})}


def baseline_comparison(model, processor, bench, labels=("GA", "GradDiff", "NPO"), forget: int = 5,
                        batch_size: int = 64, fresh=None, records=None, model_name: str = "tiny",
                        data_name: str = "toyworld") -> Comparison:
    """The vanilla row and the baselines ``labels`` of :data:`BASELINES` (chapters 5 and 6).

    With ``records`` (a folder), "train or load": one shared run record holds all of :data:`BASELINES`
    (keyed by ``model_name``, ``data_name``, the settings and the versions; a collapsed model's scorecard
    is the slowest part of a chapter, so chapters share it), computed and stored when absent or stale.
    Without, the runs are done here with ``fresh`` (e.g. a 7B model reloaded in 4 bits for each run).
    """
    from mlunlearn.records import Context, cached_task, compare_key

    unknown = [label for label in labels if label not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; use some of {', '.join(BASELINES)}")
    config = UnlearnConfig(seed=0, progress=False)
    if records is None:
        return compare(model, processor, bench, {label: BASELINES[label] for label in labels}, config,
                       forget, batch_size=batch_size, progress=False, fresh=fresh)
    device = str(model.device)
    key = compare_key(model_name, data_name, BASELINES, config, forget, vanilla=True, batch_size=batch_size,
                      device=device, runs=True)
    slug = "".join(c if c.isalnum() else "-" for c in model_name).strip("-")[-40:]
    context = Context().add(model_name, device, data_name, model, processor, bench)
    out = Comparison.from_record(cached_task(f"baselines_{slug}_forget{forget}_seed0", key, records, context))
    out.table = out.table.loc[["vanilla", *labels]]
    out.runs = {label: out.runs[label] for label in labels}
    return out


# ------------------------------------------------------------------------------------ safety (chapter 9)

SAFETY_METRICS = ("ASR", "RR", "SARR", "ROUGE-L")


@dataclass
class SafetyComparison:
    """Safety metrics (:mod:`mlunlearn.eval.safety`) of each method's unlearned model.

    ``table``: one row per (method, file), columns ASR, RR, SARR (%) and ROUGE-L precision;
    ``categories``: the same on ``all_val.json``'s harm categories (one row per (method, category));
    ``examples``: per method, the replies to the queries of the first val item of each category, as
    records (question, field, reply and the judge's verdicts); ``runs``: each run's learning rate, Prompt
    Decouple weight, what trained and its steps; ``results``: the full :class:`SafetyResult` per method
    (not kept in run records).
    """

    table: pd.DataFrame
    categories: pd.DataFrame = field(default_factory=pd.DataFrame)
    examples: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        return {"table": self.table.reset_index().to_dict(orient="records"),
                "categories": self.categories.reset_index().to_dict(orient="records"),
                "examples": self.examples, "runs": self.runs}

    @classmethod
    def from_record(cls, value: dict) -> "SafetyComparison":
        return cls(pd.DataFrame(value["table"]).set_index(["method", "file"]),
                   pd.DataFrame(value["categories"]).set_index(["method", "category"]),
                   value["examples"], value["runs"])

    def __add__(self, other: "SafetyComparison") -> "SafetyComparison":
        """The rows of both, this one's first (e.g. two run records of one chapter)."""
        return SafetyComparison(pd.concat([self.table, other.table]), pd.concat([self.categories, other.categories]),
                                {**self.examples, **other.examples}, {**self.runs, **other.runs},
                                {**self.results, **other.results})

    def metric(self, name: str) -> pd.DataFrame:
        """One metric as a method × file table (e.g. ``metric("SARR")``)."""
        return self.table[name].unstack("file").loc[list(dict.fromkeys(self.table.index.get_level_values(0)))]

    def replies(self, category: str, field_prefix: str = "") -> pd.DataFrame:
        """Each method's reply (columns) to each query (rows) of ``category``'s shown item; ``field_prefix``
        keeps only the fields starting with it (e.g. ``"unsafe_pairs[0]"``, ``"UnharmPair"``)."""
        rows = {}
        for label, records in self.examples.items():
            for r in records:
                if r["category"] == category and r["field"].startswith(field_prefix):
                    rows.setdefault((r["field"], r["question"]), {})[label] = r["reply"]
        out = pd.DataFrame.from_dict(rows, orient="index")
        out.index = pd.MultiIndex.from_tuples(out.index, names=["field", "question"])
        return out


def _safety_rows(label: str, result) -> tuple[list, list, list]:
    from mlunlearn.eval.safety import metrics

    rows = [{"method": label, "file": name, **{k: m[k] for k in SAFETY_METRICS}}
            for name, m in result.by_file().items()]
    val = result.files[list(result.files)[-1]]  # the held-out file (all_val.json / test.json)
    cats = [{"method": label, "category": c,
             **{k: v for k, v in metrics([r for r in val if r["category"] == c]).items() if k in SAFETY_METRICS}}
            for c in dict.fromkeys(r["category"] for r in val)]
    first = {}
    for r in val:
        first.setdefault(r["category"], r["item"])
    keep = ("category", "item", "field", "question", "reply", "harmful", "sarr", "rouge", "refusal", "unsafe",
            "normal", "rouge_l")
    shown = [{k: r[k] for k in keep if k in r} for r in val if r["item"] == first[r["category"]] and r["sample"] == 0]
    return rows, cats, shown


def safety_compare(model, processor, bench, methods, config: UnlearnConfig, vanilla: bool = True,
                   batch_size: int = 64, progress: bool = True, fresh=None, judge=None) -> SafetyComparison:
    """Unlearn a safety benchmark's forget request (every harmful item of its train file) with each
    method and evaluate the result on every file of the benchmark (greedy, the default judge unless
    ``judge`` is given). ``methods`` and ``fresh`` as in :func:`compare`; an ``lr`` in a method's
    hyper-parameters overrides ``config.lr``. With ``vanilla``, the first rows are the model before
    unlearning."""
    from mlunlearn.benchmarks import as_benchmark
    from mlunlearn.eval.safety import evaluate_safety

    bench = as_benchmark(bench)
    fresh = fresh or (lambda: copy.deepcopy(model))
    rows, cats, out = [], [], SafetyComparison(pd.DataFrame())

    def score(label, m):
        result = evaluate_safety(m, processor, bench, judge=judge, batch_size=batch_size)
        r, c, shown = _safety_rows(label, result)
        rows.extend(r)
        cats.extend(c)
        out.examples[label], out.results[label] = shown, result

    if vanilla:
        score("vanilla", model)
    for label, (name, hp) in progress_bar(methods.items(), "methods", progress):
        hp = dict(hp)
        cfg = dataclasses.replace(config, lr=hp.pop("lr", config.lr), progress=False)
        run = unlearn(fresh(), bench, "train", name, cfg, processor=processor, **hp)
        score(label, run.model)
        curves = run.curves().reset_index()
        curves = curves[[c for c in curves if c in ("step", "loss") or c.endswith("_nll")]].iloc[::10]
        out.runs[label] = {"lr": run.run["config"]["lr"], "pd": run.run["hyperparameters"].get("pd"),
                           "parametrisation": run.run["parametrisation"], "steps": run.run["steps"],
                           "curves": curves.to_dict(orient="list")}
        del run  # before the next fresh(), as in lr_sweep
        _release_memory()
    out.table = pd.DataFrame(rows).set_index(["method", "file"])
    out.categories = pd.DataFrame(cats).set_index(["method", "category"])
    return out
