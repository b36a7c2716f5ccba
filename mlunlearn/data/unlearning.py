"""The data an unlearning run trains on: forget and retain examples, paired per step (book chapter 2).

What we forget is what fine-tuning taught: the ``ft_Data`` question-answer pairs (image + question →
answer) of the people in ``forget_{N}``; the retain examples are the ``ft_Data`` pairs of the people in
``retain_{100-N}``. This is MLLMU-Bench's setting, and it reads the real benchmark and the synthetic world
alike. The other formats (multiple choice, cloze, text-only questions) are never trained on: whether
forgetting transfers to them is part of what the evaluation measures.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from mlunlearn.collate import Example, collate
from mlunlearn.data.bench import BenchmarkError, decode_image, require_columns
from mlunlearn.data.refusals import REFUSALS
from mlunlearn.eval import prompts


class UnlearningDataError(ValueError):
    """The forget/retain data cannot make a valid run (empty, overlapping, malformed)."""


@dataclass
class UnlearningData:
    """Forget and retain examples, plus the derived examples some methods need (same order as ``forget``).

    ``forget_refusal[i]``: forget question i answered with a refusal (PO); ``pd[i]``: forget question i
    asked about another (retain) person's image, answered as the original model answered it (Prompt
    Decouple); filled by :func:`add_prompt_decouple`. ``knowledge``: text-only question-answer pairs of
    *every* profile, forget people included (MMUnlearner's preserve set for the language model); filled
    by :func:`add_knowledge`. A benchmark may give ``pd`` itself (``pd_given``): SafeEraser's pairs are the
    same question with a benign image answered by its ``sd_response``, data kept as it is.
    """

    forget: list
    retain: list
    forget_ids: list
    retain_ids: list
    forget_refusal: list | None = None
    pd: list | None = None
    knowledge: list | None = None
    source: str | None = None  # where it came from, for run.json (e.g. "toyworld forget_10 - forget_5")
    pd_given: bool = False  # ``pd`` is the benchmark's own data, not the model's replies

    def summary(self) -> str:
        return (f"{len(self.forget)} forget examples ({len(self.forget_ids)} people), "
                f"{len(self.retain)} retain examples ({len(self.retain_ids)} people)")


def _pairs(rows: list, config: str) -> list:
    require_columns(rows, ("image", "ID", "metadata"), config)
    out = []
    for row in rows:
        meta = row["metadata"]
        meta = json.loads(meta) if isinstance(meta, str) else meta
        image = decode_image(row["image"])
        for qa in meta:
            out.append((row["ID"], Example(prompts.qa_prompt(qa["Question"], True), qa["Answer"], image)))
    return out


def unlearning_data(bench, forget: int = 5) -> UnlearningData:
    """Forget/retain examples for ``forget_{forget}`` of a benchmark (:func:`mlunlearn.data.open_benchmark`)."""
    forget_cfg, retain_cfg = f"forget_{forget}", f"retain_{100 - forget}"
    forget_ids = [r["ID"] for r in bench.load(forget_cfg)]
    retain_ids = [r["ID"] for r in bench.load(retain_cfg)]
    if not forget_ids:
        raise UnlearningDataError(f"{forget_cfg} of {bench.name} is empty: there is nothing to forget; "
                                  "check the benchmark folder")
    overlap = sorted(set(forget_ids) & set(retain_ids))
    if overlap:
        raise UnlearningDataError(f"{len(overlap)} people are in both {forget_cfg} and {retain_cfg} "
                                  f"(IDs {', '.join(overlap[:5])}); the forget and retain sets must be disjoint")
    pairs = _pairs(bench.load("ft_Data"), "ft_Data")
    f_set, r_set = set(forget_ids), set(retain_ids)
    data = UnlearningData(forget=[e for i, e in pairs if i in f_set], retain=[e for i, e in pairs if i in r_set],
                          forget_ids=forget_ids, retain_ids=retain_ids, source=f"{bench.name} {forget_cfg}")
    if not data.forget:
        raise UnlearningDataError(f"ft_Data of {bench.name} has no question-answer pairs for the people of "
                                  f"{forget_cfg}; is ft_Data complete?")
    if not data.retain:
        raise UnlearningDataError(f"ft_Data of {bench.name} has no pairs for {retain_cfg}: nothing to retain")
    return data


def add_refusals(data: UnlearningData) -> UnlearningData:
    """Pair each forget question with a refusal answer (cycling through :data:`REFUSALS`)."""
    data.forget_refusal = [Example(e.prompt, REFUSALS[i % len(REFUSALS)], e.image) for i, e in enumerate(data.forget)]
    return data


def knowledge_examples(bench) -> list:
    """Text-only question-answer pairs of every profile in ``Full_Set`` (forget people included), as
    MMUnlearner's public code builds them (its ``MLLMU_text_Dataset``): each
    ``Classification_Task["Pure_Text_Questions"]`` item becomes question → the correct option's text,
    asked without an image."""
    rows = bench.load("Full_Set")
    require_columns(rows, ("ID", "Classification_Task"), "Full_Set")
    out = []
    for row in rows:
        for q in (row["Classification_Task"] or {}).get("Pure_Text_Questions") or []:
            try:
                answer = q["Options"][q["Correct_Answer"]]
            except (KeyError, TypeError):
                raise BenchmarkError(f"Full_Set row ID {row['ID']}: a Pure_Text_Questions item has no option "
                                     f"for its Correct_Answer ({str(q)[:60]!r}); is this MLLMU-Bench's layout?") from None
            out.append(Example(prompts.qa_prompt(q["Question"], False), str(answer)))
    if not out:
        raise BenchmarkError(f"Full_Set of {bench.name} has no Pure_Text_Questions: the text-only preserve set "
                             "would be empty")
    return out


def add_knowledge(data: UnlearningData, bench) -> UnlearningData:
    """Fill ``data.knowledge`` with :func:`knowledge_examples` of ``bench``."""
    data.knowledge = knowledge_examples(bench)
    return data


def add_prompt_decouple(data: UnlearningData, model, processor, batch_size: int = 8) -> UnlearningData:
    """SafeEraser's Prompt Decouple examples: forget question i, asked about a retain person's image,
    answered with the original model's own greedy reply (SafeEraser's ``sd_response``).

    Called before training, so the replies are the vanilla model's. The retain image is chosen
    deterministically (spread over the retain people).
    """
    from mlunlearn.eval.protocol import generate_replies

    textual = sum(e.image is None for e in data.forget)
    if textual:  # e.g. CLEAR's forget sets, which mix TOFU's text-only questions with the faces
        raise UnlearningDataError(f"Prompt Decouple asks each forget question about another person's image, and "
                                  f"{textual} of the {len(data.forget)} forget examples have no image; fix: pd=off "
                                  "for this data")
    images = [e.image for e in data.retain if e.image is not None]
    if not images:
        raise UnlearningDataError("Prompt Decouple needs retain examples with images to ask the forget questions "
                                  "about, and this retain set has none; fix: pd=off for this data")
    step = max(1, len(images) // max(1, len(data.forget)))
    others = [images[(i * step + step // 2) % len(images)] for i in range(len(data.forget))]
    replies = generate_replies(model, processor, [e.prompt for e in data.forget], [[im] for im in others],
                               batch_size=batch_size, max_new_tokens=50)
    data.pd = [Example(e.prompt, r.strip(), im) for e, im, r in zip(data.forget, others, replies)]
    return data


def _draw(seed: int, epoch: int, index: int, n: int) -> int:
    """A retain index in ``range(n)`` that depends on nothing but ``(seed, epoch, index)``.

    ``random.Random`` seeded with a string hashes it with SHA-512, so the draw is the same in every
    process, after a resume, and whatever ``PYTHONHASHSEED`` is.
    """
    return random.Random(f"retain:{seed}:{epoch}:{index}").randrange(n)


class PairedSampler(torch.utils.data.Sampler):
    """Shuffles the forget set once per epoch from ``(seed, epoch)`` alone, and tells the dataset the epoch.

    It yields ``epoch · N + i`` for forget example ``i`` (N = forget set size), so :class:`PairedDataset`
    can draw the retain partner from ``(seed, epoch, i)``. Neither the order nor the partner touches torch's
    global generator (which dropout also uses): a run killed and resumed from a checkpoint, or split over
    several processes by accelerate (which shards this sampler's batches), sees exactly the same pairs.
    The Trainer calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"order:{self.seed}:{self.epoch}").shuffle(order)
        return iter(self.epoch * self.n + i for i in order)


class PairedDataset(torch.utils.data.Dataset):
    """Indexed by the forget set: item i is forget example i with a retain example drawn for it.

    The partner is a function of ``(seed, epoch, i)`` (see :class:`PairedSampler`, which passes the epoch
    as ``epoch · N + i``; a plain ``i < N`` is epoch 0). Each epoch pairs every forget example with a
    new retain example; the same seed gives the same pairs in any process, before and after a resume.
    """

    def __init__(self, data: UnlearningData, seed: int = 0):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return len(self.data.forget)

    def __getitem__(self, j: int) -> dict:
        d = self.data
        epoch, i = divmod(int(j), len(d.forget))
        item = {"forget": d.forget[i], "retain": d.retain[_draw(self.seed, epoch, i, len(d.retain))]}
        if d.forget_refusal is not None:
            item["forget_refusal"] = d.forget_refusal[i]
        if d.pd is not None:
            item["pd"] = d.pd[i]
        return item


class PhasedDataset(torch.utils.data.Dataset):
    """For methods that alternate steps (e.g. MMUnlearner: a masked forget step, then retain steps):
    each optimiser step sees one stream only, as the method's :meth:`~mlunlearn.methods.Method.phases`
    plan says.

    ``plan`` lists one epoch's optimiser steps in order, each ``"forget"`` or ``"retain"``. A step takes
    ``batch_size · repeat`` consecutive items (``repeat`` = gradient-accumulation steps × processes, so
    that every micro-batch of one optimiser step, in every process, is of the same phase), drawn in
    turn from that epoch's shuffled forget or retain order (wrapping around when a stream runs out).
    The orders depend on ``(seed, epoch)`` only, like :class:`PairedSampler`'s, so a resumed run sees
    the same steps; the sampler must not shuffle (``shuffled = False``). Items carry ``"phase"``.
    """

    shuffled = False  # the order is the plan's: the sampler yields indices in sequence

    def __init__(self, data: UnlearningData, plan: list, batch_size: int, repeat: int = 1, seed: int = 0):
        bad = sorted({p for p in plan} - {"forget", "retain"})
        if not plan or bad:
            raise UnlearningDataError(f"a step plan needs 'forget'/'retain' steps; got {bad or 'none'}")
        self.data, self.plan, self.seed = data, list(plan), seed
        self.block = batch_size * repeat
        self.length = len(self.plan) * self.block
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.length

    def steps(self, epoch: int) -> list:
        """``[(phase, example index)]`` for every item of ``epoch``, in order."""
        if epoch not in self._cache:
            orders, used = {}, {"forget": 0, "retain": 0}
            for stream in used:
                orders[stream] = list(range(len(getattr(self.data, stream))))
                random.Random(f"{stream}:{self.seed}:{epoch}").shuffle(orders[stream])
            out = []
            for phase in self.plan:
                for _ in range(self.block):
                    order = orders[phase]
                    out.append((phase, order[used[phase] % len(order)]))
                    used[phase] += 1
            self._cache = {epoch: out}
        return self._cache[epoch]

    def __getitem__(self, j: int) -> dict:
        d = self.data
        epoch, k = divmod(int(j), self.length)
        phase, i = self.steps(epoch)[k]
        if phase == "retain":
            return {"phase": "retain", "retain": d.retain[i]}
        item = {"phase": "forget", "forget": d.forget[i]}
        if d.forget_refusal is not None:
            item["forget_refusal"] = d.forget_refusal[i]
        if d.pd is not None:
            item["pd"] = d.pd[i]
        return item


class PairedCollator:
    """A list of items → ``{key: LLaVA batch}`` (one collated batch per key; a ``"phase"`` is kept as is)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list) -> dict:
        out = {key: collate(self.processor, [it[key] for it in items]) for key in items[0] if key != "phase"}
        if "phase" in items[0]:
            phases = {it["phase"] for it in items}
            if len(phases) != 1:
                raise UnlearningDataError(f"a batch mixes the phases {sorted(phases)}; the step plan's blocks "
                                          "must be whole batches")
            out["phase"] = phases.pop()
        return out


__all__ = ["BenchmarkError", "PairedCollator", "PairedDataset", "PairedSampler", "PhasedDataset", "UnlearningData", "UnlearningDataError",
           "add_knowledge", "add_prompt_decouple", "add_refusals", "knowledge_examples", "unlearning_data"]
