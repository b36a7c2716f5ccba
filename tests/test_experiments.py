"""Scorecards, the teacher-forced probe, and the learning-rate pick rule (book chapter 2)."""

import pandas as pd
import pytest
import torch

from mlunlearn.collate import Example
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import unlearning_data
from mlunlearn.eval.scorecard import COLUMNS, scorecard, teacher_forced
from mlunlearn.experiments import pick_lr
from mlunlearn.models import ASSET_DIR, load_model

torch.set_num_threads(1)
needs_vanilla = pytest.mark.skipif(not (ASSET_DIR / "model.safetensors").is_file(), reason="no tiny vanilla weights")


@needs_vanilla
def test_teacher_forced_tells_the_learned_answer_from_a_wrong_one():
    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    forget = unlearning_data(open_benchmark("toyworld"), 5).forget
    wrong = [Example(e.prompt, forget[(i + 1) % len(forget)].answer, e.image) for i, e in enumerate(forget)]
    right_scores, wrong_scores = teacher_forced(model, processor, forget), teacher_forced(model, processor, wrong)
    assert right_scores["exact"] > 90 and wrong_scores["exact"] < 10
    assert wrong_scores["nll"] > right_scores["nll"] + 1


@needs_vanilla
def test_scorecard_has_every_column_in_range():
    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    row, result, benign = scorecard(model, processor, "toyworld", 5)
    assert list(row) == list(COLUMNS)
    for key, value in row.items():
        assert 0 <= value <= (1 if "ROUGE" in key else 100), key
    assert row["forget cls img"] == result.to_official()["Forget Set Results"]["classification"]["Image-Textual Question Accuracy"]


def test_pick_lr_puts_forgetting_first():
    sweep = pd.DataFrame([
        {"method": "A", "lr": 1e-4, "forget exact %": 90, "retain exact %": 100},  # kept all, forgot nothing
        {"method": "A", "lr": 1e-3, "forget exact %": 10, "retain exact %": 60},
        {"method": "A", "lr": 3e-3, "forget exact %": 0, "retain exact %": 40},
        {"method": "B", "lr": 1e-4, "forget exact %": 80, "retain exact %": 100},
        {"method": "B", "lr": 1e-3, "forget exact %": 50, "retain exact %": 90},
    ])
    picks = pick_lr(sweep, max_forget=20)
    assert picks.loc["A", "lr"] == 1e-3 and picks.loc["A", "rule"].startswith("forgot")
    assert picks.loc["B", "lr"] == 1e-3 and picks.loc["B", "rule"].startswith("never forgot")


@needs_vanilla
def test_a_sweep_frees_each_run_before_it_loads_the_next():
    """At 7B, ``fresh()`` reloads the model for every run: if the last unlearned model is still referenced
    when it does, a sweep holds two or three models at once. Each fresh() call checks that no model it
    handed out earlier is still alive."""
    import copy
    import gc
    import weakref

    from mlunlearn.engine import UnlearnConfig
    from mlunlearn.experiments import lr_sweep

    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    handed_out, alive_at_call = [], []

    def fresh():
        gc.collect()
        alive_at_call.append(sum(ref() is not None for ref in handed_out))
        copy_ = copy.deepcopy(model)
        handed_out.append(weakref.ref(copy_))
        return copy_

    config = UnlearnConfig(max_steps=1, batch_size=2, progress=False)
    sweep = lr_sweep(model, processor, open_benchmark("toyworld"), {"GA": ("ga", {})}, [1e-4, 1e-3, 1e-2], config, 5,
                     progress=False, fresh=fresh)
    assert len(sweep) == 3 and alive_at_call == [0, 0, 0]
