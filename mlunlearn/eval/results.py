"""Evaluation results: one record per question, and the averages the official script reports.

Units everywhere: ``accuracy`` and ``refusal_rate`` are **percentages** (0–100) once averaged;
``rouge1``, ``rouge2``, ``rougeL`` and ``bleu`` are **fractions** (0–1). Per item, accuracy and refusal
are stored as 0.0/1.0 so that an average of items is the fraction that was correct (or refused).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from mlunlearn.utils import write_atomic

__all__ = ["Record", "EvalResult", "MODE_TITLES", "PERCENT_METRICS"]

# The official script's top-level keys, in its order.
MODE_TITLES = {
    "forget": "Forget Set Results",
    "test": "Test Set Results",
    "retain_shared": "Retain Set (shared dataset) Results",
    "retain_celebrity": "Retain Set (real person) Results",
}
MODALITIES = ("Image_Textual", "Pure_Text")
# Metrics averaged as 0/1 per item and reported in percent (0–100).
PERCENT_METRICS = ("accuracy", "refusal_rate")
GENERATION_METRICS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("bleu", "BLEU"))


@dataclass
class Record:
    """One evaluated question.

    ``mode``: forget | test | retain_shared | retain_celebrity | benign.
    ``task``: fill_in_the_blank | classification | generation | benign_vqa.
    ``modality``: Image_Textual (the image was in the prompt) | Pure_Text.
    ``scores``: metric name -> value for this item (0/1 for accuracy and refusal_rate, fractions for
    ROUGE/BLEU). ``group`` and ``in_forget`` are only set for benign questions.
    """

    mode: str
    task: str
    modality: str
    id: str
    question: str
    reply: str
    reference: str | None
    scores: dict[str, float]
    prompt: str = ""
    group: str | None = None
    in_forget: bool | None = None


@dataclass
class EvalResult:
    """All per-item records of one evaluation run, plus how it was run (``meta``).

    ``default_by`` is the grouping :meth:`frame` uses when none is given: (mode, task, modality) for
    MLLMU-Bench runs, (group, in_forget) for benign runs.
    """

    records: list[Record]
    meta: dict = field(default_factory=dict)
    default_by: tuple[str, ...] = ("mode", "task", "modality")

    def __len__(self) -> int:
        return len(self.records)

    def items(self) -> pd.DataFrame:
        """One row per question: the record fields, with each score as its own column."""
        rows = []
        for record in self.records:
            row = asdict(record)
            row.update(row.pop("scores"))
            rows.append(row)
        return pd.DataFrame(rows)

    def frame(self, by: Sequence[str] | None = None) -> pd.DataFrame:
        """Tidy averages: columns ``[*by, "metric", "value", "n"]``, one row per group and metric.

        ``value`` is a percentage for accuracy/refusal_rate and a fraction for ROUGE/BLEU; ``n`` is the
        number of questions averaged. Groups keep the order in which they first appear.
        """
        by = list(by or self.default_by)
        long = [
            {**{key: getattr(record, key) for key in by}, "metric": metric, "value": value}
            for record in self.records
            for metric, value in record.scores.items()
        ]
        columns = [*by, "metric", "value", "n"]
        if not long:
            return pd.DataFrame(columns=columns)
        table = (
            pd.DataFrame(long)
            .groupby([*by, "metric"], sort=False, dropna=False)["value"]
            .agg(["mean", "size"])
            .reset_index()
            .rename(columns={"mean": "value", "size": "n"})
        )
        percent = table["metric"].isin(PERCENT_METRICS)
        table.loc[percent, "value"] = table.loc[percent, "value"] * 100
        return table[columns]

    def _mean(self, mode: str, task: str, modality: str, metric: str) -> tuple[float, int]:
        values = [
            r.scores[metric]
            for r in self.records
            if r.mode == mode and r.task == task and r.modality == modality and metric in r.scores
        ]
        return (sum(values) / len(values) if values else 0.0), len(values)

    def to_official(self) -> dict:
        """The official MLLMU-Bench script's result dict, key for key.

        ``{"Forget Set Results": {"fill_in_the_blank": {"image_textual_accuracy": %, "pure_text_accuracy": %},
        "classification": {"Image-Textual Question Accuracy": %, "Pure Text Question Accuracy": %},
        "generation": {"Average ROUGE-1 (Image_Textual)": f, ..., "Average BLEU (Pure_Text)": f}}, ...}``
        for each evaluated mode. As in the official script, an accuracy with no questions is 0 and a
        generation modality with no questions is left out.
        """
        modes = [m for m in MODE_TITLES if any(r.mode == m for r in self.records)]
        if not modes:
            raise ValueError("this result has no MLLMU-Bench records (benign runs: use to_benign())")
        official = {}
        for mode in modes:
            cloze = {
                "image_textual_accuracy": 100 * self._mean(mode, "fill_in_the_blank", "Image_Textual", "accuracy")[0],
                "pure_text_accuracy": 100 * self._mean(mode, "fill_in_the_blank", "Pure_Text", "accuracy")[0],
            }
            classification = {
                "Image-Textual Question Accuracy": 100 * self._mean(mode, "classification", "Image_Textual", "accuracy")[0],
                "Pure Text Question Accuracy": 100 * self._mean(mode, "classification", "Pure_Text", "accuracy")[0],
            }
            generation = {}
            for modality in MODALITIES:
                for metric, label in GENERATION_METRICS:
                    mean, n = self._mean(mode, "generation", modality, metric)
                    if n:
                        generation[f"Average {label} ({modality})"] = mean
            official[MODE_TITLES[mode]] = {
                "fill_in_the_blank": cloze,
                "classification": classification,
                "generation": generation,
            }
        return official

    def to_benign(self) -> dict:
        """Benign-question summary: ``{"overall": {metric: value, "n": n}, "by_group": {...},
        "by_forget_set": {"forget": {...}, "not_forget": {...}}}`` (percentages)."""
        def summarise(records: Iterable[Record]) -> dict:
            records = list(records)
            out = {}
            for metric in PERCENT_METRICS:
                values = [r.scores[metric] for r in records if metric in r.scores]
                if values:
                    out[metric] = 100 * sum(values) / len(values)
            out["n"] = len(records)
            return out

        benign = [r for r in self.records if r.mode == "benign"]
        groups = list(dict.fromkeys(r.group for r in benign))
        return {
            "overall": summarise(benign),
            "by_group": {str(g): summarise(r for r in benign if r.group == g) for g in groups},
            "by_forget_set": {
                "forget": summarise(r for r in benign if r.in_forget),
                "not_forget": summarise(r for r in benign if not r.in_forget),
            },
        }

    def summary(self) -> pd.DataFrame:
        """A compact table for printing: one row per mode; classification and cloze accuracy (%) and
        ROUGE-L (fraction), each for image and text questions. Benign runs: accuracy and refusal rate (%)
        by group and forget membership."""
        if self.records and all(r.mode == "benign" for r in self.records):
            return self.frame().pivot_table(index=list(self.default_by), columns="metric", values="value", sort=False)
        columns = {  # (task, metric) -> column label prefix, in display order
            ("classification", "accuracy"): "cls",
            ("fill_in_the_blank", "accuracy"): "cloze",
            ("generation", "rougeL"): "ROUGE-L",
        }
        table = self.frame(("mode", "task", "modality"))
        labels = []
        for task, metric, modality in zip(table["task"], table["metric"], table["modality"]):
            prefix = columns.get((task, metric))
            suffix = "img" if modality == "Image_Textual" else "text"
            labels.append(f"{prefix} {suffix}{' %' if metric in PERCENT_METRICS else ''}" if prefix else None)
        table = table.assign(column=labels).dropna(subset=["column"])
        wide = table.pivot_table(index="mode", columns="column", values="value", sort=False)
        order = [f"{p} {m}{' %' if k[1] in PERCENT_METRICS else ''}" for k, p in columns.items() for m in ("img", "text")]
        wide = wide.reindex(columns=[c for c in order if c in wide.columns])
        wide.columns.name = None
        return wide.reindex([m for m in MODE_TITLES if m in wide.index])

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_official` (or :meth:`to_benign` for a benign run) as indented JSON.

        Atomic (:func:`mlunlearn.utils.write_atomic`): if serialising or writing fails, an older file at
        ``path`` is left as it was, never half-written.
        """
        benign_only = bool(self.records) and all(r.mode == "benign" for r in self.records)
        data = self.to_benign() if benign_only else self.to_official()
        return write_atomic(path, json.dumps(data, indent=4, ensure_ascii=False) + "\n")

    def save_records(self, path: str | Path) -> Path:
        """Write every record (question, reply, reference, scores) as JSON lines, for inspection.

        Atomic, like :meth:`save_json`: every line is serialised before the file is touched.
        """
        text = "".join(json.dumps(asdict(record), ensure_ascii=False) + "\n" for record in self.records)
        return write_atomic(path, text)
