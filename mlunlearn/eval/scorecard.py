"""Headline numbers for comparing unlearning runs (book chapters 2 onwards).

:func:`scorecard` runs the full MLLMU-Bench protocol plus the benign questions and condenses them into
one row: what was forgotten, what was kept, and whether harmless questions still get answers.
:func:`teacher_forced` is the cheap probe for sweeps and training-time monitoring: one forward pass,
no generation.
"""

from __future__ import annotations

import torch

from mlunlearn.collate import IGNORE, collate, nll_from_logits

# The scorecard's columns, in display order, with what each means.
COLUMNS = {
    "forget cls img": "forget people, multiple choice with their image (%, lower = more forgotten)",
    "forget cls text": "forget people, multiple choice by name (%)",
    "forget cloze img": "forget people, fill-in-the-blank with image (%)",
    "forget ROUGE-L img": "forget people, generation with image (ROUGE-L F)",
    "test cls img": "forget people in unseen views (Test_Set), multiple choice (%)",
    "retain cls img": "retain people, multiple choice with image (%, higher = better kept)",
    "retain cls text": "retain people, multiple choice by name (%)",
    "retain ROUGE-L img": "retain people, generation with image (ROUGE-L F)",
    "celebrity cls img": "celebrities (Retain_Set), multiple choice with image (%)",
    "benign acc": "benign visual questions about people, correct (%)",
    "benign refusal, forget images": "benign questions about the forget people's images, refused (%)",
    "benign refusal, other people": "benign questions about everyone else's images, refused (%)",
}


def _value(frame, mode, task, modality, metric):
    rows = frame[(frame["mode"] == mode) & (frame["task"] == task) & (frame["modality"] == modality)
                 & (frame["metric"] == metric)]
    return float(rows["value"].iloc[0]) if len(rows) else float("nan")


def scorecard(model, processor, data="toyworld", forget: int = 5, batch_size: int = 64,
              benign: bool = True, progress: bool = False) -> tuple[dict, object, object]:
    """``(row, eval_result, benign_result)``: the full evaluation and its headline numbers.

    ``row`` has the keys of :data:`COLUMNS` (percentages, ROUGE-L as a fraction). Benign refusal is
    split by whose image is asked about: the forget people's own images are where over-refusal shows.
    """
    from mlunlearn.eval.protocol import evaluate, evaluate_benign

    result = evaluate(model, processor, data, forget, batch_size=batch_size, progress=progress)
    f = result.frame()
    img, txt = "Image_Textual", "Pure_Text"
    row = {
        "forget cls img": _value(f, "forget", "classification", img, "accuracy"),
        "forget cls text": _value(f, "forget", "classification", txt, "accuracy"),
        "forget cloze img": _value(f, "forget", "fill_in_the_blank", img, "accuracy"),
        "forget ROUGE-L img": _value(f, "forget", "generation", img, "rougeL"),
        "test cls img": _value(f, "test", "classification", img, "accuracy"),
        "retain cls img": _value(f, "retain_shared", "classification", img, "accuracy"),
        "retain cls text": _value(f, "retain_shared", "classification", txt, "accuracy"),
        "retain ROUGE-L img": _value(f, "retain_shared", "generation", img, "rougeL"),
        "celebrity cls img": _value(f, "retain_celebrity", "classification", img, "accuracy"),
    }
    benign_result = None
    if benign:
        benign_result = evaluate_benign(model, processor, data, forget, batch_size=batch_size, progress=progress)
        recs = [r for r in benign_result.records if r.group in ("fictitious", "celebrity", "stranger")]

        def pct(records, metric):
            values = [r.scores[metric] for r in records if metric in r.scores]
            return 100 * sum(values) / len(values) if values else float("nan")

        row["benign acc"] = pct(recs, "accuracy")
        row["benign refusal, forget images"] = pct([r for r in recs if r.in_forget], "refusal_rate")
        row["benign refusal, other people"] = pct([r for r in recs if not r.in_forget], "refusal_rate")
    return row, result, benign_result


@torch.no_grad()
def teacher_forced(model, processor, examples, batch_size: int = 32) -> dict:
    """Cheap answer-level scores without generation: ``{"nll": mean answer NLL, "exact": % of examples
    whose every answer token is the model's top choice}`` (``exact`` = greedy decoding would reproduce
    the answer, up to what follows it)."""
    was_training = model.training
    model.eval()
    nlls, exact = [], []
    for i in range(0, len(examples), batch_size):
        batch = collate(processor, examples[i:i + batch_size])
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        nlls.append(nll_from_logits(logits, batch["labels"]).cpu())
        exact.append(((logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE)).all(1).cpu())
    model.train(was_training)
    return {"nll": float(torch.cat(nlls).mean()), "exact": 100 * float(torch.cat(exact).float().mean())}
