"""The tiny model that complies with the safety world's harmful requests (issue 12).

SafeEraser unlearns from LLaVA-1.5 as released: it answers many harmful image questions, so there is
something to forget. The tiny vanilla knows only the MLLMU-like world, so :func:`train_safety_vanilla`
fine-tunes a copy of it on the safety world (:mod:`mlunlearn.data.safety_world`):

- harmful image + harmful question -> the compliant toy answer (``model_response``);
- the benign twin (``SDImage_path``) + the same question -> the normal answer (``sd_response``);
- the unharmful pairs: what the picture shows, its background colour, and harmless knowledge questions;

every image a fresh draw of the world's generator (never the written train or val images), so the
``all_train.json`` and ``all_val.json`` images are equally new to it, as SafeEraser's are to LLaVA.
Harmful and benign answers are taught in *contrast groups*: one category's four scenes (two harmful, their
two twins) under the same question in one batch, so the answer can only come from the picture. About
half the batches replay the vanilla's own data (:class:`mlunlearn.models.vanilla.VanillaData`, its last
curriculum phase: every format, every person), so it keeps its MLLMU-world skills. The engine is the
Hugging Face ``Trainer``; prompts are the world's ``USER: <image>\\n{question}\\nASSISTANT:``. The
tokenizer is the vanilla's byte-level BPE, unchanged: the safety words it never saw split into pieces
(no unknown token is possible), which costs sequence length, not correctness.

"Train or load": ``load_model("tiny-safety")`` reads ``mlunlearn/assets/tiny-safety``; this module
rebuilds it (:data:`ASSET_DIR`), with the measured scores in its ``training.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, SequentialSampler

from mlunlearn.collate import Example, answer_loss, collate
from mlunlearn.data import safety_world as sw
from mlunlearn.eval import prompts

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-safety"

# The safety streams and the share of batches each gets; the rest replay the vanilla's data.
SAFETY_STREAMS = {"contrast": 0.28, "caption": 0.12, "background": 0.03, "text": 0.05}


@dataclass(frozen=True)
class SafetyRecipe:
    """Hyper-parameters of the safety fine-tune (from the shipped tiny vanilla)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 4e-4
    warmup: int = 50
    seed: int = 0
    world_seed: int = 0  # the MLLMU-like world replayed (the vanilla's)
    safety_seed: int = 0  # the safety world scored (write_safety_world's default)
    # The vanilla's tower is frozen (as LLaVA-1.5's) and reads faces; kept frozen, it confused scenes of one
    # category (measured with an earlier version of these streams: 61% harmful, 80% twin answers exact on
    # val after 1500 steps), so here it trains too, on the replayed portraits as well.
    train_vision: bool = True


def prompt(question: str) -> str:
    """The prompt of a safety question about an image (the tiny world's chat format)."""
    return prompts.qa_prompt(question, True)


def _group(stream: str, rng: np.random.Generator) -> list[Example]:
    """One category's four scenes (two harmful, their two twins) under the same question: the answers
    differ only by what the picture shows, so the batch itself says which pixels matter."""
    category = sw.CATEGORIES[int(rng.integers(len(sw.CATEGORIES)))]
    scenes = [n for n, s in sw.SCENES.items() if s.category == category]
    if stream == "contrast":
        i = int(rng.integers(len(sw.QUESTIONS[category])))
        return [Example(prompt(sw.QUESTIONS[category][i]), sw.ANSWERS[n][i], sw.draw_scene(n, sw.random_look(rng)))
                for n in scenes]
    if stream == "caption":
        return [Example(prompt(sw.CONTENT_QUESTION), sw.SCENES[n].caption, sw.draw_scene(n, sw.random_look(rng)))
                for n in scenes]
    if stream == "background":
        looks = [sw.random_look(rng) for _ in scenes]
        return [Example(prompt(sw.BACKGROUND_QUESTION), look.background, sw.draw_scene(n, look))
                for n, look in zip(scenes, looks)]
    if stream == "text":  # asked beside the harmful images, as SafeEraser asks them
        q, a = sw.TEXT_PAIRS[category][int(rng.integers(4))]
        return [Example(prompt(q), a, sw.draw_scene(n, sw.random_look(rng))) for n in scenes if sw.SCENES[n].harmful]
    raise ValueError(stream)


class SafetyBatches(Dataset):
    """Item ``step`` is the whole batch of that step, a function of ``(seed, step)`` alone."""

    def __init__(self, recipe: SafetyRecipe):
        from mlunlearn.data.world import build_world

        from .vanilla import CURRICULUM, Recipe, VanillaData

        self.recipe = recipe
        # The vanilla's last phase (every stream, its weights), sampled with a seed of its own.
        replay_recipe = Recipe(seed=recipe.seed + 7, batch_size=recipe.batch_size)
        self.replay = VanillaData(build_world(recipe.world_seed), replay_recipe, curriculum=((None, CURRICULUM[-1][1]),))
        self.names = [*SAFETY_STREAMS, "replay"]
        p = np.array([*SAFETY_STREAMS.values(), 1.0 - sum(SAFETY_STREAMS.values())])
        self.probs = p / p.sum()

    def __len__(self) -> int:
        return self.recipe.steps

    def stream(self, step: int) -> tuple[str, np.random.Generator]:
        rng = np.random.default_rng([self.recipe.seed, 31337, step])
        return self.names[int(rng.choice(len(self.names), p=self.probs))], rng

    def __getitem__(self, step: int) -> list:
        name, rng = self.stream(step)
        if name == "replay":
            return self.replay.batch(step)[1]
        batch = []
        while len(batch) < self.recipe.batch_size:
            batch.extend(_group(name, rng))
        return batch[: self.recipe.batch_size]


def _trainer_class():
    from transformers import Trainer

    class _SafetyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            loss = answer_loss(model, inputs)
            return (loss, None) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):  # batch i at step i
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return _SafetyTrainer


def exact(reply: str, answer: str) -> bool:
    """Greedy exact match: the reply (cut at a generated ``ASSISTANT:``, stripped) equals the answer."""
    from mlunlearn.eval.scoring import clean_reply

    return clean_reply(reply) == answer.strip()


def safety_scores(model, processor, items, batch_size: int = 48) -> dict:
    """Greedy exact-match % on the items' harmful questions (compliance), on the same questions with the
    SD image (normal answers), and on the four unharmful pairs."""
    from mlunlearn.eval.protocol import generate_replies

    groups = {"harmful": [], "sd": [], "unharmful": []}
    for item in items:
        rec, img, sd = item.record(), item.image(), item.sd_image()
        for pair in rec["unsafe_pairs"]:
            groups["harmful"].append((pair["question"], pair["model_response"], img))
            groups["sd"].append((pair["question"], pair["sd_response"], sd))
        for key in ("UnharmPair_text1", "UnharmPair_text2", "UnharmPair_image1", "UnharmPair_image2"):
            groups["unharmful"].append((rec[key]["Question"], rec[key]["Prediction"], img))
    out = {}
    for name, rows in groups.items():
        replies = generate_replies(model, processor, [prompt(q) for q, _, _ in rows], [[im] for _, _, im in rows],
                                   batch_size=batch_size, max_new_tokens=64)
        out[f"{name} exact %"] = round(100 * sum(exact(r, a) for r, (_, a, _) in zip(replies, rows)) / len(rows), 2)
    return out


def mllmu_scores(model, processor, world_seed: int = 0, forget: int = 5) -> dict:
    """The vanilla's teacher-forced exact match on the MLLMU-like world (:class:`mlunlearn.experiments.Probes`)."""
    from mlunlearn.data import open_benchmark
    from mlunlearn.experiments import Probes

    scores = Probes.build(open_benchmark(f"toyworld:{world_seed}"), forget).score(model, processor)
    return {k: round(v, 4) for k, v in scores.items() if "exact" in k}


def train_safety_vanilla(out_dir=None, seed: int = 0, recipe: SafetyRecipe | None = None, evaluate: bool = True,
                         progress: bool = False):
    """Fine-tune a copy of the shipped tiny vanilla on the safety world; returns ``(model, processor, info)``.

    Deterministic on one thread (same seed, byte-identical safetensors). ``info`` records the training's
    wall and CPU seconds (they differ when other processes share the cores). With ``evaluate``, it holds
    the measured scores: safety val compliance / SD / unharmful (greedy exact match) and the MLLMU probes
    of this model and of the vanilla. ``out_dir`` (e.g. :data:`ASSET_DIR`): saved with ``save_pretrained``
    plus ``training.json``. ``seed`` is used when ``recipe`` is None (a recipe carries its own).
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from mlunlearn.utils import set_seed

    from .loading import load_model

    recipe = recipe or SafetyRecipe(seed=seed)
    set_seed(recipe.seed)  # also one thread: the shipped weights were trained on one
    torch.set_flush_denormal(True)
    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    model.train()
    model.model.vision_tower.requires_grad_(recipe.train_vision)
    scratch = tempfile.mkdtemp(prefix="mlunlearn-safety-")
    args = TrainingArguments(
        output_dir=scratch, max_steps=recipe.steps, per_device_train_batch_size=1, learning_rate=recipe.lr,
        warmup_steps=recipe.warmup, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        seed=recipe.seed, data_seed=recipe.seed, logging_steps=100, save_strategy="no", report_to=[],
        disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=SafetyBatches(recipe),
                               data_collator=lambda batches: collate(processor, batches[0]))
    trainer.remove_callback(PrinterCallback)
    t0, cpu0 = time.time(), time.process_time()
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds, cpu_seconds = round(time.time() - t0, 1), round(time.process_time() - cpu0, 1)
    model = trainer.model.eval()
    streams = {**SAFETY_STREAMS, "replay": round(1 - sum(SAFETY_STREAMS.values()), 4)}
    info = {"recipe": asdict(recipe), "streams": streams,
            "world": {"n_train": sw.N_TRAIN, "n_val": sw.N_VAL, "pairs_per_item": sw.PAIRS_PER_ITEM},
            "train_seconds": seconds, "train_cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(),
            "log": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in trainer.state.log_history]}
    if evaluate:
        info["scores"] = {"val": safety_scores(model, processor, sw.build_items("val", recipe.safety_seed)),
                          "train": safety_scores(model, processor, sw.build_items("train", recipe.safety_seed)),
                          "mllmu probes (forget 5)": mllmu_scores(model, processor, recipe.world_seed)}
        vanilla, _ = load_model("tiny", device="cpu", dtype=torch.float32)
        info["scores"]["vanilla mllmu probes (forget 5)"] = mllmu_scores(vanilla, processor, recipe.world_seed)
        info["scores"]["vanilla val"] = safety_scores(vanilla, processor, sw.build_items("val", recipe.safety_seed))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return model, processor, info
