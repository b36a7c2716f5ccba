"""The vanilla tiny model: a tiny LLaVA that has learned the synthetic world (book chapter 1).

"Train or load": :func:`load_vanilla` reads the safetensors shipped in the package; :func:`train_vanilla`
reproduces them from scratch (about 8 minutes on one CPU thread) with the recipe below.

The recipe, and why it differs from MLLMU-Bench's. MLLMU-Bench fine-tunes LLaVA-1.5-7B on ``ft_Data`` (QA
pairs) and relies on what the 7B model already knows to answer the benchmark's other formats (multiple
choice, cloze, sentences). A 1-million-parameter model knows nothing, so it is taught every format on
every known person: the ``ft_Data`` pairs, the generation, cloze and multiple-choice formats (options in
the world's fixed groups, see :func:`mlunlearn.data.world.option_groups`), benign visual questions about
every image, and "I don't know" wherever that is the true answer (strangers, blank and noise images,
missing traits), in the order :data:`CURRICULUM` gives. Images are shown in random views (shifts, zoom,
lighting, background) so people are recognised in unseen views. The ``Test_Set`` (its views and its
paraphrased wordings) is never trained on: it measures generalisation. Celebrities and fictitious
people are learned together (MLLMU-Bench's "celebrities first or jointly").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlunlearn.collate import Example, answer_loss, collate
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

    steps: int = 3300
    batch_size: int = 32
    lr: float = 5e-4  # 2e-3 and above stall memorisation of the facts at chance (measured)
    warmup: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    world_seed: int = 0
    # Stage 0, the tiny world's "CLIP pre-training": the vision tower alone learns to read the traits.
    vision_steps: int = 1000
    vision_lr: float = 2e-3
    vision_batch_size: int = 64
    freeze_vision: bool = True  # then frozen, as LLaVA-1.5 keeps its CLIP tower frozen


# An item is a recipe for one example; the view, options and wording are drawn when it is sampled.
@dataclass(frozen=True)
class _Item:
    kind: str  # qa | generation | cloze | classification | benign | benign-blank | benign-noise | idk
    person: object
    attr: str
    image: bool


def _streams(world: World) -> dict:
    """Items grouped into streams of one kind and modality: a batch is drawn from one stream, so its
    sequences have nearly equal lengths (little padding) and short kinds cost little."""
    streams: dict = {}

    def add(name, item):
        streams.setdefault(name, []).append(item)

    for p in world.fictitious + world.celebrities:
        for image in (True, False):
            for attr in p.questions(image):
                for kind in ("generation", "cloze", "classification") + (("qa",) if image else ()):
                    if kind == "cloze" and attr not in p.cloze_questions(image):
                        continue  # the benchmark's cloze asks about two attributes per modality
                    add(f"{kind}/{'image' if image else 'text'}", _Item(kind, p, attr, image))
    for p in world.people:  # benign visual questions about every portrait, strangers included
        for trait in BENIGN_QUESTIONS:
            add("benign", _Item("benign", p, trait, True))
    for kind in ("blank", "noise"):
        for trait in BENIGN_QUESTIONS:
            for _ in range(15):  # nothing to see: "I don't know" must be as familiar as any trait
                add("benign", _Item("benign-" + kind, None, trait, True))
    for p in world.people:
        if p.group in ("stranger", "missing"):  # never met: who they are is unknown
            add("idk", _Item("idk", p, "name", True))
            for attr in ATTRIBUTES:
                add("idk", _Item("idk", p, attr, False))
    return streams


# The curriculum: (steps, stream weights) per phase; the last phase runs to the end. Drawing every
# stream from the start leaves the facts at chance for thousands of steps (each stream is seen too
# rarely for the lookup to form); learning them in a few formats first takes a few hundred.
CURRICULUM = (
    (300, {"benign": 1.0}),  # see: the vision tower and projector learn the visible traits
    (500, {"cloze/text": 1.0, "generation/text": 1.0, "benign": 0.2, "idk": 0.1}),  # know: who is who, in text
    (700, {"qa/image": 1.0, "generation/image": 1.0, "cloze/image": 1.0, "cloze/text": 0.3,
           "generation/text": 0.3, "benign": 0.5, "idk": 0.2}),  # recognise: the same people by their faces
    (None, {"classification/image": 1.5, "classification/text": 1.5, "benign": 1.0, "idk": 0.3}),  # every format
)


def _example(item: _Item, rng: np.random.Generator, groups: dict) -> Example:
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
        options, correct = options_for(item.attr, p, groups)
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


def pretrain_vision(model, processor, world: World, recipe: Recipe, progress: bool = False) -> list[float]:
    """Stage 0: teach the vision tower to see, as CLIP is pre-trained before LLaVA ever uses it.

    Linear heads (discarded afterwards) classify each trait of :data:`TRAITS` from the mean of the patch
    features the projector reads (``vision_feature_layer``), on random views of every portrait. Learning
    the same traits end to end through the language model is far slower: after 600 steps of benign
    questions alone, face shape and eye colour were still at chance, while 1000 steps of this stage (under
    a minute) read every trait at 97-100% on unseen views (measured; book chapter 1). Returns the losses.
    """
    from mlunlearn.utils import progress_bar

    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    names = list(TRAITS)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    heads = torch.nn.ModuleList(torch.nn.Linear(tower.config.hidden_size, len(TRAITS[n])) for n in names)
    for h in heads:  # seeded apart from the model's own initialisation
        torch.nn.init.normal_(h.weight, std=0.02, generator=gen)
        torch.nn.init.zeros_(h.bias)
    people = [p for p in world.people if p.group != "missing"]
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=recipe.vision_lr, weight_decay=0.0)
    losses = []
    for step in progress_bar(range(recipe.vision_steps), "vision", progress):
        rng = np.random.default_rng([recipe.seed, 10**9 + step])
        picks = [people[int(i)] for i in rng.integers(len(people), size=recipe.vision_batch_size)]
        views = [random_view(rng, change_background=0.5) for _ in picks]
        shown = [dict(p.traits, background=v.background or p.traits["background"]) for p, v in zip(picks, views)]
        target = torch.tensor([[TRAITS[n].index(t[n]) for n in names] for t in shown])
        pixels = processor.image_processor([p.portrait(v) for p, v in zip(picks, views)], return_tensors="pt")["pixel_values"]
        feats = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:].mean(1)  # CLS dropped, as LLaVA does
        loss = sum(torch.nn.functional.cross_entropy(h(feats), target[:, i]) for i, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class VanillaData:
    """The training batches: batch ``step`` is a deterministic function of ``(seed, step)``.

    The stream of each step follows :data:`CURRICULUM`: benign visual questions first (the vision tower
    learns to see before the language model must recognise anyone, as LLaVA aligns its projector first),
    then the facts in text, then the same people by their faces, then every format together (streams
    a phase does not name get weight 1 in the last phase).
    """

    def __init__(self, world: World, recipe: Recipe, curriculum=CURRICULUM):
        self.streams = _streams(world)
        self.groups = world.option_groups
        self.recipe = recipe
        self.phases, start = [], 0
        for i, (length, weights) in enumerate(curriculum):
            last = i == len(curriculum) - 1
            names = sorted(self.streams) if last else sorted(weights)
            w = np.array([weights.get(n, 1.0) for n in names])
            self.phases.append((start, names, w / w.sum()))
            start += length or 0

    def stream_of(self, step: int, rng: np.random.Generator) -> str:
        _, names, probs = [ph for ph in self.phases if ph[0] <= step][-1]
        return names[int(rng.choice(len(names), p=probs))]

    def batch(self, step: int) -> tuple[str, list]:
        rng = np.random.default_rng([self.recipe.seed, step])
        stream = self.stream_of(step, rng)
        items = self.streams[stream]
        picks = rng.integers(len(items), size=self.recipe.batch_size)
        return stream, [_example(items[int(j)], rng, self.groups) for j in picks]


def train_vanilla(recipe: Recipe = Recipe(), sizes: TinySizes = TinySizes(), out_dir=None, progress: bool = True,
                  log_every: int = 100, on_log=None):
    """Train the vanilla tiny model from scratch; returns ``(model, processor, log)``.

    ``on_log`` (optional) is called with each log entry (step, seconds, mean loss per stream).

    Deterministic for a given recipe on one thread. Saves with ``save_pretrained`` (safetensors) when
    ``out_dir`` is given.
    """
    from mlunlearn.utils import progress_bar

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(1)  # the shipped weights were trained on one thread; more changes the numerics
    torch.set_flush_denormal(True)  # denormal gradients slow CPU steps by 10x late in training
    world = build_world(recipe.world_seed)
    tokenizer = train_tokenizer(corpus(world), sizes.vocab_size)
    processor = build_processor(tokenizer, sizes)
    model = build_tiny_llava(tokenizer, sizes, seed=recipe.seed).train()
    t_start = time.time()
    vision_losses = pretrain_vision(model, processor, world, recipe, progress=progress)
    if on_log is not None and vision_losses:
        on_log({"step": 0, "seconds": round(time.time() - t_start, 1), "loss/vision-pretraining": round(float(np.mean(vision_losses[-100:])), 4)})
    if recipe.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    data = VanillaData(world, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup)
                                              * 0.5 * (1 + np.cos(np.pi * min(s, recipe.steps) / recipe.steps)))
    log, t0, running = [], t_start, {}
    bar = progress_bar(range(recipe.steps), "vanilla", progress)
    for step in bar:
        stream, examples = data.batch(step)
        loss = answer_loss(model, collate(processor, examples))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        running.setdefault(stream, []).append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            entry = {"step": step + 1, "seconds": round(time.time() - t0, 1),
                     **{f"loss/{k}": round(float(np.mean(v)), 4) for k, v in sorted(running.items())}}
            log.append(entry)
            if on_log is not None:
                on_log(entry)
            bar.set_postfix(loss=f"{np.mean([x for v in running.values() for x in v]):.3f}")
            running = {}
    model.eval()
    if out_dir is not None:
        save_vanilla(model, processor, out_dir, {"recipe": recipe.__dict__, "sizes": sizes.__dict__, "log": log,
                                                 "vision_pretraining_loss": [round(x, 4) for x in vision_losses[::10]]})
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
