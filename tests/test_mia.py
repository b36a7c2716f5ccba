"""Membership inference (mlunlearn/eval/mia.py): each statistic against a hand computation, the AUC's
orientation on constructed scores, the held-out people, and one real call on the tiny vanilla model."""

import math
import zlib

import pytest
import torch

from conftest import needs_vanilla
from mlunlearn.collate import Example
from mlunlearn.data import open_benchmark
from mlunlearn.data.bench import write_benchmark
from mlunlearn.data.world import HOLDOUT_CONFIG, IDENTITY_TRAITS, build_world, heldout_people, heldout_rows
from mlunlearn.eval import mia

L2 = math.log(2)


def test_min_k_is_the_mean_of_the_lowest_fraction_of_token_log_probs():
    logp = [-0.1, -2.0, -0.5, -3.0, -0.2, -1.0, -0.3, -4.0, -0.05, -0.6]
    assert mia.min_k(logp, 0.2) == pytest.approx((-4.0 - 3.0) / 2)  # int(10 * 0.2) = 2 tokens
    assert mia.min_k(logp, 0.5) == pytest.approx((-4.0 - 3.0 - 2.0 - 1.0 - 0.6) / 5)
    assert mia.min_k(logp, 1.0) == pytest.approx(sum(logp) / 10)
    assert mia.min_k([-0.3, -0.9, -0.1], 0.2) == pytest.approx(-0.9)  # int(0.6) = 0: at least one token
    with pytest.raises(ValueError, match="k=0"):
        mia.min_k(logp, 0)


def test_min_k_plus_plus_on_a_three_token_vocabulary_by_hand():
    # Position 1: p = (1/2, 1/4, 1/4), log p = (-L, -2L, -2L) with L = ln 2. Under p: mu = -1.5 L, the
    # deviations are (+L/2, -L/2, -L/2), so sigma^2 = L^2/4 and sigma = L/2. Token 1 (log p = -2L) scores
    # (-2L + 1.5L) / (L/2) = -1. Position 2: p = (1/4, 1/2, 1/4), token 1 (log p = -L) scores +1.
    vocab = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], dtype=torch.float64))
    tokens = torch.tensor([-2 * L2, -L2], dtype=torch.float64)
    assert mia.standardised(tokens, vocab).tolist() == pytest.approx([-1.0, 1.0])
    assert mia.min_k_plus_plus(tokens, vocab, k=0.5) == pytest.approx(-1.0)  # the lowest one of two
    assert mia.min_k_plus_plus(tokens, vocab, k=1.0) == pytest.approx(0.0)
    # A uniform distribution has sigma = 0: the variance is clamped at 1e-6 (open-unlearning's guard), and
    # a token at the mean scores 0, not NaN.
    uniform = torch.log(torch.full((1, 3), 1 / 3, dtype=torch.float64))
    assert mia.standardised(uniform[:, 0], uniform).tolist() == pytest.approx([0.0], abs=1e-9)


def test_zlib_length_is_the_compressed_utf8_length():
    # zlib's empty stream: 2 header bytes (78 9c), an empty fixed-Huffman block (03 00), Adler-32 of
    # nothing (00 00 00 01): 8 bytes.
    assert zlib.compress(b"") == bytes.fromhex("789c030000000001")
    assert mia.zlib_length("") == 8
    assert mia.zlib_length("é") == len(zlib.compress("é".encode("utf-8")))  # bytes, not characters
    repeated, varied = "ab" * 50, "This person works as a potter and was born in Velmora; hobby: archery!!"
    assert mia.zlib_length(repeated) < 20 < mia.zlib_length(varied)  # 100 bytes of "ab" compress to a few
    assert len(varied) < mia.zlib_length(varied) <= len(varied) + 11  # no repeats: the text plus framing


@pytest.mark.parametrize("members, nonmembers, auc", [
    ([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], 1.0),  # every member scores higher: all detected
    ([0.0, 1.0, 2.0], [3.0, 4.0, 5.0], 0.0),  # every member scores lower (over-unlearning)
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0.5),  # the same scores: cannot tell
    ([1.0, 1.0], [1.0, 1.0, 1.0], 0.5),  # ties count half
    ([2.0, 0.0], [1.0], 0.5),  # one pair won, one lost
])
def test_auc_is_oriented_so_that_half_cannot_tell_and_one_detects_every_member(members, nonmembers, auc):
    assert mia.mia_auc(members, nonmembers) == pytest.approx(auc)


def test_attack_aucs_turn_low_losses_into_detected_members():
    # Members: low NLL (and so high Min-k%): every attack should detect them.
    members = [{"loss": 0.1, "zlib": 0.01, "min_k": -0.2, "min_k_pp": 0.5}] * 3
    nonmembers = [{"loss": 2.0, "zlib": 0.1, "min_k": -5.0, "min_k_pp": -2.0}] * 2
    assert mia.attack_aucs(members, nonmembers) == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0, "min_k_pp": 1.0}
    assert mia.attack_aucs(nonmembers, members) == {"loss": 0.0, "zlib": 0.0, "min_k": 0.0, "min_k_pp": 0.0}
    with pytest.raises(ValueError, match="members and non-members"):
        mia.mia_auc([], [1.0])


def test_privleak_against_a_reference_auc():
    assert mia.privleak(1.0) == pytest.approx(-100.0)  # every member given away
    assert mia.privleak(0.5) == pytest.approx(0.0)  # as the (ideal) reference
    assert mia.privleak(0.0) == pytest.approx(100.0)  # over-unlearned
    assert mia.privleak(0.75, auc_ref=0.6) == pytest.approx((0.25 - 0.4) / 0.4 * 100)  # -37.5
    with pytest.raises(ValueError):
        mia.privleak(0.5, auc_ref=1.0)


def test_heldout_people_are_new_faces_and_names_and_leave_the_world_as_it_was():
    world = build_world(0)
    before = [(p.id, p.name, p.traits, p.bio, p.asked) for p in world.people]
    held = heldout_people(world)
    assert [(p.id, p.name, p.traits, p.bio, p.asked) for p in world.people] == before
    assert len(held) == 30 and [p.id for p in held][:2] == ["h001", "h002"]
    faces = {tuple(p.traits[k] for k in IDENTITY_TRAITS) for p in world.people}
    assert not faces & {tuple(p.traits[k] for k in IDENTITY_TRAITS) for p in held}
    assert len({tuple(p.traits[k] for k in IDENTITY_TRAITS) for p in held}) == 30
    assert not {p.name for p in world.people} & {p.name for p in held}
    assert all(len(p.asked) == 3 and set(p.bio) == set(world.fictitious[0].bio) for p in held)
    again = heldout_people(build_world(0))
    assert [(p.name, p.traits, p.bio) for p in again] == [(p.name, p.traits, p.bio) for p in held]  # seeded
    assert heldout_rows(world, 2)[0]["image"]["bytes"] == heldout_rows(build_world(0), 2)[0]["image"]["bytes"]


def test_the_nonmembers_come_from_the_world_a_holdout_config_or_nowhere(tmp_path):
    examples, source = mia.nonmember_examples(open_benchmark("toyworld"))
    assert len(examples) == 90 and source == "toyworld heldout_people"  # 30 people x 3 image QA pairs
    assert examples[0].prompt.startswith("USER: <image>") and examples[0].image is not None
    assert mia.nonmember_examples(open_benchmark("mllmu-bench")) is None  # the hub's people were all trained on
    assert mia.has_nonmembers("toyworld:3") and not mia.has_nonmembers("mllmu-bench")
    world = build_world(0)
    folder = write_benchmark({HOLDOUT_CONFIG: heldout_rows(world, 2), "ft_Data": world.configs["ft_Data"][:1]},
                             tmp_path / "bench")
    assert mia.has_nonmembers(str(folder)) and mia.has_nonmembers(f"mllmu-bench:{folder}")
    held, source = mia.nonmember_examples(open_benchmark(str(folder)))
    assert len(held) == 6 and source.endswith(HOLDOUT_CONFIG)
    plain = write_benchmark({"ft_Data": world.configs["ft_Data"][:1]}, tmp_path / "plain")
    assert not mia.has_nonmembers(str(plain)) and mia.nonmember_examples(open_benchmark(str(plain))) is None


@needs_vanilla
def test_on_the_tiny_vanilla_every_statistic_is_finite_and_the_forget_people_are_detected(vanilla):
    model, processor = vanilla
    bench = open_benchmark("toyworld")
    members = mia.member_examples(bench, 5)
    wrong = Example(members[0].prompt, "I don't know.", members[0].image)
    scores = mia.example_scores(model, processor, members[:2] + [wrong])
    assert all(math.isfinite(v) for row in scores for v in row.values())
    assert scores[0]["zlib"] == pytest.approx(scores[0]["loss"] / mia.zlib_length(members[0].answer))
    assert scores[2]["loss"] > scores[0]["loss"]  # a wrong answer is less likely than the trained one
    result = mia.evaluate_mia(model, processor, bench, 5)
    assert (result["members"], result["nonmembers"]) == (15, 90)  # 5 people x 3 pairs; 30 held-out x 3
    # Measured: 0.998 (LOSS), 0.981 (Min-k%++): the vanilla memorised its people, so the attacker sees them.
    assert result["auc"]["loss"] > 0.9 and result["auc"]["min_k_pp"] > 0.9
    assert result["privleak"]["loss"] == pytest.approx(mia.privleak(result["auc"]["loss"]))
    assert not model.training
