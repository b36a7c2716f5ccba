"""Saliency with captum (book chapter 7): completeness and convergence of integrated gradients, feature ablation
against a hand-computed drop, projector and word attributions, and no silent all-zero attribution."""

import copy

import pytest
import torch

from mlunlearn.analysis import (
    ZeroAttributionError, answer_logprob, check_nonzero, patch_ablation, patch_feature_mask, pixel_attribution,
    pixel_baseline, query_masks, visual_token_attribution, word_attribution,
)
from mlunlearn.collate import collate, nll_from_logits
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import unlearning_data
from conftest import needs_vanilla

pytestmark = needs_vanilla


@pytest.fixture(scope="module")
def example():
    return unlearning_data(open_benchmark("toyworld"), 5).forget[0]


@pytest.fixture(scope="module")
def batch(vanilla, example):
    return collate(vanilla[1], [example])


@pytest.fixture(scope="module")
def ig(vanilla, example):
    model, processor = vanilla
    return pixel_attribution(model, processor, example, n_steps=256)


def _logprob(model, batch, pixel_values):
    with torch.no_grad():
        return answer_logprob(model, batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values)


def test_the_target_is_the_answers_teacher_forced_log_probability(vanilla, batch):
    model, _ = vanilla
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    n_answer = (batch["labels"][:, 1:] != -100).sum(1)
    expected = -nll_from_logits(logits, batch["labels"]) * n_answer  # the mean NLL of collate, times the count
    assert torch.allclose(_logprob(model, batch, batch["pixel_values"]), expected, atol=1e-5)


def test_integrated_gradients_is_complete_and_reports_its_delta(vanilla, batch, ig):
    model, _ = vanilla
    f_x = _logprob(model, batch, batch["pixel_values"])
    f_b = _logprob(model, batch, torch.zeros_like(batch["pixel_values"]))
    assert torch.allclose(ig.target, f_x) and torch.allclose(ig.baseline_target, f_b)
    gap = float(f_x - f_b)
    assert abs(gap) > 1  # the image matters to this answer: a meaningful check
    total = float(ig.values.sum())
    assert abs(total - gap) < 0.01 * abs(gap)  # completeness: within 1% of f(x) - f(baseline)
    assert abs(float(ig.delta[0]) - (total - gap)) < 1e-3  # captum's delta is that very difference
    assert bool(ig.converged(0.01)[0])
    assert torch.allclose(ig.map.sum(dim=(1, 2)), ig.values.sum(dim=(1, 2, 3)), atol=1e-4)  # the map keeps it all


def test_too_few_steps_show_in_the_delta(vanilla, example, ig):
    model, processor = vanilla
    coarse = pixel_attribution(model, processor, example, n_steps=16)
    assert float(coarse.relative_delta[0]) > 3 * float(ig.relative_delta[0])
    assert not bool(coarse.converged(0.01)[0])


def test_feature_ablation_matches_a_hand_computed_patch_drop(vanilla, example, batch):
    model, processor = vanilla
    ablation = patch_ablation(model, processor, example)
    assert ablation.map.shape == (1, 4, 4)
    pixels = batch["pixel_values"]
    for row, col in ((2, 1), (0, 3)):
        removed = pixels.clone()
        removed[..., row * 12:(row + 1) * 12, col * 12:(col + 1) * 12] = 0  # the "mean" baseline
        drop = _logprob(model, batch, pixels) - _logprob(model, batch, removed)
        assert torch.allclose(ablation.map[0, row, col], drop[0], atol=1e-5)
    mask = patch_feature_mask(4, 12)
    assert mask.shape == (1, 3, 48, 48) and mask[0, 2, 30, 13] == 2 * 4 + 1
    # every pixel of a patch holds that patch's drop
    assert torch.allclose(ablation.values[0, :, 24:36, 12:24], ablation.map[0, 2, 1].expand(3, 12, 12))


def test_black_baseline_is_raw_zero_in_normalised_space(vanilla, batch):
    _, processor = vanilla
    black = pixel_baseline(batch["pixel_values"], "black", processor)
    ip = processor.image_processor
    raw = black[0, :, 0, 0] * torch.tensor(ip.image_std) + torch.tensor(ip.image_mean)
    assert torch.allclose(raw, torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError, match="needs the processor"):
        pixel_baseline(batch["pixel_values"], "black")


def test_projector_attribution_is_per_visual_token_and_complete(vanilla, example, ig):
    model, processor = vanilla
    tokens = visual_token_attribution(model, processor, example, n_steps=64)
    assert tokens.values.shape == (1, 16, model.config.text_config.hidden_size) and tokens.map.shape == (1, 4, 4)
    assert torch.allclose(tokens.baseline_target, ig.baseline_target)  # the same baseline image
    gap = float(tokens.target - tokens.baseline_target)
    assert abs(float(tokens.map.sum()) - gap) < 0.01 * abs(gap)
    assert float(tokens.relative_delta[0]) < 0.01


def test_word_attribution_covers_the_question_only_and_keeps_the_image_ids(vanilla, example, batch):
    model, processor = vanilla
    words = word_attribution(model, processor, example, n_steps=128)
    question = query_masks(batch, model.config.image_token_index)["question"]
    assert torch.equal(words.positions, question)
    assert torch.all(words.map[~question] == 0) and (words.map[question] != 0).sum() >= question.sum() - 1
    assert words.tokens[0][int(question[0].nonzero()[0])] != "<image>"
    assert float(words.relative_delta[0]) < 0.05
    gap = float(words.target - words.baseline_target)
    assert abs(float(words.map.sum()) - gap) <= abs(float(words.delta[0])) + 1e-3


def test_no_silent_zero_attributions(vanilla, example, batch):
    """The pitfalls: image positions at embed_tokens (always exactly 0) are refused with the reason, and an
    attribution that is zero everywhere raises instead of drawing an empty map."""
    from captum.attr import LayerGradientXActivation

    model, processor = vanilla
    image = batch["input_ids"] == model.config.image_token_index
    with pytest.raises(ValueError, match="exactly 0 at image positions"):
        word_attribution(model, processor, example, positions=image)

    # why: the gradient at embed_tokens' output is exactly 0 at the image positions (overwritten by the image
    # features), so any gradient-based attribution there is 0, while the text positions get some
    def forward(ids, pixel_values, attention_mask, labels):
        return answer_logprob(model, ids, attention_mask, labels, pixel_values)

    values = LayerGradientXActivation(forward, model.get_input_embeddings()).attribute(
        batch["input_ids"], additional_forward_args=(batch["pixel_values"], batch["attention_mask"],
                                                     batch["labels"])).sum(-1)
    check_nonzero(values[~image], "embed_tokens at text positions")
    with pytest.raises(ZeroAttributionError, match="exactly 0"):
        check_nonzero(values[image], "embed_tokens at image positions")

    # an image that never reaches the language model: the projector outputs a constant
    blind = copy.deepcopy(model)
    with torch.no_grad():
        blind.model.multi_modal_projector.linear_2.weight.zero_()
    for attribute in (pixel_attribution, patch_ablation):
        with pytest.raises(ZeroAttributionError, match="does not depend on the attributed input"):
            attribute(blind, processor, example, **({"n_steps": 8} if attribute is pixel_attribution else {}))
    with pytest.raises(ValueError, match="NaN"):
        check_nonzero(torch.tensor([0.0, float("nan")]), "x")


def test_saliency_under_peft_and_the_training_mode_is_restored(vanilla, example):
    from peft import LoraConfig, get_peft_model

    model, processor = vanilla
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=r".*language_model.*q_proj"))
    wrapped.train()
    here = visual_token_attribution(wrapped, processor, example, n_steps=16)
    plain = visual_token_attribution(model, processor, example, n_steps=16)
    assert torch.allclose(here.map, plain.map, atol=1e-5) and wrapped.training
