"""Explore one unlearning run: a method, a forget size, a person; answers, attention and saliency before/after
(book chapter 11).

    from mlunlearn.explorer import Explorer, figure, table, widget
    ex = Explorer()                                  # the tiny model on the synthetic world
    ex.choices()                                     # {"method": (...), "forget": (5, 10, 15)}
    ex.profiles(5)                                   # [("019", "Nadia Petrakis"), ...]: the people of forget_5
    v = ex.view("ga", 5, "019")                      # trains GA on forget_5 once, then reuses it
    figure(v); table(v)                              # the portrait, attention and saliency; the answers
    widget(ex)                                       # the same as dropdowns (ipywidgets), in a notebook

Where each piece comes from:

- the choices: every method of the one registry (:data:`mlunlearn.methods.METHODS`), the benchmark's forget
  sizes (:data:`mlunlearn.bench.FORGET_SIZES`) and the people of the chosen ``forget_N`` split;
- the unlearned model: :func:`mlunlearn.engine.unlearn` with the settings ``mlunlearn bench`` resolves for
  the method (:class:`mlunlearn.bench.GridSpec` ``.resolved``: chapter 10's grid, whose settings are the
  method's defaults for the model's family), seed 0, on a fresh copy of the vanilla model, exactly as a
  bench cell runs it (:func:`mlunlearn.bench.run_cell`). ``settings`` (as ``--set`` gives them) changes
  them, e.g. ``{"max_steps": 1}`` for a quick look;
- the answers: the profile's open questions (MLLMU-Bench's ``Generation_Task``): every question about the
  portrait, asked with the image, and the first questions by name, asked without it; greedy replies with
  the evaluation's prompts (:func:`mlunlearn.eval.protocol.generate_replies`). A reply is *right* when it
  contains the fact the reference answer states (the biography value in the reference that the question
  does not name) as whole words; without such a value (a biography that does not spell it), when its
  ROUGE-L F against the reference is at least 0.5;
- attention and saliency (chapter 7): on the portrait with its "who is this" question and the vanilla
  model's trained answer, teacher-forced: :func:`mlunlearn.analysis.cross_modal_attention` from the answer's
  positions, averaged over layers and heads, on the patch grid; and integrated gradients of that answer's
  log-probability on the pixels, summed per patch (:func:`mlunlearn.analysis.pixel_attribution`). After
  unlearning the target stays the original answer, so the map says which patches push towards (red) or
  away from (blue) the name that was to be forgotten.

The cache. Each unlearned model is trained once: it is kept in memory (every one on the tiny model; the
last ``max_models`` on a larger one) and saved by the engine itself (``unlearn(output=...)``: safetensors,
``model/`` or ``trainable.safetensors`` beside ``run.json``) into ``<cache>/<method>-forget<N>-<digest>/``,
where ``<cache>`` is ``$MLUNLEARN_CACHE/explorer`` (default ``~/.cache/mlunlearn/explorer``) or the
``cache`` argument. The digest is a SHA-256 of the run's key (:meth:`Explorer.key`): the model and its
weights' digest (for local weights), the data's name (the synthetic world is made by the package's source,
below; a local benchmark folder is named, not hashed: give a changed copy a new name), the forget size, the
method and its hyper-parameters, the engine settings with the seed, quantization, device, the versions of
mlunlearn and torch, and a digest of the package's source. A later session with the same key loads the
folder instead of training; any change gives another folder. ``cache=False`` keeps nothing on disk.

A bad method, forget size or person is an :class:`ExplorerError`: one line naming the choices.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from mlunlearn.methods import MethodError

__all__ = ["Answer", "Explorer", "ExplorerError", "View", "cache_root", "figure", "is_right", "table", "widget",
           "FALLBACK_HTML"]

KEY_FILE = "explorer.json"  # beside the engine's run.json: the key the folder was trained for
NAME_QUESTIONS = 2  # questions by name (no image) shown per person
ROUGE_RIGHT = 0.5  # a reply without a spelled-out fact is right from this ROUGE-L F on
TINY_MODELS = ("tiny", "tiny-safety")
# What a stored notebook shows in place of the live widget (no kernel): tools/execute_notebooks.py keeps
# this text/html and drops the widget view from a cell marked NBVAL_IGNORE_OUTPUT.
FALLBACK_HTML = ("<p><em>The interactive explorer needs a running kernel: run this notebook (the Colab "
                 "button above, or Jupyter locally) to pick a method, a forget size and a person. The "
                 "figures below are the same explorer's output for fixed choices.</em></p>")


class ExplorerError(MethodError):
    """A choice the explorer does not have (method, forget size, person); one line naming the choices."""


def cache_root() -> Path:
    """``$MLUNLEARN_CACHE/explorer``, else ``$XDG_CACHE_HOME/mlunlearn/explorer`` or
    ``~/.cache/mlunlearn/explorer`` (where the package keeps its other generated data)."""
    from mlunlearn.benchmarks.safety import _cache_root

    return _cache_root() / "explorer"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_digest() -> str:
    """SHA-256 over the package's Python sources (this module excepted): a code change is a new run."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.name != "explorer.py":
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _weights_digest(model: str) -> str | None:
    """SHA-256 of the model's ``model.safetensors`` when the weights are local (the tiny models, a folder)."""
    from mlunlearn.models.loading import TINY, TINY_SAFETY

    if model == TINY:
        from mlunlearn.models.vanilla import ASSET_DIR as folder
    elif model == TINY_SAFETY:
        from mlunlearn.models.safety import ASSET_DIR as folder
    else:
        folder = Path(model).expanduser()
    file = Path(folder) / "model.safetensors"
    return _sha256(file) if file.is_file() else None


def _fact(reference: str, question: str, biography: dict) -> str | None:
    """The biography value the reference answer states and the question does not name (the longest)."""
    values = [str(v) for v in biography.values() if isinstance(v, (str, int)) and str(v).strip()]
    stated = [v for v in values if v.lower() in reference.lower() and v.lower() not in question.lower()]
    return max(stated, key=len) if stated else None


def is_right(reply: str, reference: str, fact: str | None) -> bool:
    """Whether ``reply`` gives the reference's fact (whole words, case and punctuation aside); without a
    fact, whether its ROUGE-L F against ``reference`` is at least :data:`ROUGE_RIGHT`."""
    from mlunlearn.eval.scoring import answer_matches, rouge_scores

    if fact:
        return answer_matches(reply, fact)
    return rouge_scores(reply, reference)["rougeL"] >= ROUGE_RIGHT


@dataclass
class Answer:
    """One question of a view: asked ``with_image`` (about the portrait) or by name; the reference answer, the
    fact it states, and the replies of the vanilla (``before``) and the unlearned (``after``) model."""

    question: str
    with_image: bool
    reference: str
    fact: str | None
    before: str
    after: str

    @property
    def right_before(self) -> bool:
        return is_right(self.before, self.reference, self.fact)

    @property
    def right_after(self) -> bool:
        return is_right(self.after, self.reference, self.fact)


@dataclass
class View:
    """What the explorer shows for (``method``, ``forget``, ``profile``).

    ``answers``: the questions with the replies before and after. ``attention``: ``{"before", "after"}`` →
    ``(grid, grid)`` mean attention from the answer's positions to each visual token (chapter 7's map; the
    scores of one query position sum to at most 1 over the visual tokens); ``image_share``: the same summed
    over the visual tokens and averaged over layers. ``saliency``: ``{"before", "after"}`` → ``(grid, grid)``
    integrated-gradients attributions of ``log p(answer)`` summed per patch (nats; they sum to about
    ``logp - logp_baseline``); ``logp`` / ``logp_baseline``: that log-probability with the portrait and with
    the mean-colour baseline; ``delta``: integrated gradients' relative convergence delta. ``example``: the
    question and trained answer the maps explain. ``run``: the run's method, settings and steps (from its
    ``run.json``).
    """

    method: str
    forget: int
    profile: str
    name: str
    image: object
    example: tuple
    answers: list
    attention: dict
    image_share: dict
    saliency: dict
    logp: dict
    logp_baseline: dict
    delta: dict
    run: dict = field(default_factory=dict)


class Explorer:
    """Choices, cached unlearned models and views for one model and benchmark (see the module docstring).

    ``model``/``data``: as everywhere (``MODEL``/``DATA`` of the chapters; ``quantization="4bit"`` for
    LLaVA-1.5-7B on a T4). ``settings``: ``--set``-style overrides of the grid's settings (engine settings
    for every method, ``METHOD.KEY`` for one). ``cache``: the disk cache folder (default
    :func:`cache_root`), or ``False``. ``ig_steps``/``ig_batch``: integrated gradients' steps and steps per
    forward pass (chapter 7's: 256 and 64 on the tiny model, 64 and 4 on LLaVA-1.5). ``progress``: a
    progress bar while training (off under ``TQDM_DISABLE``). ``max_models``: unlearned models kept in memory
    (default: all on the tiny model, one otherwise: a 7B model fills a GPU).
    """

    def __init__(self, model: str = "tiny", data: str = "toyworld", *, quantization: str | None = None,
                 device: str | None = None, settings: dict | None = None, cache=None, ig_steps: int | None = None,
                 ig_batch: int | None = None, max_new_tokens: int = 50, progress: bool = True,
                 max_models: int | None = None):
        from mlunlearn.bench import FORGET_SIZES
        from mlunlearn.methods import METHODS

        self.model_name, self.data_name, self.quantization, self.device = model, data, quantization, device
        self.settings = dict(settings or {})
        self.methods, self.forget_sizes = tuple(METHODS), tuple(FORGET_SIZES)
        self.resolve(self.methods[0])  # bad settings fail now, in one line
        tiny = model in TINY_MODELS
        self.cache = None if cache is False else Path(cache if cache is not None else cache_root()).expanduser()
        self.ig_steps = ig_steps or (256 if tiny else 64)
        self.ig_batch = ig_batch or (64 if tiny else 4)
        self.max_new_tokens, self.progress = max_new_tokens, progress
        self.max_models = max_models if max_models is not None else (None if tiny else 1)
        self._vanilla = None
        self._bench = None
        self._models: OrderedDict = OrderedDict()  # (method, forget) -> (model, processor, run summary)
        self._before: dict = {}  # (forget, profile) -> the vanilla model's half of a view
        self.trained: list = []  # (method, forget) of every run this explorer trained (not loaded)

    # -- the choices ----------------------------------------------------------------------------------------

    def choices(self) -> dict:
        """``{"method": every registered method, "forget": the forget sizes}``; people: :meth:`profiles`."""
        return {"method": self.methods, "forget": self.forget_sizes}

    @property
    def bench(self):
        if self._bench is None:
            from mlunlearn.data import open_benchmark

            self._bench = open_benchmark(self.data_name)
        return self._bench

    def _rows(self, forget: int) -> list:
        self.check_forget(forget)
        return self.bench.load(f"forget_{forget}")

    def profiles(self, forget: int) -> list:
        """``[(ID, name)]`` of the people in ``forget_{forget}``, in the split's order."""
        return [(row["ID"], _name(row)) for row in self._rows(forget)]

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise ExplorerError(f"unknown method {method!r}; choose one of {', '.join(self.methods)}")

    def check_forget(self, forget) -> None:
        if isinstance(forget, bool) or forget not in self.forget_sizes:
            raise ExplorerError(f"forget {forget!r} is not a forget size; choose one of "
                                f"{', '.join(map(str, self.forget_sizes))} (% of the people)")

    def row(self, forget: int, profile: str) -> dict:
        """The ``forget_{forget}`` row of ``profile`` (an ID such as ``"019"``)."""
        rows = self._rows(forget)
        for row in rows:
            if row["ID"] == str(profile):
                return row
        people = ", ".join(f"{r['ID']} ({_name(r)})" for r in rows[:6]) + (" ..." if len(rows) > 6 else "")
        raise ExplorerError(f"profile {profile!r} is not in forget_{forget}; choose one of {people}")

    # -- the runs -------------------------------------------------------------------------------------------

    def resolve(self, method: str) -> tuple:
        """``(method_kw, engine_kw)`` for ``method``: what ``mlunlearn bench`` resolves for it with this
        explorer's settings (chapter 10's grid: none, i.e. the method's defaults for the model's family)."""
        from mlunlearn.bench import GridError, GridSpec

        self.check_method(method)
        mine = {k: v for k, v in self.settings.items() if "." not in k or k.split(".", 1)[0] == method}
        try:
            return GridSpec(model=self.model_name, data=self.data_name, methods=(method,), settings=mine,
                            mia=False, relearn=False, benign=False).resolved[method]
        except GridError as err:
            raise ExplorerError(str(err)) from None

    def config(self, method: str):
        """The :class:`~mlunlearn.engine.UnlearnConfig` of the run: the grid's engine settings, seed 0 (a
        bench cell's ``UnlearnConfig(**engine_kw, seed=seed, progress=False)``), with this explorer's bar
        (off under ``TQDM_DISABLE``, the saving bar of the engine too: a notebook under nbval stores none)."""
        from mlunlearn.engine import UnlearnConfig
        from mlunlearn.utils import progress_enabled

        _, engine_kw = self.resolve(method)
        return UnlearnConfig(**{**engine_kw, "seed": 0, "progress": progress_enabled(self.progress)})

    def key(self, method: str, forget: int) -> dict:
        """Everything the unlearned model depends on (the disk cache's key; see the module docstring)."""
        import dataclasses

        from mlunlearn.methods import get_method
        from mlunlearn.records import _config_dict, canonical, environment
        from mlunlearn.utils import default_device

        self.check_forget(forget)
        method_kw, _ = self.resolve(method)
        config = dataclasses.replace(self.config(method), progress=False)  # a bar does not change the run
        return canonical({"format": 1, "model": self.model_name, "weights": _weights_digest(self.model_name),
                          "data": self.data_name, "forget": forget, "method": method,
                          "hyperparameters": get_method(method, **method_kw).settings(),
                          "config": _config_dict(config), "quantization": self.quantization,
                          "device": self.device or default_device(), "environment": environment(),
                          "source": _source_digest()})

    def folder(self, method: str, forget: int) -> Path | None:
        """The disk cache folder of the run (None without a disk cache)."""
        if self.cache is None:
            return None
        key = self.key(method, forget)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache / f"{method}-forget{forget}-{digest}"

    def vanilla(self):
        """``(model, processor)`` before unlearning, loaded once."""
        if self._vanilla is None:
            from mlunlearn.models import load_model

            self._vanilla = load_model(self.model_name, device=self.device, quantization=self.quantization)
        return self._vanilla

    def unlearned(self, method: str, forget: int):
        """``(model, processor, run)`` after unlearning: from memory, else from the disk cache, else trained
        (and saved)."""
        self.check_method(method)
        self.check_forget(forget)
        slot = (method, forget)
        if slot in self._models:
            self._models.move_to_end(slot)
            return self._models[slot]
        folder = self.folder(method, forget)
        entry = self._load(folder, method, forget) if folder is not None else None
        if entry is None:
            entry = self._train(method, forget, folder)
        self._models[slot] = entry
        while self.max_models is not None and len(self._models) > self.max_models:
            self._models.popitem(last=False)
            _free()
        return entry

    def _load(self, folder: Path, method: str, forget: int):
        from mlunlearn.models import load_model
        from mlunlearn.models.loading import ModelLoadError

        try:
            stored = json.loads((folder / KEY_FILE).read_text())
            run = json.loads((folder / "run.json").read_text())
        except (OSError, ValueError):
            return None
        if stored != self.key(method, forget):
            return None
        if self.model_name not in TINY_MODELS:
            self._drop_vanilla()
        try:
            model, processor = load_model(str(folder), device=self.device, quantization=self.quantization)
        except ModelLoadError:
            return None  # a damaged folder: train again over it
        return model, processor, _summary(run)

    def _drop_vanilla(self) -> None:
        self._vanilla = None
        _free()

    def _train(self, method: str, forget: int, folder: Path | None):
        """One bench cell's unlearning (:func:`mlunlearn.bench.run_cell`), saved by the engine into ``folder``."""
        from mlunlearn.engine import unlearn
        from mlunlearn.methods import get_method
        from mlunlearn.models import load_model

        method_kw, _ = self.resolve(method)
        if self.model_name in TINY_MODELS:
            base, processor = self.vanilla()
            model = copy.deepcopy(base)
        else:  # as bench does for a 7B cell: one model on the GPU, the vanilla is reloaded when needed
            self._drop_vanilla()
            model, processor = load_model(self.model_name, device=self.device, quantization=self.quantization)
        result = unlearn(model, self.bench, forget, get_method(method, **method_kw), self.config(method),
                         output=folder, processor=processor, overwrite=True)
        if folder is not None:
            from mlunlearn.utils import write_atomic

            write_atomic(folder / KEY_FILE, json.dumps(self.key(method, forget), indent=1, sort_keys=True))
        self.trained.append((method, forget))
        return result.model, processor, _summary(result.run)

    # -- the view -------------------------------------------------------------------------------------------

    def questions(self, forget: int, profile: str) -> list:
        """``[(question, with_image, reference, fact)]``: the person's open questions about the portrait, then
        the first :data:`NAME_QUESTIONS` by name."""
        from mlunlearn.eval.protocol import IMAGE, TEXT

        row = self.row(forget, profile)
        biography = _biography(row)
        items = [q for q in (row.get("Generation_Task") or []) if q.get("Type") in (IMAGE, TEXT)]
        chosen = [q for q in items if q["Type"] == IMAGE] + [q for q in items if q["Type"] == TEXT][:NAME_QUESTIONS]
        return [(q["Question"], q["Type"] == IMAGE, q["Ground_Truth"],
                 _fact(q["Ground_Truth"], q["Question"], biography)) for q in chosen]

    def example(self, forget: int, profile: str):
        """The teacher-forced example the maps explain: the portrait, its "who is this" question (the row's
        ``question``; else its first question about the portrait) and the trained answer."""
        from mlunlearn.collate import Example
        from mlunlearn.data import decode_image
        from mlunlearn.eval import prompts

        row = self.row(forget, profile)
        if row.get("question") and row.get("answer"):
            question, answer = row["question"], row["answer"]
        else:
            question, _, answer, _ = next(q for q in self.questions(forget, profile) if q[1])
        return Example(prompts.qa_prompt(question, True), answer, decode_image(row["image"])), question

    def _measure(self, model, processor, forget: int, profile: str) -> dict:
        """Replies, attention and saliency of one model for one person (one half of a view)."""
        from mlunlearn.analysis import cross_modal_attention, pixel_attribution
        from mlunlearn.eval import prompts
        from mlunlearn.eval.protocol import generate_replies

        example, _ = self.example(forget, profile)
        asked = self.questions(forget, profile)
        replies = generate_replies(model, processor, [prompts.generation_prompt(q, img) for q, img, _, _ in asked],
                                   [[example.image] if img else [] for _, img, _, _ in asked],
                                   max_new_tokens=self.max_new_tokens)
        attention = cross_modal_attention(model, processor, example, over="answer")
        ig = pixel_attribution(model, processor, example, n_steps=self.ig_steps, internal_batch_size=self.ig_batch)
        return {"replies": replies, "attention": attention.grid_map()[0],
                "share": float(attention.layer_profile()[0].mean()), "saliency": ig.map[0],
                "logp": float(ig.target[0]), "logp_baseline": float(ig.baseline_target[0]),
                "delta": float(ig.relative_delta[0])}

    def view(self, method: str, forget: int, profile: str) -> View:
        """Everything :func:`figure` and :func:`table` show for one choice (trains the run on first use)."""
        self.check_method(method)
        self.check_forget(forget)
        row = self.row(forget, profile)
        slot = (forget, row["ID"])
        if slot not in self._before:  # the vanilla model's half, once per person
            self._before[slot] = self._measure(*self.vanilla(), forget, row["ID"])
        if self.model_name not in TINY_MODELS:  # a 7B model: one on the GPU at a time
            self._drop_vanilla()
        after_model, processor, run = self.unlearned(method, forget)
        before, after = self._before[slot], self._measure(after_model, processor, forget, row["ID"])
        example, question = self.example(forget, row["ID"])
        answers = [Answer(q, img, ref, fact, b, a) for (q, img, ref, fact), b, a
                   in zip(self.questions(forget, row["ID"]), before["replies"], after["replies"])]
        pair = lambda k: {"before": before[k], "after": after[k]}  # noqa: E731
        return View(method=method, forget=forget, profile=row["ID"], name=_name(row), image=example.image,
                    example=(question, example.answer), answers=answers, attention=pair("attention"),
                    image_share=pair("share"), saliency=pair("saliency"), logp=pair("logp"),
                    logp_baseline=pair("logp_baseline"), delta=pair("delta"), run=run)


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch comes with the package
        pass


def _biography(row: dict) -> dict:
    bio = row.get("biography") or {}
    if isinstance(bio, str):
        try:
            bio = json.loads(bio)
        except ValueError:
            return {}
    return bio if isinstance(bio, dict) else {}


def _name(row: dict) -> str:
    return str(_biography(row).get("Name") or row["ID"])


def _summary(run: dict) -> dict:
    """What a view says about its run (equal whether trained now or loaded: no timings)."""
    config = run.get("config", {})
    return {"method": run.get("method"), "forget": run.get("forget"), "seed": run.get("seed"),
            "lr": config.get("lr"), "epochs": config.get("epochs"), "batch_size": config.get("batch_size"),
            "steps": run.get("steps"), "parametrisation": run.get("parametrisation"),
            "hyperparameters": run.get("hyperparameters")}


# -- what is shown ---------------------------------------------------------------------------------------------


def table(view: View):
    """A pandas table: one row per question (about the portrait or by name), the reply before and after
    unlearning, and whether each is right (✓/✗)."""
    import pandas as pd

    mark = {True: "✓", False: "✗"}
    rows = [{"asked": "image" if a.with_image else "name", "question": a.question,
             "before": a.before, "✓ before": mark[a.right_before],
             "after": a.after, "✓ after": mark[a.right_after]} for a in view.answers]
    return pd.DataFrame(rows, index=pd.RangeIndex(1, len(rows) + 1, name="#"))


def figure(view: View, width: float | None = None):
    """One figure at the book's column width: the portrait, attention before and after (one colour scale),
    integrated gradients before and after (one scale, centred on 0: red supports the original answer)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from mlunlearn.viz import COLUMN_WIDTH, heatmap_over_image

    width = width or COLUMN_WIDTH
    att = [np.asarray(view.attention[k], dtype=float) for k in ("before", "after")]
    sal = [np.asarray(view.saliency[k], dtype=float) for k in ("before", "after")]
    fig = plt.figure(figsize=(width, 2.2))
    grid = fig.add_gridspec(1, 8, width_ratios=[1, 0.12, 1, 1, 0.07, 0.5, 1, 1], wspace=0.08,
                            left=0.01, right=0.93, top=0.72, bottom=0.04)
    portrait = fig.add_subplot(grid[0])
    portrait.imshow(np.asarray(view.image), interpolation="nearest")
    portrait.set_title(f"{view.name}\n({view.profile})", fontsize=9)
    portrait.set_xticks([]), portrait.set_yticks([])
    portrait.grid(False)
    low, high = min(a.min() for a in att), max(a.max() for a in att)
    bound = max(np.abs(s).max() for s in sal) or 1.0
    panels = [(grid[2], att[0], "attention\nbefore", False), (grid[3], att[1], "attention\nafter", False),
              (grid[6], sal[0], "saliency (IG)\nbefore", True), (grid[7], sal[1], "saliency (IG)\nafter", True)]
    shown = []
    for cell, values, title, signed in panels:
        ax = fig.add_subplot(cell)
        shown.append(heatmap_over_image(view.image, values, ax, diverging=True, vmax=bound) if signed
                     else heatmap_over_image(view.image, values, ax, vmin=low, vmax=high))
        ax.set_title(title, fontsize=9)
    for image, cell, label in ((shown[1], grid[4], "attention"), (shown[3], None, "nats")):
        cax = fig.add_subplot(cell) if cell is not None else fig.add_axes((0.945, 0.04, 0.012, 0.68))
        bar = fig.colorbar(image, cax=cax)
        bar.ax.tick_params(labelsize=7)
        bar.set_label(label, fontsize=8)
    fig.suptitle(f"{view.method}, forget {view.forget}%: attention from, and saliency of, the answer "
                 f"\u201c{view.example[1]}\u201d", fontsize=9)
    return fig


# -- the widget ------------------------------------------------------------------------------------------------


def widget(explorer: Explorer | None = None, method: str | None = None, forget: int | None = None, **kwargs):
    """The explorer as ipywidgets: a method dropdown, forget-size toggles, a person dropdown (refilled when
    the forget size changes), a "show" button, and an Output area that receives :func:`figure` and
    :func:`table` (and the training's progress bar the first time a run is needed). ``kwargs`` build an
    :class:`Explorer` when none is given. Returns the :class:`ExplorerWidget` (display it, or leave it last
    in a cell); without a kernel its stored output is :data:`FALLBACK_HTML`."""
    return ExplorerWidget(explorer or Explorer(**kwargs), method=method, forget=forget)


class ExplorerWidget:
    """The UI of :func:`widget`; ``box`` is the ipywidgets container. The handlers run without a browser:
    set ``method.value``/``forget.value``/``profile.value`` and call :meth:`show` (the button's handler)."""

    def __init__(self, explorer: Explorer, method: str | None = None, forget: int | None = None):
        import ipywidgets as w

        self.explorer = explorer
        choices = explorer.choices()
        method = method or ("ga" if "ga" in choices["method"] else choices["method"][0])
        forget = forget or choices["forget"][0]
        explorer.check_method(method)
        explorer.check_forget(forget)
        self.method = w.Dropdown(options=list(choices["method"]), value=method, description="method")
        self.forget = w.ToggleButtons(options=[(f"{f}%", f) for f in choices["forget"]], value=forget,
                                      description="forget")
        self.forget.style.button_width = "4.5em"
        self.profile = w.Dropdown(description="person")
        self.button = w.Button(description="show", button_style="primary", icon="eye")
        self.output = w.Output()
        self.status = w.HTML()
        self.view = None  # the last view shown
        self._fill_profiles()
        self.forget.observe(self._on_forget, names="value")
        self.button.on_click(self._on_show)
        self.box = w.VBox([w.HBox([self.method, self.profile]), w.HBox([self.forget, self.button]), self.status,
                           self.output])

    def _fill_profiles(self) -> None:
        people = self.explorer.profiles(self.forget.value)
        self.profile.options = [(f"{pid} {name}", pid) for pid, name in people]
        self.profile.value = people[0][0]

    def _on_forget(self, change) -> None:
        self._fill_profiles()

    def _on_show(self, _button=None) -> None:
        self.show()

    def show(self) -> View | None:
        """Compute the chosen view and put its figure and table in the Output area (replacing the last).

        The computation runs inside the Output area, so a training run's progress bar shows there; the
        figure (a PNG) and the table are appended as display data, which works with or without a kernel."""
        import io

        import matplotlib.pyplot as plt
        from IPython.display import Image

        self.output.outputs = ()
        choice = (self.method.value, self.forget.value, self.profile.value)
        self.status.value = f"<em>{choice[0]}, forget {choice[1]}%, person {choice[2]}: working...</em>"
        error = None
        with self.output:  # in a kernel: the training's progress bar lands here
            try:  # caught inside: Output.__exit__ would print a whole traceback
                view = self.explorer.view(*choice)
            except (MethodError, ValueError, RuntimeError) as err:
                error = " ".join(str(err).split())
        self.status.value = ""
        if error is not None:
            self.output.outputs = ()
            self.output.append_stdout(f"error: {error}\n")
            return None
        fig = figure(view)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=200)  # retina: drawn at twice the size it is shown at
        plt.close(fig)
        self.output.outputs = ()  # the finished progress bar goes
        self.output.append_display_data(Image(data=buffer.getvalue(), format="png",
                                              width=int(fig.get_figwidth() * 100)))
        self.output.append_display_data(table(view))
        self.view = view
        return view

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.box._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data = dict(data or {})
        data["text/html"] = FALLBACK_HTML
        data["text/plain"] = "explorer (run the notebook to use it)"
        return data
