"""The relearning attack (mlunlearn/relearn.py): the split of the forget people, the objective kept out of
the method lists, and on the tiny vanilla after GA: relearning one person brings the others' answers back
part of the way, through the trained (LoRA-merged) weights only."""

import copy

import pytest
import torch

from conftest import needs_vanilla
from mlunlearn.data import open_benchmark
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.methods import METHODS, MethodError, describe
from mlunlearn.relearn import Relearn, _people_examples, answer_nll_mean, relearn, relearn_split, relearning_attack

torch.set_num_threads(1)


def test_the_split_takes_a_seeded_fifth_of_the_forget_people_and_holds_the_rest_back():
    ids = [f"{i:03d}" for i in (7, 3, 12, 40, 19, 88, 51, 2, 64, 30)]
    for n, k in ((5, 1), (10, 2), (15, 3)):
        people = [f"p{i:02d}" for i in range(n)]
        chosen, rest = relearn_split(people, 0.2, seed=0)
        assert len(chosen) == k and sorted(chosen + rest) == sorted(people) and not set(chosen) & set(rest)
    a, b = relearn_split(ids, 0.2, seed=0), relearn_split(list(reversed(ids)), 0.2, seed=0)
    assert a == b  # the order given does not matter, the seed does
    assert {tuple(relearn_split(ids, 0.2, seed=s)[0]) for s in range(6)} != {tuple(a[0])}  # other seeds, other slices
    assert relearn_split(ids, 0.5, seed=0)[0] != [] and len(relearn_split(ids, 0.5, seed=0)[1]) == 5


@pytest.mark.parametrize("fraction, needle", [(0.0, "between 0 and 1"), (1.0, "between 0 and 1"),
                                              (0.9, "leaves none to evaluate")])
def test_a_split_that_leaves_nobody_to_evaluate_is_refused(fraction, needle):
    with pytest.raises(MethodError, match=needle):
        relearn_split(["001", "002", "003"], fraction)


def test_the_relearning_objective_is_no_registered_method():
    assert "relearn" not in METHODS and "relearn" not in dict(describe())
    assert Relearn().hyperparameters()["params"] == "lora"


@needs_vanilla
def test_after_ga_relearning_one_person_lowers_the_held_back_peoples_loss_through_the_llm_weights_only(vanilla):
    base, processor = vanilla
    bench = open_benchmark("toyworld")
    forgotten = unlearn(copy.deepcopy(base), bench, 5, "ga", UnlearnConfig(seed=0, progress=False),
                        processor=processor).model
    chosen, rest = relearn_split([r["ID"] for r in bench.load("forget_5")], 0.2, seed=0)
    held_back = _people_examples(bench, rest)
    assert len(chosen) == 1 and len(held_back) == 12  # 4 people x 3 QA pairs, none trained on below
    before = {n: p.detach().clone() for n, p in forgotten.named_parameters()}
    nll_before = answer_nll_mean(forgotten, processor, held_back)
    result = relearn(forgotten, processor, bench, 5, chosen, steps=10, lr=1e-3, seed=0)
    nll_after = answer_nll_mean(result.model, processor, held_back)
    # Measured: 9.04 -> 5.65 nats per token (the vanilla: 0.007). GA's forgetting of people never
    # relearned is partly undone by 10 steps on one other person.
    assert nll_before > 5 and nll_after < nll_before - 1
    assert result.run["method"] == "relearn" and result.run["steps"] == 10
    assert result.run["examples"]["forget"] == 3  # the slice's three QA pairs
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.language_model.layers.") for n in changed)  # LoRA targets, merged
    assert not any("vision_tower" in n or "projector" in n or "embed_tokens" in n for n in changed)


@needs_vanilla
def test_the_attack_on_the_vanilla_evaluates_the_held_back_people_before_and_after(vanilla):
    base, processor = vanilla
    attack = relearning_attack(copy.deepcopy(base), processor, "toyworld", 5, steps=2, seed=1,
                               eval_options={"limit": 1})
    assert len(attack["slice"]) == 1 and len(attack["rest"]) == 4 and attack["steps"] == 2
    assert list(attack["before"]) == list(attack["after"]) == ["Forget Set Results"]
    assert attack["before"]["Forget Set Results"]["classification"]["Image-Textual Question Accuracy"] == 100.0
    assert attack["rest_nll"]["before"] < 0.05  # the vanilla knows them
    assert attack["lr"] == 1e-3 and attack["batch_size"] == 4  # the tiny family's engine defaults
