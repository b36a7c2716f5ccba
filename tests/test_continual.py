"""Continual unlearning: nested forget requests run in sequence with any method (issue 10)."""

import pytest
import torch

from mlunlearn.continual import continual_rounds, run_continual
from mlunlearn.data.unlearning import UnlearningDataError
from mlunlearn.engine import UnlearnConfig

from conftest import needs_vanilla

pytestmark = needs_vanilla


def test_rounds_are_the_new_people_of_nested_splits():
    rounds = continual_rounds("toyworld", (5, 10, 15))
    assert [len(r.forget_ids) for r in rounds] == [5, 5, 5]
    assert [len({e.image.tobytes() for e in r.forget}) for r in rounds] == [5, 5, 5]
    for k, r in enumerate(rounds):
        assert not set(r.forget_ids) & set(r.retain_ids)
        for later in rounds[k + 1:]:
            assert set(later.forget_ids) <= set(r.retain_ids)  # later people are still retained
            assert not set(later.forget_ids) & set(r.forget_ids)


@pytest.mark.parametrize("splits,message", [
    ((10, 5), "forget_5 does not contain the people forgotten before it"),
    ((5, 5), "forget_5 adds nobody to the splits before it"),
])
def test_splits_that_are_not_nested_and_growing_are_refused(splits, message):
    with pytest.raises(UnlearningDataError, match=message):
        continual_rounds("toyworld", splits)


def test_the_runner_chains_rounds_scores_each_and_leaves_its_input_alone(vanilla):
    rounds = continual_rounds("toyworld", (5, 10))
    model, processor = vanilla
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    table, last = run_continual(model, processor, rounds, "ga",
                                config=UnlearnConfig(lr=3e-3, max_steps=8), progress=False)
    assert list(table.index) == [0, 1, 2] and table.loc[0, "round 1 people"] == 100.0
    assert table.loc[1, "round 1 people"] < 100.0
    assert table.loc[1, "round 2 people"] > table.loc[2, "round 2 people"]  # round 2 acts on its people
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(p, snapshot[n]) for n, p in last.named_parameters())


def test_earlier_rounds_forgotten_faces_join_the_protected_covariance(vanilla):
    rounds = continual_rounds("toyworld", (5, 10))
    model, processor = vanilla
    table, _ = run_continual(model, processor, rounds, "nullspace-cvf",
                             config=UnlearnConfig(max_steps=1), progress=False)
    # round 1 protects the 95 retained faces; round 2 the 90 still retained + round 1's 5 forgotten
    assert table.loc[1, "protected images"] == 95 and table.loc[2, "protected images"] == 95
    assert table["free dims"].notna().iloc[1:].all()


def test_the_runner_starts_from_fresh_when_given_one(vanilla):
    """At 7B the rounds start from a reload (``fresh``, e.g. in 4 bits), not a deep copy of the chapter's."""
    import copy

    rounds = continual_rounds("toyworld", (5, 10))
    model, processor = vanilla
    handed = []

    def fresh():
        handed.append(copy.deepcopy(model))
        return handed[-1]

    _, last = run_continual(model, processor, rounds, "ga", config=UnlearnConfig(lr=3e-3, max_steps=1),
                            progress=False, fresh=fresh)
    assert len(handed) == 1 and last is handed[0]  # the rounds trained the reloaded model itself
