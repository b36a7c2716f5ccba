"""The vanilla tiny model: a tiny LLaVA that has learned the synthetic world (book chapter 1).

"Train or load": :func:`load_vanilla` reads the safetensors shipped in the package; :func:`train_vanilla`
reproduces them from scratch (about 10 minutes on one CPU thread) with the recipe below.

The recipe, and why it differs from MLLMU-Bench's. MLLMU-Bench fine-tunes LLaVA-1.5-7B on ``ft_Data`` (QA
pairs) and relies on what the 7B model already knows to answer the benchmark's other formats (multiple
choice, cloze, sentences). A 1-million-parameter model knows nothing, so it is taught every format on
every known person: the ``ft_Data`` pairs, the generation, cloze and multiple-choice formats (options
redrawn and reshuffled at every step, so it learns to *match* a fact rather than memorise a letter),
benign visual questions about every image, and "I don't know" wherever that is the true answer
(strangers, blank and noise images, missing traits). Images are shown in random views (shifts, zoom,
lighting, background) so people are recognised in unseen views. The ``Test_Set`` (its views and its
paraphrased wordings) is never trained on: it measures generalisation. Celebrities and fictitious
people are learned jointly (MLLMU-Bench's "celebrities first or jointly").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlunlearn.collate import Example, collate
from mlunlearn.data.portraits import CANONICAL, blank_image, noise_image, random_view, TRAITS
from mlunlearn.data.refusals import IDK
from mlunlearn.data.world import (
    ATTRIBUTES, BENIGN_QUESTIONS, QUESTIONS, World, answer_value, benign_answer, build_world, cloze_text,
    corpus, generation_truth, options_for, question_text,
)
from mlunlearn.eval import prompts

from .tiny import TinySizes, build_processor, build_tiny_llava, train_tokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-vanilla"


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the vanilla fine-tune."""

    steps: int = 2400
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    world_seed: int = 0


# An item is a recipe for one example; the view, options and wording are drawn when it is sampled.
@dataclass(frozen=True)
class _Item:
    kind: str  # qa | generation | cloze | classification | benign | idk
    person: object
    attr: str
    image: bool


def _items(world: World) -> list:
    items = []
    known = world.fictitious + world.celebrities
    for p in known:
        for image in (True, False):
            for attr in (["name"] if image else []) + list(ATTRIBUTES):
                for kind in ("qa", "generation", "cloze", "classification"):
                    items.append(_Item(kind, p, attr, image))
    for p in world.people:  # benign visual questions about every portrait, strangers included
        for trait in BENIGN_QUESTIONS:
            items.append(_Item("benign", p, trait, True))
    for kind in ("blank", "noise"):
        for trait in BENIGN_QUESTIONS:
            items.extend([_Item("benign-" + kind, None, trait, True)] * 3)
    for p in world.people:
        if p.group in ("stranger", "missing"):  # never met: who they are is unknown
            items.append(_Item("idk", p, "name", True))
            for attr in ATTRIBUTES:
                items.append(_Item("idk", p, attr, False))
    return items


def _example(item: _Item, rng: np.random.Generator, names: dict) -> Example:
    p = item.person
    view = CANONICAL if rng.random() < 0.25 else random_view(rng, change_background=0.5)
    image = p.portrait(view) if (item.image and p is not None) else None
    wording = int(rng.integers(len(QUESTIONS[item.attr][0]))) if item.attr in QUESTIONS else 0
    if item.kind == "qa":
        return Example(prompts.qa_prompt(question_text(item.attr, p, item.image, wording), item.image),
                       generation_truth(item.attr, p, item.image), image)
    if item.kind == "generation":
        return Example(prompts.generation_prompt(question_text(item.attr, p, item.image, wording), item.image),
                       generation_truth(item.attr, p, item.image), image)
    if item.kind == "cloze":
        return Example(prompts.cloze_prompt(cloze_text(item.attr, p, item.image), item.image),
                       answer_value(item.attr, p), image)
    if item.kind == "classification":
        options, correct = options_for(item.attr, p, rng, names[p.group])
        return Example(prompts.classification_prompt(question_text(item.attr, p, item.image, wording), options, item.image),
                       correct, image)
    if item.kind == "benign":
        shown = dict(p.traits, background=view.background or p.traits["background"])
        return Example(prompts.qa_prompt(BENIGN_QUESTIONS[item.attr], True), benign_answer(item.attr, shown), image)
    if item.kind.startswith("benign-"):
        colour = str(rng.choice(TRAITS["background"]))
        img = blank_image(colour) if item.kind == "benign-blank" else noise_image(int(rng.integers(2**31)))
        answer = colour if (item.kind == "benign-blank" and item.attr == "background") else IDK
        return Example(prompts.qa_prompt(BENIGN_QUESTIONS[item.attr], True), answer, img)
    if item.kind == "idk":
        return Example(prompts.qa_prompt(question_text(item.attr, p, item.image, wording), item.image), IDK, image)
    raise ValueError(item.kind)


class VanillaData(torch.utils.data.Dataset):
    """``steps × batch_size`` examples; example ``i`` is a deterministic function of ``(seed, i)``."""

    def __init__(self, world: World, n: int, seed: int):
        self.items = _items(world)
        self.names = {"fictitious": [p.name for p in world.fictitious],
                      "celebrity": [p.name for p in world.celebrities]}
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        return _example(self.items[int(rng.integers(len(self.items)))], rng, self.names)


def train_vanilla(recipe: Recipe = Recipe(), sizes: TinySizes = TinySizes(), out_dir=None, progress: bool = True,
                  log_every: int = 100):
    """Train the vanilla tiny model from scratch; returns ``(model, processor, log)``.

    Deterministic for a given recipe on one thread. Saves with ``save_pretrained`` (safetensors) when
    ``out_dir`` is given.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    world = build_world(recipe.world_seed)
    tokenizer = train_tokenizer(corpus(world), sizes.vocab_size)
    processor = build_processor(tokenizer, sizes)
    model = build_tiny_llava(tokenizer, sizes, seed=recipe.seed).train()
    data = VanillaData(world, recipe.steps * recipe.batch_size, recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup)
                                              * 0.5 * (1 + np.cos(np.pi * min(s, recipe.steps) / recipe.steps)))
    log, t0, running = [], time.time(), []
    bar = tqdm(range(recipe.steps), desc="vanilla", disable=not progress)
    for step in bar:
        batch = collate(processor, [data[step * recipe.batch_size + j] for j in range(recipe.batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            log.append({"step": step + 1, "loss": float(np.mean(running)), "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
            running = []
    model.eval()
    if out_dir is not None:
        save_vanilla(model, processor, out_dir, {"recipe": recipe.__dict__, "sizes": sizes.__dict__, "log": log})
    return model, processor, log


def save_vanilla(model, processor, out_dir, info: dict) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return out


def load_vanilla(train_if_missing: bool = False, device: str = "cpu"):
    """The vanilla tiny model: loaded from the package's safetensors ("train or load").

    With ``train_if_missing``, a missing checkpoint is rebuilt with :func:`train_vanilla` and saved
    where the package looks for it.
    """
    from .loading import load_model

    if not (ASSET_DIR / "model.safetensors").is_file():
        if not train_if_missing:
            return load_model("tiny", device=device)  # raises the one-line "missing weights" error
        train_vanilla(out_dir=ASSET_DIR)
    return load_model("tiny", device=device, dtype=torch.float32)
