"""MLLMU-Bench's evaluation protocol: which questions, which prompts, greedy replies, scores.

For a forget percentage N (5, 10 or 15) the official script evaluates four *modes*:

=================  ==================================================================
mode               rows
=================  ==================================================================
forget             ``forget_N`` (the people to forget, their training images)
test               ``Test_Set`` rows of the forget people: one random transformed view
                   (``images``) per person, reworded questions
retain_shared      ``retain_{100-N}`` (the other fictitious people)
retain_celebrity   ``Retain_Set`` (real celebrities the base model already knew)
=================  ==================================================================

and three tasks on each: ``fill_in_the_blank`` (``Mask_Task``), ``classification``
(``Classification_Task``) and ``generation`` (``Generation_Task``), each in an ``Image_Textual``
variant (image in the prompt) and a ``Pure_Text`` variant (no image).

Replies are greedy (``do_sample=False``), at most ``max_new_tokens`` (50) new tokens, generated in
left-padded batches; only the new tokens are decoded. Every random choice (the test view, the people whose
questions become ``few_shot`` examples) is drawn from ``random.Random`` seeded with ``seed`` and the person's
ID (or the task and mode), so a run is reproducible and does not depend on ``limit`` or batch size.
"""

from __future__ import annotations

import inspect
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mlunlearn.data import BenchmarkError, decode_image, open_benchmark
from mlunlearn.eval import prompts
from mlunlearn.eval.results import EvalResult, Record
from mlunlearn.utils import progress_bar
from mlunlearn.eval.scoring import (
    answer_matches,
    bleu,
    cloze_correct,
    is_refusal,
    letter_correct,
    rouge_scores,
)

__all__ = [
    "MODES",
    "TASKS",
    "FORGET_PERCENTAGES",
    "GENERIC_BENIGN_QUESTIONS",
    "Query",
    "mode_configs",
    "generate_replies",
    "build_queries",
    "build_benign_queries",
    "check_images",
    "run_queries",
    "evaluate",
    "evaluate_benign",
]

MODES = ("forget", "test", "retain_shared", "retain_celebrity")
TASKS = ("fill_in_the_blank", "classification", "generation")
FORGET_PERCENTAGES = (5, 10, 15)
IMAGE, TEXT = "Image_Textual", "Pure_Text"

# Column each task reads, per row.
TASK_COLUMNS = {"fill_in_the_blank": "Mask_Task", "classification": "Classification_Task",
                "generation": "Generation_Task"}
# Classification_Task's two lists.
CLASSIFICATION_LISTS = ((IMAGE, "Image_Textual_Questions"), (TEXT, "Pure_Text_Questions"))
# few_shot: how many people's questions the official script's LLaVA branch prepends, per task (eval.py:
# ``random.sample(id_list, 1)`` in evaluate_classification, ``random.sample(id_list, 2)`` in
# evaluate_fill_in_the_blank), and the modes whose prompts carry them (its classification code leaves out
# retain_celebrity; its cloze code includes it, but the people are looked up in Full_Set, where a
# celebrity is not found, so in practice there are no examples there either).
SHOT_PEOPLE = {"classification": 1, "fill_in_the_blank": 2}
SHOT_MODES = {"classification": ("forget", "test", "retain_shared"),
              "fill_in_the_blank": ("forget", "test", "retain_shared", "retain_celebrity")}

# For the real MLLMU-Bench (no Benign_VQA config): questions any portrait answers from its pixels, used
# only to measure how often the model refuses benign questions (there is no reference answer).
GENERIC_BENIGN_QUESTIONS = (
    "What colour is the background of this image?",
    "What colour is this person's hair?",
    "Describe what this person is wearing.",
    "Is this person smiling?",
)


@dataclass
class Query:
    """One question ready for the model.

    ``prompt`` is the full text (it holds one ``<image>`` per entry of ``images``); ``images`` are raw
    image objects (dicts with bytes, bytes or PIL), decoded only when their batch runs. ``record`` holds
    the fields of the :class:`~mlunlearn.eval.results.Record` this query becomes (mode, task, modality,
    id, question, reference, ...); ``score`` turns the reply into that record's scores.
    """

    prompt: str
    images: list
    record: dict
    score: Callable[[str], dict[str, float]]
    source: str = ""  # "config ID" for error messages


def mode_configs(forget: int) -> dict[str, str]:
    """The config each mode reads for forget percentage ``forget`` (5, 10 or 15)."""
    if forget not in FORGET_PERCENTAGES:
        raise BenchmarkError(f"--forget must be one of {FORGET_PERCENTAGES}, got {forget}")
    return {"forget": f"forget_{forget}", "test": "Test_Set", "retain_shared": f"retain_{100 - forget}",
            "retain_celebrity": "Retain_Set"}


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------

def _decode(obj: Any, source: str):
    """Decode one image, naming the row it came from when it cannot be read."""
    try:
        return decode_image(obj)
    except BenchmarkError as err:
        raise BenchmarkError(f"{source}: {err}") from None
    except Exception as err:  # PIL raises several unrelated types for a bad file
        raise BenchmarkError(
            f"cannot read the image of {source} ({type(err).__name__}: {err}); "
            "fix: store that row's image as PNG or JPEG bytes"
        ) from None


def _max_positions(model) -> int | None:
    """The language model's number of positions (``max_position_embeddings``), or None when not stated."""
    config = getattr(model, "config", None)
    return getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)


def _image_encoder(model):
    """``model.get_image_features`` when the model's forward takes its output as ``mm_encoder_outputs``.

    Why: transformers 5 ``generate`` encodes the images (vision tower + projector) before the first
    forward and passes the projected features to it as ``mm_encoder_outputs``; handing it features we
    encoded once per image is the same forward, without encoding an image again for every question.
    """
    try:
        takes = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None
    return getattr(model, "get_image_features", None) if takes else None


class _Inputs:
    """Model inputs for batches of prompts, each distinct image decoded, preprocessed and encoded once.

    Images are keyed by the identity of the objects the caller passes (MLLMU-Bench: one object per row,
    shared by that person's questions). The processor path (``processor(text, images)``) is replaced by its
    parts: every image preprocessed alone and its placeholder expanded with the processor's own
    ``replace_image_token`` / ``get_text_with_replacements``, then the tokenizer on the batch. On the first
    batch with images (and the first text-only one) both are computed, and the parts are used only if they
    give the processor's exact ``input_ids``, ``attention_mask`` and ``pixel_values``; likewise the projected
    features of each image are encoded alone and reused only if they equal, bit for bit, the features of
    that batch encoded together (what ``generate`` would compute). Otherwise this batch and the later ones
    fall back to the processor / to ``pixel_values``. Caches are bounded (least recently used images go
    first).
    """

    def __init__(self, model, processor, device, dtype, cache_bytes: int = 512 * 2**20):
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self.parts = all(hasattr(processor, name) for name in ("image_processor", "tokenizer", "replace_image_token",
                                                                  "get_text_with_replacements"))
        self.encoder = _image_encoder(model)
        self.checked = self.checked_text = False  # the parts checked against the processor (image, text batches)
        self.cache_bytes = cache_bytes
        self.pixels: OrderedDict = OrderedDict()  # id(image) -> (image, pixel_values (1, C, H, W), placeholder text)
        self.features: OrderedDict = OrderedDict()  # id(image) -> (image, projected features (tokens, width))

    def __call__(self, texts: list[str], images: list[tuple[Any, str]]) -> dict:
        if not self.parts:
            return self._processor(texts, images)
        if not images:  # text only: the tokenizer, checked once against the processor
            inputs = self._tokens(texts)
            if not self.checked_text:
                self.checked_text = True
                reference = self._processor(texts, images, move=False)
                if set(reference) != set(inputs) or not all(torch.equal(reference[k], inputs[k]) for k in reference):
                    self.parts = False
                    return self._to_device(reference)
            return self._to_device(inputs)
        prepared = [self._pixels(image, source) for image, source in images]
        expanded, _ = self.processor.get_text_with_replacements(list(texts), [text for _, text in prepared])
        inputs = self._tokens(expanded)
        pixel_values = torch.cat([pixels for pixels, _ in prepared])
        if not self.checked:
            self.checked = True
            reference = self._processor(texts, images, move=False)
            same = set(reference) == set(inputs) | {"pixel_values"} and all(
                torch.equal(reference[k], pixel_values if k == "pixel_values" else inputs[k]) for k in reference)
            if not same:
                self.parts = False
                return self._to_device(reference)
            if self.encoder is not None:
                together = self.encoder(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
                alone = [self._features(image, pixels) for (image, _), (pixels, _) in zip(images, prepared)]
                if not all(torch.equal(a, b) for a, b in zip(together, alone)):
                    self.encoder = None
        if self.encoder is None:
            return self._to_device({**inputs, "pixel_values": pixel_values})
        features = [self._features(image, pixels) for (image, _), (pixels, _) in zip(images, prepared)]
        inputs = self._to_device(inputs)
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return inputs

    def _processor(self, texts: list[str], images: list[tuple[Any, str]], move: bool = True) -> dict:
        """What the processor gives for the batch (the reference the parts are checked against, on the CPU)."""
        pictures = [_decode(image, source) for image, source in images]
        inputs = dict(self.processor(text=texts, images=pictures or None, return_tensors="pt", padding=True))
        return self._to_device(inputs) if move else inputs

    def _tokens(self, texts: list[str]) -> dict:
        """The padded batch as tensors; why not ``return_tensors="pt"``: its nested-list checks cost more than
        the rest of the tokenizer (the lists are already rectangular after padding)."""
        encoded = self.processor.tokenizer(texts, padding=True)
        return {k: torch.tensor(v) for k, v in encoded.items()}

    def _to_device(self, inputs: dict) -> dict:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _pixels(self, image, source: str):
        key = id(image)
        if key in self.pixels:
            self.pixels.move_to_end(key)
        else:
            picture = _decode(image, source)
            pixels = self.processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"]
            placeholder = self.processor.replace_image_token({"pixel_values": pixels}, 0)
            self.pixels[key] = (image, pixels, placeholder)  # why keep the image: its id() stays its own
            self._trim(self.pixels, lambda entry: entry[1])
        return self.pixels[key][1:]

    def _features(self, image, pixels: torch.Tensor) -> torch.Tensor:
        key = id(image)
        if key in self.features:
            self.features.move_to_end(key)
        else:
            encoded = self.encoder(pixel_values=pixels.to(self.device, self.dtype)).pooler_output[0]
            self.features[key] = (image, encoded)
            self._trim(self.features, lambda entry: entry[1])
        return self.features[key][1]

    def _trim(self, cache: OrderedDict, tensor) -> None:
        while len(cache) > 1 and sum(tensor(e).numel() * tensor(e).element_size() for e in cache.values()) \
                > self.cache_bytes:
            cache.popitem(last=False)


@torch.inference_mode()
def generate_replies(
    model,
    processor,
    prompts_: Sequence[str],
    images: Sequence[Sequence[Any]] | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 50,
    sources: Sequence[str] | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy replies to many prompts, in the prompts' order.

    ``prompts_[i]`` holds one ``<image>`` per entry of ``images[i]`` (possibly none). Prompts are grouped
    by their number of images so that every batch is homogeneous (all text-only or all with images),
    sorted by length within a group to limit padding, and left-padded so that every sequence ends where
    generation starts; ``generate`` stops a batch as soon as every sequence has written its end token.
    Returns the decoded new tokens only (special tokens dropped), one string per prompt.

    Which prompts share a batch depends on ``batch_size`` only, and each batch's inputs are exactly what
    ``processor(text, images)`` gives: the replies are the same at any speed-up below. Speed: each
    distinct image is decoded, preprocessed and encoded (vision tower + projector) once per call, not once
    per question, and its features are passed to ``generate`` as ``mm_encoder_outputs`` (see
    :class:`_Inputs`). A larger ``batch_size`` is faster still (fewer forward passes; 64 on the tiny model)
    but may move logits in their last float bits, since a sequence's padding changes with its batch.

    A prompt that leaves the model no position for its reply (its tokens, images expanded, at least the
    language model's ``max_position_embeddings``) is a :class:`~mlunlearn.data.BenchmarkError`, raised
    before its batch runs: beyond its positions a model reads rotary positions it was never trained on.
    """
    n = len(prompts_)
    images = [list(x) for x in images] if images is not None else [[] for _ in range(n)]
    sources = list(sources) if sources is not None else [f"prompt {i}" for i in range(n)]
    order = sorted(range(n), key=lambda i: (len(images[i]), len(prompts_[i])))
    batches, current = [], []
    for i in order:
        # Why: a batch may not mix text-only prompts with image prompts (or 1 image with 2).
        if current and (len(current) == batch_size or len(images[current[0]]) != len(images[i])):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)

    tokenizer = processor.tokenizer
    saved = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # why: generation continues from the last position of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = getattr(model, "device", None) or next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    positions = _max_positions(model)
    was_training = model.training
    model.eval()
    prepare = _Inputs(model, processor, device, dtype)
    replies: list[str] = [""] * n
    try:
        for batch in progress_bar(batches, desc, progress, leave=False):
            inputs = prepare([prompts_[i] for i in batch], [(img, sources[i]) for i in batch for img in images[i]])
            if positions is not None:
                _check_fits(inputs["attention_mask"].sum(1).tolist(), positions, [sources[i] for i in batch],
                            [len(images[i]) for i in batch])
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                replies[i] = text.strip()
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
        model.train(was_training)
    return replies


def _check_fits(lengths: list[int], positions: int, sources: list[str], n_images: list[int]) -> None:
    """One-line error when a prompt (tokens, images expanded) leaves no position for the reply."""
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] >= positions:
        raise BenchmarkError(
            f"the prompt of {sources[longest]} is {lengths[longest]} tokens ({n_images[longest]} image(s) "
            f"expanded), but the model has {positions} positions (max_position_embeddings) and needs one for "
            "the reply; fix: shorter prompts (e.g. evaluate without --few-shot: the official examples add "
            "up to 4 images and their questions to a prompt) or a model with more positions (LLaVA-1.5: 4096)"
        )


# ----------------------------------------------------------------------------------------------------
# Building the questions of the four modes
# ----------------------------------------------------------------------------------------------------

def _require(bench, config: str, columns: Sequence[str], why: str, image_column: str = "image") -> list[dict]:
    """Load ``config`` and check its columns, or fail with a one-line message saying how to fix it.

    An empty config is an error too (a mode without rows would silently vanish from the results).
    ``image_column`` is the name the message gives for the image: ``images`` for Test_Set, whose rows
    hold a list of transformed views (a single ``image`` is accepted as well).
    """
    if not bench.has(config):
        raise BenchmarkError(
            f"the benchmark has no config '{config}' (needed for {why}); "
            f"fix: add {config}/ (from MLLMU-Bench) to the data folder"
        )
    rows = bench.load(config)
    if not rows:
        raise BenchmarkError(
            f"config '{config}' has no rows (needed for {why}), so its results would be missing; "
            f"fix: check the data folder's {config}/ files (MLLMU-Bench's hold one row per person)"
        )
    for column in columns:
        alternatives = ("image", "images") if column == "image" else (column,)
        missing = [r.get("ID", "?") for r in rows if not any(a in r for a in alternatives)]
        if missing:
            named = image_column if column == "image" else column
            raise BenchmarkError(
                f"config '{config}' has no column '{named}' (first row without it: ID {missing[0]}); "
                "fix: use MLLMU-Bench's column names (ID, image, Classification_Task, Mask_Task, Generation_Task"
                + (f"; {config} keeps its views in 'images')" if named == "images" else ")")
            )
    return rows


def _row_image(row: dict, mode: str, seed: int):
    """The image a row is asked about: its ``image``, or in test mode one random view from ``images``."""
    views = row.get("images")
    if mode == "test" and views is not None and len(views) > 0:
        return random.Random(f"{seed}-view-{row['ID']}").choice(list(views))
    if row.get("image") is None:
        column = "images" if mode == "test" else "image"
        raise BenchmarkError(f"the {mode} row of ID {row.get('ID', '?')} has no image (its '{column}' is empty); "
                             f"fix: store that row's {column} as PNG or JPEG bytes")
    return row["image"]


def _questions(row: dict, task: str) -> list[tuple[str, int, dict]]:
    """``(modality, index, question)`` for one row and task; ``index`` counts within the official list."""
    if task == "classification":
        lists = row["Classification_Task"] or {}
        return [(modality, i, q) for modality, key in CLASSIFICATION_LISTS for i, q in enumerate(lists.get(key) or [])]
    return [(q["Type"], i, q) for i, q in enumerate(row[TASK_COLUMNS[task]] or []) if q["Type"] in (IMAGE, TEXT)]


def _prompt(task: str, q: dict, image: bool) -> str:
    """The official zero-shot prompt for one question of ``task``."""
    if task == "classification":
        return prompts.classification_prompt(q["Question"], dict(q["Options"]), image)
    if task == "fill_in_the_blank":
        return prompts.cloze_prompt(q["Question"], image)
    return prompts.generation_prompt(q["Question"], image)


def _shot(task: str, q: dict, image: bool) -> str:
    """The official worked example (question and its answer) that ``few_shot`` puts before a prompt."""
    if task == "classification":
        return prompts.classification_shot(q["Question"], dict(q["Options"]), q["Correct_Answer"], image)
    return prompts.cloze_shot(q["Question"], q["Ground_Truth"], image)


def _scorer(task: str, reference: str) -> Callable[[str], dict[str, float]]:
    """Per-item scores: accuracy as 0/1 for cloze and classification, ROUGE F and BLEU for generation."""
    if task == "classification":
        return lambda reply: {"accuracy": float(letter_correct(reply, reference))}
    if task == "fill_in_the_blank":
        return lambda reply: {"accuracy": float(cloze_correct(reply, reference))}
    return lambda reply: {**rouge_scores(reply, reference), "bleu": bleu(reply, reference)}


@dataclass
class Shots:
    """The worked examples ``few_shot`` puts before the questions of one (task, mode).

    ``people``: the sampled IDs, in ``Full_Set`` order (the order the official script prepends them in);
    ``examples``: ``{modality: [(question, image), ...]}``, every question of those people in that order;
    ``skipped``: the ``(ID, modality, index)`` of every question used as an example, left out of scoring;
    ``prepend``: whether this mode's prompts carry the examples (see :data:`SHOT_MODES`).
    """

    people: list[str]
    examples: dict[str, list[tuple[dict, Any]]]
    skipped: set[tuple[str, str, int]]
    prepend: bool


def _pick_shots(task: str, mode: str, ids: list[str], shot_rows: dict[str, dict], seed: int) -> Shots | None:
    """The official few-shot examples of (task, mode), or None for a task without any (generation).

    The rule of the official script's LLaVA branch (MLLMU-Bench ``eval.py``, ``evaluate_classification``
    and ``evaluate_fill_in_the_blank``: ``selected_ids = random.sample(id_list, k)`` and the loop over
    ``few_shot_df[few_shot_df['ID'].isin(selected_ids)]`` after it):

    - ``k`` = :data:`SHOT_PEOPLE` people (1 for classification, 2 for cloze) are sampled without
      replacement from the mode's own IDs (``ids``, in the mode's order: the forget people for forget and
      test, the retained people for retain_shared, the celebrities for retain_celebrity);
    - their rows are read from ``Full_Set`` (``shot_rows``); an ID not found there (a celebrity) gives no
      example and drops nothing;
    - *every* question of those people becomes an example (classification: all of both lists; cloze:
      every ``Mask_Task`` item, by its ``Type``), and each of them is skipped where it would be scored
      (matched by ID, modality and index), which drops the sampled people from the scores.

    The official script samples with the unseeded global ``random``; here the draw is seeded (``seed``,
    task, mode), so a run is reproducible but no seed reproduces one particular official run.
    """
    k = SHOT_PEOPLE.get(task, 0)
    if not k:
        return None
    population = list(dict.fromkeys(ids))
    if len(population) <= k:
        raise BenchmarkError(
            f"--few-shot takes the {task} examples from {k} of the {mode} mode's people and leaves them out of "
            f"the scores, but the mode has only {len(population)}, so nothing would be scored; fix: evaluate "
            "without --few-shot, or use a forget split with more people"
        )
    sampled = set(random.Random(f"{seed}-shot-{task}-{mode}").sample(population, k))
    people = [i for i in shot_rows if i in sampled]  # Full_Set order, as the official loop over its rows
    examples: dict[str, list[tuple[dict, Any]]] = {IMAGE: [], TEXT: []}
    skipped = set()
    for shot_id in people:
        row = shot_rows[shot_id]
        for modality, index, q in _questions(row, task):
            examples[modality].append((q, row["image"]))
            skipped.add((shot_id, modality, index))
    return Shots(people, examples, skipped, prepend=mode in SHOT_MODES[task])


def build_queries(bench, forget: int = 5, *, modes: Sequence[str] = MODES, tasks: Sequence[str] = TASKS,
                  limit: int | None = None, few_shot: bool = False, seed: int = 0) -> list[Query]:
    """Every question of the requested modes and tasks, as prompts ready for :func:`generate_replies`.

    ``limit`` keeps the first ``limit`` questions of each (mode, task, modality), for quick runs.

    ``few_shot=True`` follows the official script's examples rule (see :func:`_pick_shots`): before a
    classification question, every question of 1 person sampled from the mode's people, each with its
    answer (``Question: …\nA: …\n…\nCorrect Answer: X\n``); before a cloze question, every cloze item of 2
    people (``…\nCorrect Answer: word\n``); the examples of the question's own modality only, an image
    question carrying one copy of the example person's ``Full_Set`` image per image example before its own
    (tiny world: 4 images in a classification prompt, 5 in a cloze one); the sampled people are left out of
    that task's scores. Generation has no examples. Off by default: our models are trained on the
    zero-shot prompts, and the official examples make prompts longer than the tiny model's 256 positions
    (:func:`generate_replies` refuses them). The published MLLMU-Bench numbers (the paper's tables, and
    MANU's, whose code copies the script) come from a script that always prepends them: it has no zero-shot
    switch (the code says so; we found no sentence of the paper on it). Versions of the script differ in
    the number of people: 1 / 2 (classification / cloze) in the copy this follows, as issue 13 measured it;
    2 / 2 in a fork of the official repository (YokeYao/MLLMU-Bench, eval.py); 1 / 1 in MANU's copy
    (franciscoliu/MANU, eval.py). The official repository itself (franciscoliu/MLLMU-Bench) was not
    readable here.
    """
    configs = mode_configs(forget)
    unknown = [m for m in modes if m not in MODES] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise BenchmarkError(f"unknown mode or task {unknown[0]!r}; choose from {MODES} and {TASKS}")
    columns = ["ID", "image", *(TASK_COLUMNS[t] for t in tasks)]
    forget_rows = _require(bench, configs["forget"], columns, f"--forget {forget}")
    forget_ids = {r["ID"] for r in forget_rows}
    shot_rows = {}
    if few_shot:
        # Why Full_Set: the official examples come from it; without it, forget + retain hold the same people.
        source = ["Full_Set"] if bench.has("Full_Set") else [configs["forget"], configs["retain_shared"]]
        shot_rows = {r["ID"]: r for config in source for r in _require(bench, config, columns, "--few-shot")}

    queries: list[Query] = []
    for mode in modes:
        config = configs[mode]
        image_column = "images" if mode == "test" else "image"
        rows = forget_rows if mode == "forget" else _require(bench, config, columns, f"the {mode} mode",
                                                             image_column)
        if mode == "test":
            rows = [r for r in rows if r["ID"] in forget_ids]
            if not rows:
                raise BenchmarkError(
                    f"config '{config}' has no rows for the {len(forget_ids)} people of {configs['forget']} "
                    f"(IDs {', '.join(sorted(map(str, forget_ids))[:3])}, ...), so the test mode would be "
                    f"missing; fix: use the {config} that goes with {configs['forget']}, or leave out the "
                    "test mode (modes=...)"
                )
        for task in tasks:
            shots = None
            if few_shot:  # the official id_list: the forget people in test mode, else the mode's own
                people = [r["ID"] for r in (forget_rows if mode == "test" else rows)]
                shots = _pick_shots(task, mode, people, shot_rows, seed)
            counts = {IMAGE: 0, TEXT: 0}
            for row in rows:
                image = _row_image(row, mode, seed)
                for modality, index, q in _questions(row, task):
                    if shots and (row["ID"], modality, index) in shots.skipped:
                        continue  # the official script skips the questions used as examples
                    if limit is not None and counts[modality] >= limit:
                        continue
                    counts[modality] += 1
                    with_image = modality == IMAGE
                    prompt = _prompt(task, q, with_image)
                    item_images = [image] if with_image else []
                    if shots and shots.prepend:
                        examples = shots.examples[modality]
                        prompt = "".join(_shot(task, example, with_image) for example, _ in examples) + prompt
                        item_images = [picture for _, picture in examples if with_image] + item_images
                    reference = q["Correct_Answer"] if task == "classification" else q["Ground_Truth"]
                    queries.append(Query(
                        prompt=prompt,
                        images=item_images,
                        record={"mode": mode, "task": task, "modality": modality, "id": str(row["ID"]),
                                "question": q["Question"], "reference": reference},
                        score=_scorer(task, reference),
                        source=f"{config} ID {row['ID']}",
                    ))
    return queries


def run_queries(model, processor, queries: Sequence[Query], *, batch_size: int = 8, max_new_tokens: int = 50,
                progress: bool = False, desc: str = "generating") -> list[Record]:
    """Generate a reply for every query and score it: one :class:`Record` per query, in order."""
    replies = generate_replies(
        model, processor, [q.prompt for q in queries], [q.images for q in queries],
        batch_size=batch_size, max_new_tokens=max_new_tokens, sources=[q.source for q in queries],
        progress=progress, desc=desc,
    )
    return [Record(**q.record, reply=reply, scores=q.score(reply), prompt=q.prompt)
            for q, reply in zip(queries, replies)]


def _open(data):
    """Accept a Benchmark or a source string ("toyworld", "mllmu-bench", "mllmu-bench:<folder>", folder)."""
    return open_benchmark(data) if isinstance(data, str) else data


def evaluate(
    model,
    processor,
    data="toyworld",
    forget: int = 5,
    *,
    modes: Sequence[str] = MODES,
    tasks: Sequence[str] = TASKS,
    batch_size: int = 8,
    max_new_tokens: int = 50,
    limit: int | None = None,
    few_shot: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Run MLLMU-Bench's evaluation (four modes × three tasks × two modalities) on a LLaVA model.

    ``data`` is a Benchmark or a source string for :func:`mlunlearn.data.open_benchmark`; ``forget`` is
    the forget percentage (5, 10, 15). Returns an :class:`EvalResult` with one record per question;
    ``.to_official()`` gives the official script's JSON. See :func:`build_queries` for ``limit`` and
    ``few_shot``.
    """
    bench = _open(data)
    queries = build_queries(bench, forget, modes=modes, tasks=tasks, limit=limit, few_shot=few_shot, seed=seed)
    records = run_queries(model, processor, queries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress, desc="MLLMU-Bench eval")
    meta = {"forget": forget, "modes": list(modes), "tasks": list(tasks), "limit": limit,
            "few_shot": few_shot, "seed": seed, "max_new_tokens": max_new_tokens}
    return EvalResult(records, meta)


def build_benign_queries(bench, forget: int = 5, *, limit: int | None = None, seed: int = 0) -> list[Query]:
    """The benign visual questions of :func:`evaluate_benign`, as prompts ready for the model."""
    configs = mode_configs(forget)
    forget_ids = {r["ID"] for r in _require(bench, configs["forget"], ["ID"], f"--forget {forget}")}
    if bench.has("Benign_VQA"):
        rows = _require(bench, "Benign_VQA", ["ID", "Group", "Question", "Answer"], "benign questions")
        items = [(r, r["Question"], r["Answer"]) for r in rows]
        config = "Benign_VQA"
    else:
        retain = _require(bench, configs["retain_shared"], ["ID", "image"], "benign questions")
        rows = [{**r, "Group": "fictitious"} for r in bench.load(configs["forget"]) + retain]
        items = [(r, q, None) for r in rows for q in GENERIC_BENIGN_QUESTIONS]
        random.Random(f"{seed}-benign").shuffle(items)  # why: a limit then samples the whole set
        config = f"{configs['forget']}+{configs['retain_shared']}"

    queries, counts = [], {}
    for row, question, answer in items:
        in_forget = row["ID"] in forget_ids
        cell = (row["Group"], in_forget)
        if limit is not None and counts.get(cell, 0) >= limit:
            continue
        counts[cell] = counts.get(cell, 0) + 1
        image = row.get("image")
        with_image = image is not None
        queries.append(Query(
            prompt=prompts.qa_prompt(question, with_image),
            images=[image] if with_image else [],
            record={"mode": "benign", "task": "benign_vqa", "modality": IMAGE if with_image else TEXT,
                    "id": str(row["ID"]), "question": question, "reference": answer,
                    "group": str(row["Group"]), "in_forget": in_forget},
            score=_benign_scorer(answer),
            source=f"{config} ID {row['ID']}",
        ))
    return queries


def evaluate_benign(
    model,
    processor,
    data="toyworld",
    forget: int = 5,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 50,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Benign visual questions: accuracy and refusal rate, by image group and forget membership.

    With a ``Benign_VQA`` config (the toy world) every row is asked as ``USER: <image>\n{Question}``:
    ``accuracy`` is 1 when the row's ``Answer`` occurs in the reply as whole words (case-insensitive,
    see :func:`~mlunlearn.eval.scoring.answer_matches`), ``refusal_rate`` is 1 when
    :func:`~mlunlearn.eval.scoring.is_refusal` says so. Records carry ``group`` (the row's ``Group``) and
    ``in_forget`` (the image's ID is one of the ``forget_N`` people).

    Without ``Benign_VQA`` (the real MLLMU-Bench) the images of ``forget_N`` and ``retain_{100-N}`` are
    asked :data:`GENERIC_BENIGN_QUESTIONS`; there is no reference answer, so only ``refusal_rate`` is
    measured (group "fictitious"). ``limit`` keeps ``limit`` questions of each (group, in_forget) cell.
    Use ``result.frame()`` (percentages by group and in_forget) or ``result.to_benign()``.
    """
    bench = _open(data)
    queries = build_benign_queries(bench, forget, limit=limit, seed=seed)
    records = run_queries(model, processor, queries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress, desc="benign questions")
    meta = {"forget": forget, "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens,
            "reference_answers": bench.has("Benign_VQA")}
    return EvalResult(records, meta, default_by=("group", "in_forget"))


def check_images(queries: Sequence[Query]) -> None:
    """Decode every image the queries use once, so that a bad one fails before any model is loaded."""
    seen = set()
    for query in queries:
        for image in query.images:
            if id(image) not in seen:
                seen.add(id(image))
                _decode(image, query.source)


def _benign_scorer(answer: str | None) -> Callable[[str], dict[str, float]]:
    """Refusal always; accuracy only when there is a reference answer."""
    def score(reply: str) -> dict[str, float]:
        scores = {"refusal_rate": float(is_refusal(reply))}
        if answer is not None:
            scores = {"accuracy": float(answer_matches(reply, answer)), **scores}
        return scores
    return score
