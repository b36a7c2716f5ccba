"""SineProject: exact vanilla start, frozen W bit-identical, bounded moves, a merge to plain Linear (book chapter 4)."""

import copy

import pytest
import torch

from mlunlearn.collate import answer_nll, collate
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import unlearning_data
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.methods import MethodError, get_method, trainable_parameter_names
from mlunlearn.methods.sineproject import SineLinear, merge_sine
from conftest import needs_vanilla

pytestmark = needs_vanilla


@pytest.fixture(scope="module")
def batch(vanilla):
    return collate(vanilla[1], unlearning_data(open_benchmark("toyworld"), 5).forget[:6])


def _train(vanilla, steps=6, lr=3e-3, **hp):
    model, processor = vanilla
    method = get_method("sineproject", **hp)
    run = unlearn(copy.deepcopy(model), "toyworld", 5, method, UnlearnConfig(lr=lr, max_steps=steps, progress=False),
                  processor=processor)
    return method, run


def test_outputs_equal_the_vanilla_model_at_initialisation(vanilla, batch):
    model, _ = vanilla
    prepared = get_method("sineproject", omega=10.0).prepare(copy.deepcopy(model))
    assert torch.equal(answer_nll(prepared, batch), answer_nll(model, batch))


def test_only_deltas_biases_and_lora_train(vanilla):
    model, _ = vanilla
    names = trainable_parameter_names(get_method("sineproject").prepare(copy.deepcopy(model)))
    projector = sorted(n for n in names if "multi_modal_projector" in n)
    assert projector == [f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "delta")]
    assert all(".lora_" in n for n in names if "multi_modal_projector" not in n)
    no_lora = trainable_parameter_names(get_method("sineproject", lora=False).prepare(copy.deepcopy(model)))
    assert sorted(no_lora) == projector


def test_frozen_weights_stay_bit_identical_and_the_merge_folds_the_sine(vanilla):
    model, _ = vanilla
    method, run = _train(vanilla, omega=5.0)
    for name, layer in method.sine_modules.items():
        original = getattr(model.model.multi_modal_projector, name)
        assert torch.equal(layer.weight, original.weight)  # W never moved
        assert layer.delta.abs().max() > 0  # ΔW did
        merged = getattr(run.model.model.multi_modal_projector, name)
        assert type(merged) is torch.nn.Linear
        assert torch.allclose(merged.weight, original.weight + torch.sin(5.0 * layer.delta) / 5.0, atol=1e-7)
    assert run.run["trainable_parameters"] > 2 * 128 * 48


def test_merged_model_computes_what_the_sine_model_computed(vanilla, batch):
    model, _ = vanilla
    prepared = get_method("sineproject", omega=3.0, init="normal", init_scale=0.3, lora=False).prepare(copy.deepcopy(model))
    before = answer_nll(prepared, batch)
    merge_sine(prepared)
    assert torch.allclose(answer_nll(prepared, batch), before, atol=1e-5)
    assert not torch.allclose(before, answer_nll(model, batch), atol=1e-3)


def test_each_weight_moves_at_most_one_over_omega(vanilla):
    model, _ = vanilla
    method, run = _train(vanilla, omega=20.0, lr=0.5, objective="ga", lora=False, steps=4)
    for name, layer in method.sine_modules.items():
        moved = (layer.effective_weight() - layer.weight).abs().max().item()
        assert 0 < moved <= 1 / 20.0 + 1e-6
        assert layer.delta.abs().max().item() > 1 / 20.0  # ΔW itself went past the bound: sin folded it back


def test_additive_control_is_w_plus_delta():
    layer = SineLinear(torch.nn.Linear(4, 3), additive=True)
    with torch.no_grad():
        layer.delta.fill_(2.0)
    assert torch.allclose(layer.effective_weight(), layer.weight + 2.0)


def test_composes_with_refusal_po_and_rejects_bad_settings(vanilla):
    method, run = _train(vanilla, steps=2, objective="po", pd=0.5)
    assert method.needs_refusals and "refusal_nll" in run.log[0] and "pd_nll" in run.log[0]
    with pytest.raises(MethodError, match="objective='sineproject'"):
        get_method("sineproject", objective="sineproject")
    with pytest.raises(MethodError, match="omega=0.0 must be > 0"):
        get_method("sineproject", omega=0.0)
