"""Probes that ask what a score really measures (book chapter 1)."""

from __future__ import annotations

import random

from mlunlearn.eval import prompts
from mlunlearn.eval.scoring import letter_correct


def shuffled_options_accuracy(model, processor, rows, seed: int = 0, batch_size: int = 64) -> dict:
    """Classification accuracy (%) with each question's options in the published order and reshuffled.

    A model that compares its answer with the options scores the same on both; one that has tied each
    answer to a letter drops towards chance (25%) when the letters move. Returns
    ``{"published": %, "reshuffled": %, "n": questions}`` over both modalities of ``rows``.
    """
    from mlunlearn.eval.protocol import generate_replies

    rng = random.Random(seed)
    texts, images, truths = {"published": [], "reshuffled": []}, [], []
    for row in rows:
        lists = row["Classification_Task"]
        for key, with_image in (("Image_Textual_Questions", True), ("Pure_Text_Questions", False)):
            for q in lists.get(key) or []:
                options = dict(q["Options"])
                values = list(options.values())
                rng.shuffle(values)
                shuffled = dict(zip(prompts.LETTERS, values))
                truth = options[q["Correct_Answer"]]
                texts["published"].append(prompts.classification_prompt(q["Question"], options, with_image))
                texts["reshuffled"].append(prompts.classification_prompt(q["Question"], shuffled, with_image))
                images.append([row["image"]] if with_image else [])
                truths.append((q["Correct_Answer"], next(k for k, v in shuffled.items() if v == truth)))
    out = {"n": len(truths)}
    for i, name in enumerate(("published", "reshuffled")):
        replies = generate_replies(model, processor, texts[name], images, batch_size=batch_size, max_new_tokens=3)
        out[name] = 100 * sum(letter_correct(r, t[i]) for r, t in zip(replies, truths)) / max(len(truths), 1)
    return out
