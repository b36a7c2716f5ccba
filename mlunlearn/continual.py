"""Continual unlearning: forget requests that arrive one after another (book chapter 6).

    rounds = continual_rounds("toyworld", (5, 10, 15))      # 3 requests of 5 people each
    table = run_continual(model, processor, rounds, "nullspace-cvf")

Round k forgets the people of ``forget_{N_k}`` not forgotten before; its retain set is
``retain_{100-N_k}`` (people of later requests are still retained when round k runs). Each round unlearns
the model the previous round left, with the same method and settings. For methods with a reference (NPO)
the reference is therefore the model at the start of the round. For ``nullspace-cvf`` the protected
covariance is recomputed on the current model at every round and grows with each round's forgotten
faces, so that a later round cannot undo an earlier one.
"""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd

from mlunlearn.benchmarks import as_benchmark
from mlunlearn.data.unlearning import UnlearningData, UnlearningDataError
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.eval.scorecard import teacher_forced
from mlunlearn.methods import Method, get_method
from mlunlearn.utils import progress_bar


def continual_rounds(data="toyworld", splits=(5, 10, 15)) -> list:
    """One :class:`UnlearningData` per request: the people of each split not in the one before."""
    bench = as_benchmark(data)
    rounds, before, seen_images = [], set(), set()
    for split in splits:
        full = bench.unlearning_data(split)
        if not before <= set(full.forget_ids):
            raise UnlearningDataError(f"forget_{split} does not contain the people forgotten before it; "
                                      "continual rounds need nested splits (e.g. 5, 10, 15)")
        new = [i for i in full.forget_ids if i not in before]
        if not new:
            raise UnlearningDataError(f"forget_{split} adds nobody to the splits before it; use growing splits")
        # a person's examples share their portrait: the new people's examples are those with unseen portraits
        forget = [e for e in full.forget if _pixels(e) not in seen_images]
        rounds.append(UnlearningData(forget=forget, retain=full.retain, forget_ids=new, retain_ids=full.retain_ids,
                                     source=f"{full.source} (round {len(rounds) + 1}: {len(new)} new people)"))
        before |= set(full.forget_ids)
        seen_images |= {_pixels(e) for e in full.forget}
    return rounds


def _pixels(example) -> bytes:
    return example.image.tobytes()


def run_continual(model, processor, rounds, method, hparams=None, config: UnlearnConfig | None = None,
                  never=None, progress: bool = True, fresh=None):
    """Unlearn ``rounds`` in sequence with ``method`` (a name with ``hparams``); score after each round.

    Returns ``(table, model)``: one row per round (round 0 = before any) with the teacher-forced exact-match
    % (greedy decoding would reproduce the answer) on each round's people, on all people forgotten so far,
    and on ``never`` (retain examples of people no round forgets; default: the last round's retain set,
    every 5th example); and the model after the last round. ``model`` itself is not modified. For a method
    with a null-space constraint the table also gives, per round, the number of images its covariance
    protected and the input directions left free (summed over layers). ``fresh``: a function giving the
    untouched model the rounds start from (default: a deep copy of ``model``; at 7B, a reload, e.g. in 4 bits,
    as :func:`mlunlearn.experiments.compare` takes it).
    """
    config = dataclasses.replace(config or UnlearnConfig(), progress=False)
    never = never if never is not None else rounds[-1].retain[::5]
    current, protected = (fresh() if fresh else copy.deepcopy(model)), []

    def score(k, steps):
        row = {"round": k, "steps": steps}
        for j, r in enumerate(rounds, start=1):
            row[f"round {j} people"] = teacher_forced(current, processor, r.forget)["exact"]
        forgotten = [e for r in rounds[:k] for e in r.forget]
        row["all forgotten"] = teacher_forced(current, processor, forgotten)["exact"] if forgotten else float("nan")
        row["never forgotten"] = teacher_forced(current, processor, never)["exact"]
        return row

    rows = [score(0, 0)]
    for k, data in enumerate(progress_bar(rounds, "rounds", progress), start=1):
        m = copy.deepcopy(method) if isinstance(method, Method) else get_method(method, **(hparams or {}))
        if hasattr(m, "protect"):
            m.protect = list(protected)  # earlier rounds' forgotten faces stay protected
        run = unlearn(current, data, f"round {k}", m, config, processor=processor)
        current = run.model
        protected += data.forget
        rows.append(score(k, run.run["steps"]))
        if getattr(m, "nullspace_dims", None):
            rows[-1]["protected images"] = m.protected_images
            rows[-1]["free dims"] = sum(kept for kept, _ in m.nullspace_dims.values())
    return pd.DataFrame(rows).set_index("round"), current
