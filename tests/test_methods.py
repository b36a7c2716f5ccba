"""Each baseline does what its loss promises, on the tiny vanilla model (book chapter 2)."""

import copy

import pytest
import torch

from mlunlearn.collate import answer_nll, collate
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import add_refusals, unlearning_data
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.methods import METHODS, MethodError, Reference, describe, get_method, trainable_parameter_names
from mlunlearn.methods.kl import answer_kl
from mlunlearn.methods.npo import npo_loss
from conftest import needs_vanilla


pytestmark = needs_vanilla


@pytest.fixture(scope="module")
def data():
    return add_refusals(unlearning_data(open_benchmark("toyworld"), 5))


def _run(vanilla, method, steps=8, lr=3e-3, **hp):
    model, processor = vanilla
    cfg = UnlearnConfig(lr=lr, max_steps=steps, progress=False)
    return unlearn(copy.deepcopy(model), "toyworld", 5, method, cfg, processor=processor, **hp)


def _nll(model, processor, examples):
    with torch.no_grad():
        return answer_nll(model.eval(), collate(processor, examples)).mean().item()


def test_registry_lists_every_baseline_with_one_line():
    names = [n for n, _ in describe()]
    assert {"ga", "graddiff", "kl", "npo", "po"} <= set(names)
    assert all(summary and "\n" not in summary for _, summary in describe())


def test_get_method_converts_strings_and_rejects_unknowns():
    m = get_method("npo", beta="0.1", params="projector")
    assert m.beta == 0.1 and m.params == "projector"
    with pytest.raises(MethodError, match="unknown method 'gaa'.*ga, graddiff"):
        get_method("gaa")
    with pytest.raises(MethodError, match="unknown hyper-parameter betta.*beta=0.4"):
        get_method("npo", betta=1)
    with pytest.raises(MethodError, match="beta=0.0 must be > 0"):
        get_method("npo", beta=0.0)
    with pytest.raises(MethodError, match="expected a float"):
        get_method("npo", beta="small")


def test_ga_raises_forget_nll(vanilla, data):
    model, processor = vanilla
    before = _nll(model, processor, data.forget)
    after = _nll(_run(vanilla, "ga").model, processor, data.forget)
    assert after > before + 0.5  # 8 steps: from ~0.01 to ~1 nat per answer token


def test_graddiff_raises_forget_nll_and_loses_less_retain_than_ga(vanilla, data):
    model, processor = vanilla
    gd, ga = _run(vanilla, "graddiff").model, _run(vanilla, "ga").model
    before = _nll(model, processor, data.forget)
    assert _nll(gd, processor, data.forget) > 10 * before + 0.2  # ascent on the forget answers works...
    assert _nll(gd, processor, data.retain[:64]) < _nll(ga, processor, data.retain[:64])  # ...and retain is held


def test_kl_starts_at_zero_and_keeps_retain_closer_than_graddiff(vanilla, data):
    model, processor = vanilla
    kl_run = _run(vanilla, "kl", kl_weight=5.0)
    assert kl_run.log[0]["retain_kl"] < 1e-6  # step 1: the reference is the model itself
    gd_run = _run(vanilla, "graddiff")
    batch = collate(processor, data.retain[:64])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
        kl_kl = answer_kl(ref, kl_run.model(**inputs).logits, batch["labels"]).item()
        kl_gd = answer_kl(ref, gd_run.model(**inputs).logits, batch["labels"]).item()
    assert kl_kl < kl_gd


def test_answer_kl_is_the_reference_weighted_direction():
    """KL(p_ref ‖ p_θ) = Σ_v p_ref·(log p_ref − log p_θ), averaged over answer positions; not the reverse."""
    torch.manual_seed(0)
    ref, model = torch.randn(2, 5, 7) * 2, torch.randn(2, 5, 7) * 2
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    keep = labels[:, 1:] != -100  # position t predicts token t+1
    lr, lp = torch.log_softmax(ref[:, :-1][keep], -1), torch.log_softmax(model[:, :-1][keep], -1)
    forward = (lr.exp() * (lr - lp)).sum(-1).mean()
    reverse = (lp.exp() * (lp - lr)).sum(-1).mean()
    assert abs(forward - reverse) > 0.05  # the two directions differ here, so the test can tell them apart
    assert torch.allclose(answer_kl(ref, model, labels), forward, atol=1e-6)


def test_npo_gradient_tends_to_ga_as_beta_goes_to_zero(vanilla, data):
    model, processor = vanilla
    model = copy.deepcopy(model)
    batch = collate(processor, data.forget[:6])
    with torch.no_grad():
        nll_ref = answer_nll(model, batch)

    def grads(loss_fn):
        model.zero_grad()
        loss_fn(answer_nll(model, batch)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g_ga = grads(lambda nll: -nll.mean())
    g_small = grads(lambda nll: npo_loss(nll, nll_ref, 1e-4))
    g_large = grads(lambda nll: npo_loss(nll, nll_ref - 5.0, 2.0))  # answers already unlikely: NPO slows down
    assert torch.allclose(g_small, g_ga, rtol=1e-3, atol=1e-7)
    assert g_large.norm() < 0.1 * g_ga.norm()


def test_npo_raises_forget_nll_less_than_ga_at_the_same_budget(vanilla, data):
    """NPO's brake, 2*sigma(-beta*(NLL - NLL_ref)), scales GA's gradient down. Adam divides a gradient by its
    running scale, so the brake slows the run only once it has fallen well below its early values, i.e. once
    the forget NLL is several 1/beta above the reference's: long enough a run for that (16 steps at 3e-3
    take GA's forget NLL from 0.01 to ~15 nats; after 8 steps, ~2.4, NPO and GA were still equal)."""
    model, processor = vanilla
    npo = _nll(_run(vanilla, "npo", steps=16, beta=1.0).model, processor, data.forget)
    ga = _nll(_run(vanilla, "ga", steps=16).model, processor, data.forget)
    assert _nll(model, processor, data.forget) < npo < ga


def test_po_raises_the_refusal_likelihood_on_forget_questions(vanilla, data):
    model, processor = vanilla
    before = _nll(model, processor, data.forget_refusal)
    after = _nll(_run(vanilla, "po").model, processor, data.forget_refusal)
    assert after < before - 1.0


@pytest.mark.parametrize("params, pattern", [
    ("lora", r"^model\.language_model\..*\.lora_[AB]\.default\.weight$"),
    ("projector", r"^model\.multi_modal_projector\.linear_[12]\.(weight|bias)$"),
    ("lora+projector", r"^model\.(language_model\..*\.lora_[AB]\.default\.weight|multi_modal_projector\..*)$"),
    ("llm", r"^(model\.language_model\..*|lm_head\.weight)$"),
])
def test_trainable_parameters_are_exactly_the_named_ones(vanilla, params, pattern):
    import re

    model, _ = vanilla
    prepared = get_method("ga", params=params).prepare(copy.deepcopy(model))
    names = trainable_parameter_names(prepared)
    assert names and all(re.match(pattern, n) for n in names), names[:5]
    if params == "projector":
        assert len(names) == 4
    if "lora" in params:  # every LLM linear layer of every block got an adapter (A and B)
        n_blocks = model.config.text_config.num_hidden_layers
        assert sum(".lora_" in n for n in names) == 2 * 7 * n_blocks


def test_frozen_weights_stay_bit_identical(vanilla):
    model, _ = vanilla
    out = _run(vanilla, "ga", params="projector", steps=3).model
    after = dict(out.named_parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, after[n])]
    assert changed and all(n.startswith("model.multi_modal_projector.") for n in changed)


def test_reference_needs_no_second_copy(vanilla):
    model, processor = vanilla
    lora = get_method("kl").prepare(copy.deepcopy(model))
    assert Reference(lora).extra_parameters() == 0 and Reference(lora).kind == "adapters disabled"
    both = get_method("kl", params="lora+projector").prepare(copy.deepcopy(model))
    assert Reference(both).kind == "adapters disabled + snapshot of trainable tensors"
    proj = get_method("kl", params="projector").prepare(copy.deepcopy(model))
    n_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert Reference(proj).extra_parameters() == n_proj


@pytest.mark.parametrize("params", ["projector", "lora+projector", "lora"])
def test_reference_reproduces_the_starting_model_after_training_moves(vanilla, data, params):
    model, processor = vanilla
    trained = get_method("npo", params=params).prepare(copy.deepcopy(model))
    ref = Reference(trained)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)  # the trained copy moves (projector, adapters); the reference must not
    batch = collate(processor, data.forget[:4])
    expected = answer_nll(model, batch)
    assert torch.allclose(ref.nll(batch), expected, atol=1e-5)
    trained.eval()
    assert not torch.allclose(answer_nll(trained, batch), expected, atol=1e-3)


def test_prompt_decouple_term_is_logged_and_its_targets_are_the_models_own_replies(vanilla):
    run = _run(vanilla, "po", steps=2, pd=0.5)
    assert "pd_nll" in run.log[0] and run.log[0]["pd_nll"] < 2.0  # the model's own replies are likely to it


def test_every_registered_method_runs_a_step(vanilla):
    for name in METHODS:
        run = _run(vanilla, name, steps=1)
        assert run.run["steps"] == 1 and "loss" in run.log[0]


def test_pd_on_is_safeerasers_weight_for_each_objective():
    # SafeEraser's code: 0.5 with GA and GD, 1.0 with KL and PO; SineProject takes its objective's.
    expected = {"ga": 0.5, "graddiff": 0.5, "kl": 1.0, "po": 1.0, "npo": 1.0}
    assert {n: get_method(n, pd="on").pd for n in expected} == expected
    assert get_method("sineproject", objective="ga", pd="ON").pd == 0.5
    assert get_method("sineproject", objective="po", pd="on").pd == 1.0
    assert get_method("ga", pd="0.25").pd == 0.25 and get_method("ga").pd == 0.0  # off unless asked
    with pytest.raises(MethodError, match="'on'"):
        get_method("po", pd="onn")
    with pytest.raises(MethodError, match="'on'"):
        METHODS["po"](pd="yes")
