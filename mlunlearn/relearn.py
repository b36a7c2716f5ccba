"""The relearning attack: does a forgotten fact come back after a few steps of fine-tuning on a little of
the forget set? (Issue 13, "Does it stay forgotten?")

    from mlunlearn.relearn import relearning_attack
    attack = relearning_attack(model, processor, "toyworld", forget=5, lr=1e-3, seed=0)
    attack["after"]["forget_cls_img"]    # the held-back forget people, after relearning

Unlearning that only hides knowledge can be undone by fine-tuning on a *part* of what was forgotten: the
rest comes back too (Hu et al. 2024, "Jogging the memory of unlearned LLMs"; Lynch et al. 2024). The
attack here:

1. split the forget people: a slice (``fraction`` of them, at least one, drawn from ``seed``) and the rest
   (at least one person is held back);
2. fine-tune on the slice's training QA pairs (``ft_Data``: image + question → answer) with plain NLL
   descent, ``L = NLL(slice)``, for ``steps`` optimiser steps, through the package's engine (the same
   ``Trainer``, LoRA adapters merged back afterwards) at the unlearning run's learning rate;
3. evaluate the *rest* with the evaluation protocol (MLLMU-Bench's forget mode: classification, cloze,
   generation, image and text), before and after.

Nothing of the rest is trained on, so a rise on the rest is knowledge that was hidden, not removed (or
that generalises from the slice: the vanilla row of a bench, relearned the same way, shows how much).
The relearning objective is a :class:`~mlunlearn.methods.Method` that is not registered: it is no
unlearning method and does not appear in ``mlunlearn methods`` or a leaderboard's methods.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mlunlearn.methods.base import Method, MethodError
from mlunlearn.methods.terms import nll

__all__ = ["FRACTION", "STEPS", "Relearn", "relearn_split", "relearn", "evaluate_people", "relearning_attack",
           "answer_nll_mean"]

FRACTION = 0.2  # of the forget people, relearned on
STEPS = 10  # optimiser steps


@dataclass
class Relearn(Method):
    """Plain fine-tuning on the forget slice: ``L = NLL(forget)`` (descent, not ascent). Not registered."""

    name = "relearn"
    summary = "the relearning attack: NLL descent on a slice of the forget set"

    def loss(self, model, batch, reference):
        forget_nll = nll(model, batch, "forget").mean()
        return {"forget_nll": forget_nll, "loss": forget_nll}


def relearn_split(forget_ids, fraction: float = FRACTION, seed: int = 0) -> tuple[list, list]:
    """``(slice, rest)``: ``max(1, round(fraction · n))`` of the ``n`` forget people drawn with ``seed``
    (``random.Random``, the same in every process), and the others; both sorted. At least one is held back."""
    ids = sorted(str(i) for i in forget_ids)
    if not 0 < fraction < 1:
        raise MethodError(f"relearn fraction={fraction}: must be between 0 and 1 (e.g. 0.2: a fifth of the forget "
                          "people are relearned, the rest evaluated)")
    k = max(1, round(fraction * len(ids)))
    if k >= len(ids):
        raise MethodError(f"relearn fraction={fraction} of {len(ids)} forget people leaves none to evaluate; lower "
                          "it, or use a larger forget set")
    chosen = set(random.Random(f"relearn:{seed}").sample(ids, k))
    return sorted(chosen), [i for i in ids if i not in chosen]


def _slice_data(bench, forget: int, slice_ids: list):
    """The slice's ``ft_Data`` QA pairs as the forget stream; the retain stream is the run's (drawn for
    each step by the engine's pairing, unused by the loss)."""
    from mlunlearn.data.unlearning import UnlearningData, unlearning_data

    data = unlearning_data(bench, forget)
    return UnlearningData(forget=_people_examples(bench, slice_ids), retain=data.retain, forget_ids=list(slice_ids),
                          retain_ids=data.retain_ids,
                          source=f"{bench.name} forget_{forget} relearning slice {','.join(slice_ids)}")


def relearn(model, processor, bench, forget: int, slice_ids: list, *, steps: int = STEPS, lr: float | None = None,
            batch_size: int | None = None, seed: int = 0):
    """Fine-tune ``model`` (in place, as :func:`mlunlearn.engine.unlearn` does; pass a copy to keep it) on
    the slice's QA pairs for ``steps`` steps; returns the engine's :class:`UnlearnResult`. ``lr`` and
    ``batch_size`` ``None``: the engine's defaults for the model's family."""
    from mlunlearn.engine import UnlearnConfig, unlearn

    config = UnlearnConfig(lr=lr, max_steps=steps, batch_size=batch_size, seed=seed, progress=False)
    return unlearn(model, _slice_data(bench, forget, slice_ids), forget, Relearn(), config, processor=processor)


class _People:
    """A benchmark whose ``forget_{N}`` holds only some of its people (what the protocol reads is
    otherwise the benchmark's own)."""

    def __init__(self, bench, forget: int, ids):
        self.bench, self.config, self.ids = bench, f"forget_{forget}", {str(i) for i in ids}
        self.name = getattr(bench, "name", "benchmark")

    def has(self, config: str) -> bool:
        return self.bench.has(config)

    def load(self, config: str) -> list:
        rows = self.bench.load(config)
        return [r for r in rows if str(r["ID"]) in self.ids] if config == self.config else rows


def evaluate_people(model, processor, bench, forget: int, ids, **options):
    """The protocol's forget mode (every task and modality) on the forget people ``ids`` only."""
    from mlunlearn.eval.protocol import evaluate

    return evaluate(model, processor, _People(bench, forget, ids), forget, modes=("forget",), **options)


def relearning_attack(model, processor, bench, forget: int = 5, *, fraction: float = FRACTION, steps: int = STEPS,
                      lr: float | None = None, batch_size: int | None = None, seed: int = 0,
                      eval_options: dict | None = None) -> dict:
    """Evaluate the rest of the forget set, relearn the slice, evaluate the rest again (``model`` is
    changed in place). Returns ``{"slice", "rest", "before", "after"`` (each the official result JSON of the
    forget mode on the rest), ``"rest_nll"`` (the rest's training QA loss before and after), ``"slice_nll"``
    (the relearning loss at its first and last step), ``"steps", "lr", "batch_size", "seed"}``: JSON, and the
    same bytes for the same inputs (no timings)."""
    from mlunlearn.data import open_benchmark

    bench = open_benchmark(bench) if isinstance(bench, str) else bench
    options = {"seed": 0, "progress": False, **(eval_options or {})}
    slice_ids, rest = relearn_split([r["ID"] for r in bench.load(f"forget_{forget}")], fraction, seed)
    rest_examples = _people_examples(bench, rest)
    before = evaluate_people(model, processor, bench, forget, rest, **options).to_official()
    nll_before = answer_nll_mean(model, processor, rest_examples)
    run = relearn(model, processor, bench, forget, slice_ids, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    after = evaluate_people(run.model, processor, bench, forget, rest, **options).to_official()
    losses = [r["forget_nll"] for r in run.log if "forget_nll" in r]
    return {"slice": slice_ids, "rest": rest, "fraction": fraction, "steps": run.run["steps"],
            "lr": run.run["config"]["lr"], "batch_size": run.run["config"]["batch_size"], "seed": seed,
            "slice_nll": {"first_step": losses[0], "last_step": losses[-1]} if losses else None,
            "rest_nll": {"before": nll_before, "after": answer_nll_mean(run.model, processor, rest_examples)},
            "before": before, "after": after}


def _people_examples(bench, ids) -> list:
    from mlunlearn.data.unlearning import _pairs

    keep = {str(i) for i in ids}
    return [e for i, e in _pairs(bench.load("ft_Data"), "ft_Data") if str(i) in keep]


def answer_nll_mean(model, processor, examples: list, batch_size: int = 16) -> float:
    """Mean over ``examples`` of the answer-token NLL (nats per token): the training QA pairs' loss."""
    from mlunlearn.eval.mia import example_scores

    rows = example_scores(model, processor, examples, batch_size=batch_size)
    return sum(r["loss"] for r in rows) / len(rows)
