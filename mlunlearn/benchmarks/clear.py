"""CLEAR (arXiv 2410.18057; Hugging Face dataset ``therem/CLEAR``): reading it and its TOFU-style evaluation.

``--data`` strings: ``clear`` (the hub, through ``datasets``; needs the network), ``clear:<folder>`` (a local
copy), or a plain folder in CLEAR's layout (it holds ``forget01|05|10`` but no MLLMU-Bench ``forget_5``).
The local layout is the hub's: ``{folder}/{config}/train-00000-of-00001.parquet`` (``real_world`` once had a
``test-…`` file; any ``*.parquet`` in the config's folder is read), images as ``{bytes, path}`` structs.

**Configs and columns** (the hub's dataset card; every name as published):

========================================  ==================================================================
config                                    columns
========================================  ==================================================================
``forget01|05|10``, ``retain99|95|90``,   ``image``, ``caption``, ``name`` (200 fictitious authors' faces)
``full``
``…+tofu`` (the same sizes)               ``image``, ``caption``, ``question``, ``answer``: rows without an
                                          image are TOFU's text question-answer pairs
``forget01|05|10_perturbed``              ``image``, ``caption``, ``name``, ``perturbed_captions`` (list),
                                          ``paraphrased_caption``, ``perturbed_names`` (list)
``retain_perturbed``                      ``image``, ``caption``, ``paraphrased_caption``,
                                          ``perturbed_captions`` (list); ``name`` and ``perturbed_names``
                                          too in the upload CLEAR's ``config/mm/eval.yaml`` reads (optional
                                          here: the first upload lacked them)
``real_faces``                            ``image``, ``answer`` (a real person's name), ``options`` (wrong names)
``real_world``                            ``question``, ``answer``, ``image``, ``options`` (and ``prompt``)
========================================  ==================================================================

**Evaluation** (:func:`evaluate_clear`, after CLEAR's ``mm/eval.py`` and ``mm/calculate_metrics.py`` in
``somvy/multimodal_unlearning``): on ``{forget}_perturbed`` (forget) and ``retain_perturbed`` (retain), each
image is asked one of CLEAR's caption questions; the greedy reply is scored by ROUGE-L *recall* against
``caption``; ``P̄(caption)`` is the normalised probability; the truth ratio compares ``paraphrased_caption``
with ``perturbed_captions`` (:mod:`mlunlearn.eval.tofu`). On ``real_faces`` (question "The name of the person
on the image is ", as CLEAR's ``random_faces``) and ``real_world`` (its own ``question``): the normalised option
probability of ``answer`` against ``options``, and the truth ratio of ``options`` against ``answer``. Face
recognition (``forget_face``, ``retain_face``: the same question about the ``*_perturbed`` images, ``name``
against ``perturbed_names``) is scored the same way, in the truth ratio's forget or retain form. ``summary`` holds
CLEAR's Forget / Retain / Real metrics: harmonic means of four of these numbers each (:data:`SUMMARY_METRICS`,
after ``mm/build_vllm_table.py``).
Forget quality needs a second result, of a model trained without the forget set (``retain{100-N}``):
``reference=`` (``mlunlearn eval --gold``).

**Unlearning** (:meth:`Clear.unlearning_data`): forget ``{forgetNN}+tofu``, retain ``retain{100-N}+tofu``, each
image row a caption question → its ``caption`` and each text row TOFU's ``question`` → ``answer``, as CLEAR's
``MMMixedForgetDataset``; ``modality="visual"`` or ``"text"`` keeps one kind (CLEAR's single-modality runs).

Choices where CLEAR's code is silent or random (the README says so too):

- CLEAR draws the caption question with an unseeded ``random.choice`` in each data loader, so the caption,
  paraphrase and perturbed captions of one image may be asked different questions. Here one question per
  image, drawn from ``random.Random(f"{seed}-{config}-{row}")``, serves all of them: reproducible, and the
  truth ratio compares answers to one prompt.
- The prompt is the package's ``USER: <image>\\n{question}\\nASSISTANT:`` (:func:`~mlunlearn.eval.prompts.qa_prompt`,
  what the tiny model was trained on). CLEAR applies the processor's chat template; llava-hf's LLaVA-1.5 template
  writes ``USER: <image>\\n{question} ASSISTANT:`` (a space, not a newline, before ``ASSISTANT:``).
- CLEAR's ``calculate_metrics.py`` averages *all* items' perturbed losses into one number
  (``.mean()`` without ``axis``); TOFU's ``aggregate_eval_stat.py`` averages per item (``mean(axis=-1)``). We
  follow TOFU: a truth ratio per item.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlunlearn.data.bench import Benchmark, BenchmarkError

from . import UnlearningBenchmark, register_benchmark

HUB_ID = "therem/CLEAR"
FORGET_CONFIGS = ("forget01", "forget05", "forget10")
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# --forget percentages of the command line (which offers 5, 10, 15) → CLEAR's forget configs.
PERCENT_CONFIG = {1: "forget01", 5: "forget05", 10: "forget10"}
REAL_CONFIGS = ("real_faces", "real_world")

_BASE = ("image", "caption", "name")
_TOFU = ("image", "caption", "question", "answer")
_PERTURBED = ("image", "caption", "name", "perturbed_captions", "paraphrased_caption", "perturbed_names")
COLUMNS: dict = {
    **{c: _BASE for c in (*FORGET_CONFIGS, *RETAIN_OF.values(), "full")},
    **{f"{c}+tofu": _TOFU for c in (*FORGET_CONFIGS, *RETAIN_OF.values(), "full")},
    **{f"{c}_perturbed": _PERTURBED for c in FORGET_CONFIGS},
    "retain_perturbed": ("image", "caption", "paraphrased_caption", "perturbed_captions"),
    "real_faces": ("image", "answer", "options"),
    "real_world": ("question", "answer", "image", "options"),
}

# CLEAR's mm/dataset.py: IMAGE_CAPTION_QUESTIONS and the face-recognition question ("random_faces").
CAPTION_QUESTIONS = (
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)
FACE_QUESTION = "The name of the person on the image is "


def is_clear_source(source) -> bool:
    """Whether a ``--data`` string names CLEAR: ``clear``, ``clear:<folder>``, or a folder in CLEAR's layout."""
    if not isinstance(source, str):
        return False
    if source == "clear" or source.startswith("clear:"):
        return True
    folder = Path(source).expanduser()
    return (folder.is_dir() and not (folder / "forget_5").is_dir()
            and any((folder / c).is_dir() for c in FORGET_CONFIGS))


def _fetch_hint(config: str, folder) -> str:
    return (f"fix: copy it from the hub (hf download {HUB_ID} --repo-type dataset --include "
            f"'{config}/*' --local-dir {folder})")


class ClearFiles(Benchmark):
    """CLEAR's configs as rows (dicts in its columns), read from a local copy or the hub and checked.

    A config that is missing, a file that is not parquet, or a file without one of the config's columns
    (:data:`COLUMNS`) is a one-line :class:`BenchmarkError` naming the file and the fix.
    """

    def available(self) -> list:
        if self.folder is not None:
            return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        return list(COLUMNS)  # the hub's (not listed without a network call)

    def has(self, config: str) -> bool:
        return config in self.available()

    def _read(self, config: str) -> list:
        wanted = COLUMNS.get(config)
        if wanted is None:
            raise BenchmarkError(f"CLEAR has no config {config!r}; its configs: {', '.join(COLUMNS)}")
        if self.folder is None:
            return _hub_rows(config, wanted)
        folder = self.folder / config
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not files:
            raise BenchmarkError(f"no CLEAR config '{config}' in {self.folder} (no {config}/*.parquet); "
                                 + _fetch_hint(config, self.folder))
        tables = []
        for f in files:
            try:
                table = pq.read_table(f)
            except (pa.ArrowInvalid, OSError) as exc:
                raise BenchmarkError(f"cannot read {f} ({type(exc).__name__}); is it a parquet file? "
                                     + _fetch_hint(config, self.folder)) from None
            _check_columns(table.column_names, wanted, str(f), config)
            tables.append(table.select(list(dict.fromkeys([*wanted, *table.column_names]))))
        rows = pa.concat_tables(tables, promote_options="permissive").to_pylist()
        if not rows:
            raise BenchmarkError(f"CLEAR config '{config}' in {self.folder} has no rows; "
                                 + _fetch_hint(config, self.folder))
        return rows

    def __repr__(self) -> str:
        return f"ClearFiles({self.name!r})"


def _check_columns(have, wanted, where: str, config: str) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise BenchmarkError(f"{where} has no column {', '.join(map(repr, missing))} (it has {sorted(have)}); CLEAR's "
                             f"'{config}' has {', '.join(wanted)}; fix: use the hub's file for {config}")


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_rows(config: str, wanted) -> list:
    """One config of ``therem/CLEAR`` through ``datasets`` (images kept as bytes). Needs the network; refused
    when ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` is set, and never called by the tests."""
    if _offline():
        raise BenchmarkError(f"--data clear reads {HUB_ID} from the hub, but HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is "
                             "set; fix: pass a local copy as clear:<folder> (configs as {config}/train-*.parquet)")
    try:
        import datasets

        parts = datasets.load_dataset(HUB_ID, config)
        ds = parts[next(iter(parts))]  # each config has one split (train; real_world once had test)
        if "image" in ds.column_names:
            ds = ds.cast_column("image", datasets.Image(decode=False))
        rows = ds.to_list()
    except Exception as exc:  # offline, a typo, a changed hub: one line, with the fix
        raise BenchmarkError(f"cannot load {HUB_ID} config '{config}' ({type(exc).__name__}); check the network, or "
                             "pass a local copy as clear:<folder>") from None
    _check_columns(list(rows[0]) if rows else [], wanted, f"{HUB_ID} config '{config}'", config)
    return rows


def open_clear(source: str = "clear") -> ClearFiles:
    """The files of ``clear`` (hub), ``clear:<folder>`` or a folder in CLEAR's layout."""
    if source == "clear":
        return ClearFiles(source, hub_id=HUB_ID)
    rest = source.split(":", 1)[1] if source.startswith("clear:") else source
    folder = Path(rest).expanduser()
    if not rest.strip() or not folder.is_dir():
        raise BenchmarkError(f"no CLEAR folder at {rest!r}; use clear (the hub) or clear:<folder> holding "
                             "{config}/train-*.parquet")
    return ClearFiles(source, folder=folder)


def forget_config(forget) -> str:
    """``"forget05"``, ``5`` or ``None`` (→ forget05) as CLEAR's forget config name."""
    if forget is None:
        return "forget05"
    if isinstance(forget, int) and not isinstance(forget, bool):
        if forget not in PERCENT_CONFIG:
            raise BenchmarkError(f"CLEAR has no forget {forget}%; use 1, 5 or 10 (forget01, forget05, forget10)")
        return PERCENT_CONFIG[forget]
    if forget not in FORGET_CONFIGS:
        raise BenchmarkError(f"CLEAR has no forget split {forget!r}; use one of {', '.join(FORGET_CONFIGS)}")
    return forget


# ------------------------------------------------------------------------------------------ benchmark

@register_benchmark
class Clear(UnlearningBenchmark):
    name = "clear"
    summary_line = "clear, clear:<folder> or a folder in CLEAR's hub layout (forget01|05|10, *_perturbed, real_faces)"
    splits = FORGET_CONFIGS

    def __init__(self, source: str = "clear", files: ClearFiles | None = None):
        self.source = source
        self.files = files if files is not None else open_clear(source)

    @classmethod
    def accepts(cls, source: str) -> bool:
        return is_clear_source(source)

    def unlearning_data(self, split, modality: str = "both", seed: int = 0):
        """Forget and retain examples of ``split`` (``forget01|05|10`` or 1, 5, 10), as CLEAR's
        ``MMMixedForgetDataset`` builds them: an image row is one of :data:`CAPTION_QUESTIONS` about the face
        → its ``caption``; a row without an image (TOFU's) is its ``question`` → ``answer`` as text.

        ``modality``: ``"both"`` reads ``{split}+tofu`` / ``retain{100-N}+tofu`` (CLEAR's "both" runs),
        ``"visual"`` ``{split}`` / ``retain{100-N}`` (captions only), ``"text"`` the ``+tofu`` files' text rows only.
        The people (``forget_ids``, ``retain_ids``) are the ``name`` column of ``{split}`` and ``retain{100-N}``.
        The caption question of row i is drawn from ``random.Random(f"{seed}-{config}-{i}")``. ``knowledge``
        (MMUnlearner's text-only preserve set) is every text pair of the two ``+tofu`` files (None for
        ``"visual"``). Prompt Decouple (``pd=``) is not supported on the mixed data: the engine asks every forget
        prompt about a retain image, and CLEAR's text rows have none.
        """
        from mlunlearn.collate import Example
        from mlunlearn.data.unlearning import UnlearningData, UnlearningDataError
        from mlunlearn.eval.prompts import qa_prompt

        forget = forget_config(split)
        retain = RETAIN_OF[forget]
        if modality not in ("both", "visual", "text"):
            raise BenchmarkError(f"modality={modality!r}: use both, visual or text")
        suffix = "" if modality == "visual" else "+tofu"

        def examples(config: str) -> list:
            out = []
            for i, row in enumerate(self.files.load(config)):
                where = f"CLEAR config '{config}' row {i}"
                if row.get("image") is not None:
                    if modality == "text":
                        continue
                    question = random.Random(f"{seed}-{config}-{i}").choice(CAPTION_QUESTIONS)
                    out.append(Example(qa_prompt(question, True), _text(row, "caption", where), _image(row, where)))
                else:
                    out.append(Example(qa_prompt(_text(row, "question", where), False), _text(row, "answer", where)))
            return out

        forget_ex, retain_ex = examples(forget + suffix), examples(retain + suffix)
        forget_ids = sorted({r["name"] for r in self.files.load(forget)})
        retain_ids = sorted({r["name"] for r in self.files.load(retain)})
        overlap = sorted(set(forget_ids) & set(retain_ids))
        if overlap:
            raise UnlearningDataError(f"{len(overlap)} people are in both {forget} and {retain} "
                                      f"({', '.join(overlap[:3])}); the forget and retain sets must be disjoint")
        for config, ex in ((forget + suffix, forget_ex), (retain + suffix, retain_ex)):
            if not ex:
                raise UnlearningDataError(f"CLEAR config '{config}' gives no {modality} examples; choose another "
                                          "modality or check the file")
        # MMUnlearner's preserve set for the language model: text-only pairs of every person, forget included
        # (MLLMU-Bench's come from Full_Set); here TOFU's pairs of forget + retain, i.e. of full+tofu.
        knowledge = [e for e in forget_ex + retain_ex if e.image is None] if suffix else None
        return UnlearningData(forget=forget_ex, retain=retain_ex, forget_ids=forget_ids, retain_ids=retain_ids,
                              knowledge=knowledge or None,
                              source=f"{self.source} {forget + suffix} - {retain + suffix}")

    def evaluate(self, model, processor, split="forget05", **options):
        return evaluate_clear(model, processor, self, forget=split, **options)

    def __repr__(self) -> str:
        return f"Clear({self.source!r})"


# ------------------------------------------------------------------------------------------ evaluation

@dataclass
class ClearResult:
    """Per-set metrics and per-item records of :func:`evaluate_clear`; ``to_json()`` is what ``eval`` writes."""

    sets: dict  # {"forget": {...}, "retain": {...}, "real_faces": {...}, "real_world": {...}}
    records: list = field(default_factory=list)
    forget_quality: dict | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        fq = self.forget_quality or {"ks_p_value": None, "one_minus_js": None,
                                     "why_none": "needs a retain-only (gold) model's CLEAR result on the same forget "
                                                 "split: pass reference= (mlunlearn eval --gold RESULT.json)"}
        return {**self.sets, "summary": summary_metrics(self.sets), "forget_quality": fq, "settings": self.meta}

    def summary(self):
        import pandas as pd

        keys = ("rougeL_recall", "probability", "truth_ratio", "option_probability")
        return pd.DataFrame({name: {k: s.get(k) for k in keys} for name, s in self.sets.items()}).T

    def save_json(self, path):
        from mlunlearn.utils import write_atomic

        return write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    def save_records(self, path):
        from mlunlearn.utils import write_atomic

        return write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))


def _image(row: dict, where: str):
    from mlunlearn.data import decode_image

    try:
        return decode_image(row["image"])
    except BenchmarkError as err:
        raise BenchmarkError(f"{where}: {err}") from None
    except Exception as exc:  # PIL raises several unrelated types for a bad file
        raise BenchmarkError(f"{where}: unreadable image ({type(exc).__name__}); fix: store it as PNG or JPEG "
                             "bytes") from None


def _answers(row: dict, column: str, where: str) -> list:
    values = row.get(column)
    if values is None or isinstance(values, str) or not len(values) or not all(isinstance(v, str) for v in values):
        raise BenchmarkError(f"{where} column '{column}' is {values!r}, not a non-empty list of strings; fix: use the "
                             "hub's file")
    return list(values)


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkError(f"{where} column '{column}' is {value!r}, not a non-empty string; fix: use the hub's file")
    return value


def _nll_groups(model, processor, prompts, images, answers, batch_size) -> list:
    """Mean token NLL of every answer of every item: ``answers[i]`` is a list; returns a list of arrays."""
    from mlunlearn.collate import Example
    from mlunlearn.eval.tofu import answer_nll

    flat = [Example(p, a, img) for p, img, group in zip(prompts, images, answers) for a in group]
    nll = answer_nll(model, processor, flat, batch_size=batch_size)
    out, k = [], 0
    for group in answers:
        out.append(nll[k:k + len(group)])
        k += len(group)
    return out


def _caption_set(model, processor, files, config, role, *, limit, seed, batch_size, max_new_tokens, truth_mean,
                 progress, records) -> dict:
    """ROUGE-L recall of generated captions, P̄(caption) and truth ratios on one ``*_perturbed`` config."""
    from mlunlearn.eval.prompts import qa_prompt
    from mlunlearn.eval.protocol import generate_replies
    from mlunlearn.eval.tofu import normalised_probability, rouge_l_recall, truth_ratio, truth_ratio_score

    rows = files.load(config)[:limit]
    where = [f"CLEAR config '{config}' row {i}" for i in range(len(rows))]
    questions = [random.Random(f"{seed}-{config}-{i}").choice(CAPTION_QUESTIONS) for i in range(len(rows))]
    prompts = [qa_prompt(q, True) for q in questions]
    images = [_image(r, w) for r, w in zip(rows, where)]
    captions = [_text(r, "caption", w) for r, w in zip(rows, where)]
    paraphrased = [_text(r, "paraphrased_caption", w) for r, w in zip(rows, where)]
    perturbed = [_answers(r, "perturbed_captions", w) for r, w in zip(rows, where)]
    replies = generate_replies(model, processor, prompts, [[r["image"]] for r in rows], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, sources=where, progress=progress,
                               desc=f"CLEAR {config}")
    groups = _nll_groups(model, processor, prompts, images,
                         [[c, p, *q] for c, p, q in zip(captions, paraphrased, perturbed)], batch_size)
    caption_nll = np.array([g[0] for g in groups])
    ratios = np.array([truth_ratio(g[1:2], g[2:][None, :], mean=truth_mean)[0] for g in groups])
    recall = [rouge_l_recall(r, c) for r, c in zip(replies, captions)]
    probability = normalised_probability(caption_nll)
    for i, row in enumerate(rows):
        records.append({"set": role, "config": config, "row": i, "question": questions[i], "reply": replies[i],
                        "reference": captions[i], "rougeL_recall": recall[i], "probability": float(probability[i]),
                        "truth_ratio": float(ratios[i])})
    kind = "forget" if role == "forget" else "retain"
    return {"config": config, "items": len(rows), "rougeL_recall": float(np.mean(recall)),
            "probability": float(np.mean(probability)), "truth_ratio": truth_ratio_score(ratios, kind),
            "truth_ratio_form": f"{kind}: " + ("mean(min(R, 1/R))" if kind == "forget" else "mean(max(0, 1 - R))"),
            "truth_ratios": [float(r) for r in ratios]}


def _options_set(model, processor, files, config, role, *, answer_col, options_col, kind, limit, batch_size,
                 max_new_tokens, truth_mean, progress, records) -> dict:
    """One multiple-choice set: the normalised option probability of ``answer_col`` against ``options_col``, its
    truth ratio (``kind``: TOFU's forget or retain form) and the ROUGE-L recall of the greedy reply.

    ``real_faces`` and the face-recognition sets ask CLEAR's "The name of the person on the image is ";
    ``real_world`` asks its own ``question`` (with its image, or text-only when it has none).
    """
    from mlunlearn.eval.prompts import qa_prompt
    from mlunlearn.eval.protocol import generate_replies
    from mlunlearn.eval.tofu import option_probability, rouge_l_recall, truth_ratio, truth_ratio_score

    rows = files.load(config)[:limit]
    prompts, images, answers, where = [], [], [], []
    for i, row in enumerate(rows):
        where.append(f"CLEAR config '{config}' row {i}")
        question = _text(row, "question", where[i]) if config == "real_world" else FACE_QUESTION
        has_image = row.get("image") is not None
        prompts.append(qa_prompt(question, has_image))
        images.append(_image(row, where[i]) if has_image else None)
        answers.append([_text(row, answer_col, where[i]), *_answers(row, options_col, where[i])])
    replies = generate_replies(model, processor, prompts, [[r["image"]] if r.get("image") is not None else []
                                                           for r in rows],
                               batch_size=batch_size, max_new_tokens=max_new_tokens, sources=where,
                               progress=progress, desc=f"CLEAR {role}")
    groups = _nll_groups(model, processor, prompts, images, answers, batch_size)
    probs = np.array([option_probability(g[:1], g[None, 1:])[0] for g in groups])
    ratios = np.array([truth_ratio(g[:1], g[None, 1:], mean=truth_mean)[0] for g in groups])
    recall = [rouge_l_recall(r, a[0]) for r, a in zip(replies, answers)]
    for i, (p, r) in enumerate(zip(probs, ratios)):
        records.append({"set": role, "config": config, "row": i, "prompt": prompts[i], "reply": replies[i],
                        "reference": answers[i][0], "rougeL_recall": recall[i], "option_probability": float(p),
                        "truth_ratio": float(r)})
    return {"config": config, "items": len(rows), "rougeL_recall": float(np.mean(recall)),
            "option_probability": float(np.mean(probs)), "truth_ratio": truth_ratio_score(ratios, kind),
            "truth_ratio_form": f"{kind}: " + ("mean(min(R, 1/R))" if kind == "forget" else "mean(max(0, 1 - R))"),
            "chance": float(np.mean([1.0 / len(a) for a in answers])), "truth_ratios": [float(r) for r in ratios]}


def _hmean(values) -> float:
    """Harmonic mean (0 when any value is 0), as CLEAR's tables use ``scipy.stats.hmean``."""
    values = [float(v) for v in values]
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1 / v for v in values)


# CLEAR's mm/build_vllm_table.py: each summary metric is the harmonic mean of these (set, key) pairs.
SUMMARY_METRICS = {
    "forget_metric": (("forget", "probability"), ("forget", "truth_ratio"), ("forget_face", "option_probability"),
                      ("forget_face", "truth_ratio")),
    "retain_metric": (("retain", "probability"), ("retain", "truth_ratio"), ("retain_face", "option_probability"),
                      ("retain_face", "truth_ratio")),
    "real_metric": (("real_faces", "option_probability"), ("real_faces", "truth_ratio"),
                    ("real_world", "option_probability"), ("real_world", "truth_ratio")),
}


def summary_metrics(sets: dict) -> dict:
    """CLEAR's Forget / Retain / Real metrics (harmonic means, see :data:`SUMMARY_METRICS`); ``None`` for one
    whose sets were not evaluated (e.g. no ``name`` column in ``retain_perturbed``)."""
    out = {}
    for name, parts in SUMMARY_METRICS.items():
        have = all(s in sets for s, _ in parts)
        out[name] = _hmean([sets[s][k] for s, k in parts]) if have else None
    return out


def _reference_ratios(reference, forget: str) -> list:
    """The forget set's per-item truth ratios of a reference result (a ClearResult, its JSON dict, or a path)."""
    if isinstance(reference, ClearResult):
        reference = reference.to_json()
    elif isinstance(reference, (str, Path)):
        path = Path(reference).expanduser()
        try:
            reference = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"cannot read the gold result {path} ({type(exc).__name__}); fix: pass the JSON that "
                                 "`mlunlearn eval --data clear:…` wrote for the retain-only model") from None
    try:
        ratios, ref_forget = reference["forget"]["truth_ratios"], reference["settings"]["forget"]
    except (KeyError, TypeError):
        raise BenchmarkError("the gold result is not a CLEAR result (no forget.truth_ratios); fix: pass the JSON that "
                             "`mlunlearn eval --data clear:…` wrote for the retain-only model") from None
    if ref_forget != forget:
        raise BenchmarkError(f"the gold result is for {ref_forget}, this evaluation for {forget}; fix: evaluate the "
                             f"retain-only model on {forget} too")
    return ratios


def evaluate_clear(model, processor, bench="clear", forget="forget05", *, reference=None,
                   real=REAL_CONFIGS, limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 50,
                   seed: int = 0, truth_mean: str = "geometric", js_bins: int = 20,
                   progress: bool = False) -> ClearResult:
    """Evaluate a LLaVA model on CLEAR: ROUGE-L recall, P̄ and truth ratio on the forget and retain captions,
    option probability and truth ratio on ``real`` (``real_faces``, ``real_world``), and forget quality (KS
    p-value and 1 − JS) when ``reference`` — the result of a model trained on ``retain{100-N}`` only, as a
    :class:`ClearResult`, its JSON dict or a path — is given.

    ``bench``: a ``--data`` string, a :class:`Clear` or :class:`ClearFiles`; ``forget``: ``forget01|05|10``
    (or 1, 5, 10); ``limit``: the first ``limit`` rows of each config.
    """
    from mlunlearn.eval.tofu import forget_quality_js, forget_quality_ks

    files = bench.files if isinstance(bench, Clear) else bench if isinstance(bench, ClearFiles) else open_clear(bench)
    forget = forget_config(forget)
    unknown = [c for c in real if c not in REAL_CONFIGS]
    if unknown:
        raise BenchmarkError(f"real={unknown[0]!r}: CLEAR's real sets are {', '.join(REAL_CONFIGS)}")
    for config in (f"{forget}_perturbed", "retain_perturbed", *real):  # every file checked before any model call
        files.load(config)
    ref_ratios = _reference_ratios(reference, forget) if reference is not None else None
    records: list = []
    options = dict(limit=limit, batch_size=batch_size, truth_mean=truth_mean, records=records)
    options.update(max_new_tokens=max_new_tokens, progress=progress)
    sets = {}
    for role, config in (("forget", f"{forget}_perturbed"), ("retain", "retain_perturbed")):
        sets[role] = _caption_set(model, processor, files, config, role, seed=seed, **options)
        if {"name", "perturbed_names"} <= set(files.load(config)[0]):  # face recognition (retain: newer uploads)
            sets[f"{role}_face"] = _options_set(model, processor, files, config, f"{role}_face", answer_col="name",
                                                options_col="perturbed_names", kind=role, **options)
    for config in real:
        sets[config] = _options_set(model, processor, files, config, config, answer_col="answer",
                                    options_col="options", kind="retain", **options)
    fq = None
    if ref_ratios is not None:
        ks = forget_quality_ks(sets["forget"]["truth_ratios"], ref_ratios)
        js = forget_quality_js(sets["forget"]["truth_ratios"], ref_ratios, bins=js_bins)
        fq = {"ks_p_value": ks["p_value"], "ks_statistic": ks["statistic"], "one_minus_js": js["value"],
              "js_bins": js["bins"], "js_binning": "equal-width bins of log R over the pooled range",
              "reference_items": len(ref_ratios)}
    meta = {"benchmark": "clear", "data": files.name, "forget": forget,
            "retain_model_should_train_on": RETAIN_OF[forget],
            "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens, "truth_ratio_mean": truth_mean,
            "units": "fractions in [0, 1]; truth ratios in TOFU's reporting forms (higher is better)"}
    return ClearResult(sets, records, fq, meta)


def run_clear_eval(args) -> int:
    """``mlunlearn eval --data clear…``: check every file, load the model, evaluate, write the JSON."""
    import pandas as pd

    from mlunlearn.models import load_model
    from mlunlearn.utils import set_seed

    given = [f"--{n.replace('_', '-')}" for n in ("few_shot", "benign") if getattr(args, n, None)]
    if given:
        raise BenchmarkError(f"{' and '.join(given)} do{'es' if len(given) == 1 else ''} not apply to --data "
                             f"{args.data}: CLEAR has no MLLMU-Bench tasks; drop {'it' if len(given) == 1 else 'them'}")
    if args.forget == 15:
        raise BenchmarkError("CLEAR has no forget 15%; use --forget 5 or 10 (forget05, forget10)")
    forget = forget_config(args.forget)
    set_seed(args.seed, threads=args.threads)
    files = open_clear(args.data)
    for config in (f"{forget}_perturbed", "retain_perturbed", *REAL_CONFIGS):  # fail before the model loads
        for i, row in enumerate(files.load(config)[:args.limit]):
            if row.get("image") is not None:
                _image(row, f"CLEAR config '{config}' row {i}")
    gold = getattr(args, "gold", None)
    if gold:
        _reference_ratios(gold, forget)
    model, processor = load_model(args.model, device=args.device, quantization=getattr(args, "quantization", None))
    result = evaluate_clear(model, processor, files, forget, reference=gold, limit=args.limit,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            progress=not args.no_progress)
    result.meta["model"] = args.model
    path = result.save_json(args.output)
    if args.records:
        result.save_records(args.records)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"CLEAR, {args.data}, {forget}, model {args.model}; fractions, truth ratios in TOFU's forms:")
        print(result.summary().round(4).to_string())
    print("CLEAR summary (harmonic means): " + ", ".join(
        f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in result.to_json()["summary"].items()))
    fq = result.to_json()["forget_quality"]
    print("forget quality: " + (f"KS p = {fq['ks_p_value']:.4g}, 1 - JS = {fq['one_minus_js']:.4f}"
                                if fq.get("ks_p_value") is not None else "not computed (pass --gold RESULT.json of a "
                                f"model trained on {RETAIN_OF[forget]} only)"))
    print(f"wrote {path}")
    return 0


__all__ = ["CAPTION_QUESTIONS", "COLUMNS", "Clear", "ClearFiles", "ClearResult", "FACE_QUESTION", "FORGET_CONFIGS",
           "HUB_ID", "RETAIN_OF", "evaluate_clear", "forget_config", "is_clear_source", "open_clear", "run_clear_eval"]
