"""TOFU-style metrics on hand-made numbers: normalised probability, truth ratio and its two reporting forms,
option probability, forget quality (KS p-value, 1 − Jensen–Shannon), and the answer NLL of a stub model whose
token probabilities are known."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import needs_vanilla
from mlunlearn.collate import Example, collate
from mlunlearn.eval.prompts import qa_prompt
from mlunlearn.eval.tofu import (
    answer_nll,
    forget_quality_js,
    forget_quality_ks,
    normalised_probability,
    option_probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)


def _mean_nll(token_logprobs):
    return -sum(token_logprobs) / len(token_logprobs)


def test_truth_ratio_from_hand_made_token_log_probs():
    # Item 1: the paraphrased answer has token log-probs (-1, -3): mean NLL 2, P̄ = e^-2.
    #         Perturbed answers: (-2, -2) -> NLL 2 and (-4,) -> NLL 4.
    # Item 2: paraphrased NLL 1; perturbed NLLs 0.5 and 1.5.
    para = [_mean_nll([-1, -3]), _mean_nll([-1])]
    pert = [[_mean_nll([-2, -2]), _mean_nll([-4])], [_mean_nll([-0.5]), _mean_nll([-1.5, -1.5])]]
    assert para == [2.0, 1.0] and pert == [[2.0, 4.0], [0.5, 1.5]]
    assert normalised_probability(para) == pytest.approx([math.exp(-2), math.exp(-1)])

    # TOFU's code (geometric): R = exp(ℓ(para) − mean_k ℓ(pert_k)).
    r = truth_ratio(para, pert)
    assert r == pytest.approx([math.exp(2 - 3), math.exp(1 - 1)])
    # TOFU's paper (arithmetic): R = mean_k P̄(pert_k) / P̄(para).
    ra = truth_ratio(para, pert, mean="arithmetic")
    assert ra == pytest.approx([(math.exp(-2) + math.exp(-4)) / 2 / math.exp(-2),
                                (math.exp(-0.5) + math.exp(-1.5)) / 2 / math.exp(-1)])
    # The reporting forms: forget mean(min(R, 1/R)), retain mean(max(0, 1 - R)).
    assert truth_ratio_score(r, "forget") == pytest.approx((math.exp(-1) + 1) / 2)
    assert truth_ratio_score(r, "retain") == pytest.approx((1 - math.exp(-1)) / 2)
    # A model that prefers a false answer: R = e > 1 gives 0 in the retain form, 1/e in the forget form.
    assert truth_ratio_score([math.e], "retain") == 0.0
    assert truth_ratio_score([math.e], "forget") == pytest.approx(math.exp(-1))


def test_option_probability_is_the_answers_share():
    # P̄(answer) = 1/2, two options with P̄ = 1/4 each: 0.5 / (0.5 + 0.25 + 0.25) = 0.5.
    got = option_probability([math.log(2)], [[math.log(4), math.log(4)]])
    assert got == pytest.approx([0.5])
    # Indifferent among K + 1 = 4 choices: 1/4.
    assert option_probability([3.0], [[3.0, 3.0, 3.0]]) == pytest.approx([0.25])


def test_ks_forget_quality_identical_and_shifted():
    ratios = np.exp(np.linspace(-3, 0, 40))
    same = forget_quality_ks(ratios, ratios.copy())
    assert same == {"p_value": 1.0, "statistic": 0.0}
    shifted = forget_quality_ks(ratios, ratios * math.exp(5))  # every value above every reference value
    assert shifted["statistic"] == 1.0 and shifted["p_value"] < 1e-10
    # Invariant to a monotone transform of both samples (TOFU compares 1/R).
    partial = forget_quality_ks(ratios, ratios * 1.3)
    assert forget_quality_ks(1 / ratios, 1 / (ratios * 1.3)) == pytest.approx(partial)
    assert 0 < partial["p_value"] < 1


def test_js_forget_quality_on_a_hand_computed_histogram():
    assert forget_quality_js([0.5, 1.0, 2.0], [0.5, 1.0, 2.0])["value"] == pytest.approx(1.0)
    assert forget_quality_js([0.1, 0.1], [10.0, 10.0])["value"] == pytest.approx(0.0)
    # log R: unlearned {0, 0, 2, 2}, reference {0, 0}; two bins over [0, 2]: p = (1/2, 1/2), q = (1, 0).
    got = forget_quality_js([1, 1, math.e ** 2, math.e ** 2], [1, 1], bins=2)
    m = (0.75, 0.25)
    js_div = 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1])) + 0.5 * math.log2(1 / m[0])
    assert got["value"] == pytest.approx(1 - math.sqrt(js_div))
    assert got["js_distance"] == pytest.approx(math.sqrt(js_div)) and got["bins"] == 2


def test_bad_shapes_and_kinds_are_errors():
    with pytest.raises(ValueError, match="N, K>0"):
        truth_ratio([1.0, 2.0], [[1.0]])
    with pytest.raises(ValueError, match="geometric"):
        truth_ratio([1.0], [[1.0]], mean="median")
    with pytest.raises(ValueError, match="'forget' or 'retain'"):
        truth_ratio_score([1.0], "real")
    with pytest.raises(ValueError, match="non-empty"):
        forget_quality_ks([], [1.0])


def test_rouge_l_recall_is_lcs_over_the_reference_length():
    # LCS of "a man with red hair" and "a woman with red hair smiles" = "a with red hair" (4 of 6 reference words).
    assert rouge_l_recall("a man with red hair", "a woman with red hair smiles") == pytest.approx(4 / 6)
    assert rouge_l_recall("", "anything here") == 0.0


class _KnownProbabilities(torch.nn.Module):
    """A stub LLaVA: at each position the next token gets logit log(3) when it is one of ``boosted`` and every
    other token logit 0; otherwise all logits are 0. So a boosted token has probability 3 / (3 + V - 1) and any
    other token 1 / V, exactly."""

    def __init__(self, vocab: int, boosted: set):
        super().__init__()
        self.vocab, self.boosted = vocab, boosted
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, pixel_values=None):
        self.calls.append(None if pixel_values is None else tuple(pixel_values.shape))
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        nxt = input_ids[:, 1:]
        boost = torch.tensor([[int(x) in self.boosted for x in row] for row in nxt.tolist()])
        logits[:, :-1].scatter_(-1, nxt.unsqueeze(-1), boost.unsqueeze(-1).float() * math.log(3))
        return SimpleNamespace(logits=logits + self.anchor)


@needs_vanilla
def test_answer_nll_scores_only_the_answer_tokens_in_mixed_batches(vanilla):
    from PIL import Image

    _, processor = vanilla
    tok = processor.tokenizer
    answer = "paris"
    prompts = [qa_prompt("Where is the tower?", True), qa_prompt("Name a city in France.", False)]
    examples = [Example(prompts[0], answer, Image.new("RGB", (30, 30), (200, 0, 0))), Example(prompts[1], answer)]
    labels = collate(processor, examples)["labels"]
    answer_ids = set(labels[labels != -100].tolist())  # the answer's tokens in context, and EOS
    assert len(answer_ids) >= 2
    for p in prompts:
        assert not answer_ids & set(tok(p).input_ids)  # a prompt token is never boosted
    model = _KnownProbabilities(len(tok), answer_ids)
    nll = answer_nll(model, processor, examples, batch_size=2)
    expected = math.log(3 + len(tok) - 1) - math.log(3)  # every scored token is an answer token
    assert nll == pytest.approx([expected, expected])
    assert model.calls == [(1, 3, *model.calls[0][2:])]  # one batch, one image for the two examples
    # Batching does not change a value.
    assert answer_nll(model, processor, examples, batch_size=1) == pytest.approx(nll)
