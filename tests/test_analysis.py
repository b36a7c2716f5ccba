"""Projector diagnostics: Jacobians, conditioning, the matrix-free estimator, drift, the monitor (book chapter 3)."""

import copy
import inspect
import math

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState

from mlunlearn.analysis import (
    ProjectorMonitor, compare_with_exact, effective_rank, embedding_drift, estimate_spectrum,
    extreme_singular_values, get_projector, parameter_jacobian_conditioning, patch_features, projector_layers,
    singular_values, snapshot_projector, spectrum_summary, token_jacobians, weight_conditioning,
)
from mlunlearn.collate import collate
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import unlearning_data
from conftest import needs_vanilla


pytestmark = needs_vanilla


@pytest.fixture(scope="module")
def data():
    return unlearning_data(open_benchmark("toyworld"), 5)


@pytest.fixture(scope="module")
def features(vanilla, data):
    model, processor = vanilla
    images = [e.image for e in data.forget[:3]]
    return patch_features(model, processor.image_processor(images, return_tensors="pt")["pixel_values"])


class EffLinear(nn.Module):
    """A linear layer exposing ``effective_weight()`` (like SineProject's): ``x (W + ΔW)ᵀ + b``."""

    def __init__(self, linear: nn.Linear, delta: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.delta = nn.Parameter(torch.zeros_like(self.weight) if delta is None else delta)

    def effective_weight(self):
        return self.weight + self.delta

    def forward(self, x):
        return nn.functional.linear(x, self.effective_weight(), self.bias)


def _hand_jacobian(projector, x):
    """W2 · diag(gelu'(W1 x + b1)) · W1, with exact GELU's derivative Φ(h) + h φ(h)."""
    w1, b1 = projector.linear_1.weight.detach().double(), projector.linear_1.bias.detach().double()
    w2 = projector.linear_2.weight.detach().double()
    h = w1 @ x.double() + b1
    d = 0.5 * (1 + torch.erf(h / math.sqrt(2))) + h * torch.exp(-h ** 2 / 2) / math.sqrt(2 * math.pi)
    return w2 @ torch.diag(d) @ w1


def test_patch_features_are_the_projector_inputs(vanilla, features):
    model, _ = vanilla
    assert features.shape == (3, 16, 48)
    assert get_projector(model) is model.model.multi_modal_projector
    assert set(projector_layers(get_projector(model))) == {"linear_1", "linear_2"}


def test_token_jacobian_is_w2_diag_gelu_prime_w1(vanilla, features):
    projector = get_projector(vanilla[0])
    x = features.reshape(-1, 48)[:5]
    jac = token_jacobians(projector, features)
    assert jac.shape == (48, 128, 48)
    for i in range(5):
        torch.testing.assert_close(jac[i].double(), _hand_jacobian(projector, x[i]), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(token_jacobians(projector, x, mode="fwd"), jac[:5], atol=1e-6, rtol=1e-5)


def test_singular_values_condition_and_effective_rank(vanilla, features):
    projector = get_projector(vanilla[0])
    x = features.reshape(-1, 48)[:4]
    s = singular_values(token_jacobians(projector, x))
    assert s.shape == (4, 48) and s.dtype == torch.float64
    for i in range(4):
        torch.testing.assert_close(s[i], torch.linalg.svdvals(_hand_jacobian(projector, x[i])), atol=1e-7, rtol=1e-4)
    summary = spectrum_summary(s, k=10)
    assert summary["cond_max"] >= summary["cond_median"] >= 1 and summary["n_tokens"] == 4
    assert summary["sigma1_over_sigma10_median"] <= summary["cond_median"]
    assert 1 <= summary["effective_rank_median"] <= 48
    assert effective_rank(singular_values(torch.eye(7)[None])).item() == pytest.approx(7)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])).item() == pytest.approx(1)


def test_weight_conditioning_reads_the_effective_weights(vanilla):
    projector = copy.deepcopy(get_projector(vanilla[0]))
    with torch.no_grad():
        projector.linear_2.weight.copy_(torch.diag(torch.linspace(0.5, 4.0, 128)))
    stats = weight_conditioning(projector)
    assert stats["linear_2"]["condition"] == pytest.approx(8.0, rel=1e-6)
    assert stats["linear_2"]["sigma_max"] == pytest.approx(4.0, rel=1e-6)
    assert stats["linear_1"]["condition"] >= 1 and stats["linear_1"]["shape"] == (128, 48)
    # a module with effective_weight(): W + ΔW with ΔW = W is 2W, so σ doubles and the condition stays
    projector.linear_2 = EffLinear(projector.linear_2, delta=projector.linear_2.weight.detach().clone())
    doubled = weight_conditioning(projector)["linear_2"]
    assert doubled["sigma_max"] == pytest.approx(8.0, rel=1e-6) and doubled["condition"] == pytest.approx(8.0)


def test_jacobians_go_through_the_module_not_its_weight_attribute(vanilla, features):
    projector = copy.deepcopy(get_projector(vanilla[0]))
    x = features.reshape(-1, 48)[:2]
    projector.linear_1 = EffLinear(projector.linear_1, delta=0.1 * torch.randn(128, 48))
    plain = copy.deepcopy(projector)
    plain.linear_1 = nn.Linear(48, 128)
    with torch.no_grad():
        plain.linear_1.weight.copy_(projector.linear_1.effective_weight())
        plain.linear_1.bias.copy_(projector.linear_1.bias)
    torch.testing.assert_close(token_jacobians(projector, x), token_jacobians(plain, x))
    torch.testing.assert_close(estimate_spectrum(projector, x, iters=48), estimate_spectrum(plain, x, iters=48))


def test_estimator_matches_exact_svd(vanilla, features):
    """Tolerance: with iters = in_features (48) the Krylov space is complete and the error is float32
    rounding (~1e-6 measured); fewer iterations give bounds from inside: σmax below, σmin above."""
    projector = get_projector(vanilla[0])
    x = features.reshape(-1, 48)[::8]
    rng = torch.get_rng_state()
    cmp = compare_with_exact(projector, x, iters=48)
    assert cmp["sigma_max_rel_error"] < 1e-4 and cmp["sigma_min_rel_error"] < 1e-4
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded generator of its own
    early = estimate_spectrum(projector, x, iters=20, tol=0.0)
    assert (early[:, 0] <= cmp["exact"][:, 0] * (1 + 1e-5)).all()
    assert (early[:, 1] >= cmp["exact"][:, 1] * (1 - 1e-5)).all()
    smax, smin = extreme_singular_values(projector, x[0], iters=48)
    assert smax == pytest.approx(cmp["exact"][0, 0].item(), rel=1e-4)
    assert smin == pytest.approx(cmp["exact"][0, 1].item(), rel=1e-4)
    gram = compare_with_exact(projector, x, method="gram")
    assert gram["sigma_max_rel_error"] < 1e-5 and gram["sigma_min_rel_error"] < 1e-5


def test_estimator_finds_a_rank_deficient_jacobian(vanilla):
    projector = copy.deepcopy(get_projector(vanilla[0]))
    with torch.no_grad():  # linear_1 of rank 5: J has rank 5, its 48th singular value is 0
        u, s, vh = torch.linalg.svd(projector.linear_1.weight, full_matrices=False)
        projector.linear_1.weight.copy_(u[:, :5] @ torch.diag(s[:5]) @ vh[:5])
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0)) * 8
    est = estimate_spectrum(projector, x, iters=48)
    exact = singular_values(token_jacobians(projector, x))
    torch.testing.assert_close(est[:, 0], exact[:, 0], rtol=1e-5, atol=0)
    assert (est[:, 1] < 1e-6 * est[:, 0]).all()


def test_embedding_drift(vanilla, features):
    projector = get_projector(vanilla[0])
    same = embedding_drift(snapshot_projector(vanilla[0]), projector, features)
    assert same == {"cosine": 1.0, "cosine_min": 1.0, "rel_change": 0.0}
    moved = snapshot_projector(projector)
    assert not any(p.requires_grad for p in moved.parameters())
    with torch.no_grad():
        moved.linear_2.weight.add_(0.05 * torch.randn_like(moved.linear_2.weight))
    drift = embedding_drift(projector, moved, features)
    assert drift["cosine"] < 1 and drift["cosine_min"] <= drift["cosine"] and drift["rel_change"] > 0


def test_parameter_jacobian_rows_are_per_example_gradients(vanilla, data):
    model, processor = vanilla
    batch = collate(processor, data.forget[:6])
    flags = [m.training for m in model.modules()]
    out = parameter_jacobian_conditioning(model, batch, max_rows=4)
    n_params = 128 * 48 + 128 + 128 * 128 + 128
    assert (out["n_examples"], out["n_params"]) == (4, n_params) and len(out["singular_values"]) == 4
    assert math.isfinite(out["condition"]) and out["condition"] >= 1
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    # row 0 is the gradient of example 0's answer NLL, computed alone by plain autograd
    from mlunlearn.collate import answer_nll

    alone = copy.deepcopy(model).eval()
    params = [p for layer in projector_layers(get_projector(alone)).values() for p in (layer.weight, layer.bias)]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(answer_nll(alone, collate(processor, data.forget[:1]))[0], params)
    assert out["row_norms"][0] == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item(), rel=1e-4)
    # a sine-style layer: same effective weight, same rows, same n_params (the effective parameters)
    alone.model.multi_modal_projector.linear_1 = EffLinear(alone.model.multi_modal_projector.linear_1)
    sine = parameter_jacobian_conditioning(alone, batch, max_rows=4)
    assert sine["n_params"] == n_params
    assert sine["row_norms"] == pytest.approx(out["row_norms"], rel=1e-4)


class _Wrapped:
    """Stands in for a peft ``PeftModel``: the monitor must unwrap it."""

    def __init__(self, model):
        self._model = model

    def get_base_model(self):
        return self._model


def test_projector_monitor_records_begin_every_n_and_end(vanilla, data):
    """The hooks driven by hand as the Trainer would, on a peft-like wrapper whose projector moves."""
    model = copy.deepcopy(vanilla[0]).train()
    model.model.vision_tower.eval()  # a mixed-mode model: each module's mode must come back as it was
    modes = [m.training for m in model.modules()]
    monitor = ProjectorMonitor([e.image for e in data.retain[:2]], [e.image for e in data.forget[:2]],
                               vanilla[1], every=2, k=10)
    state, control, wrapped = TrainerState(), TrainerControl(), _Wrapped(model)
    rng = torch.get_rng_state()
    monitor.on_train_begin(None, state, control, model=wrapped)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.model.multi_modal_projector.linear_1.weight.add_(0.02 * step)
        state.global_step = step
        monitor.on_step_end(None, state, control, model=wrapped)
    monitor.on_train_end(None, state, control, model=wrapped)
    monitor.on_train_end(None, state, control, model=wrapped)  # the same step again: not recorded twice

    assert [r["step"] for r in monitor.history] == [0, 2, 3]
    assert [r["event"] for r in monitor.history] == ["begin", "step", "end"]
    first, last = monitor.history[0], monitor.history[-1]
    for group in ("retain", "forget"):
        assert first[f"{group}_drift_cosine"] == 1.0 and first[f"{group}_drift_rel_change"] == 0.0
        assert last[f"{group}_drift_cosine"] < 1.0 and last[f"{group}_drift_rel_change"] > 0
        assert first[f"{group}_cond_median"] >= 1 and first[f"{group}_n_tokens"] == 32
    assert first["linear_1_condition"] != last["linear_1_condition"]
    assert first["linear_2_condition"] == last["linear_2_condition"]
    frame = monitor.frame()
    assert list(frame["step"]) == [0, 2, 3] and "forget_sigma1_over_sigma10_median" in frame
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    few = ProjectorMonitor([], [e.image for e in data.forget[:2]], vanilla[1], max_tokens=4).measure(model)
    assert few["forget_n_tokens"] == 8 and not any(k.startswith("retain_") for k in few)


def test_projector_monitor_in_a_real_run_leaves_the_run_unchanged(vanilla, data):
    from mlunlearn.engine import UnlearnConfig, unlearn

    if "callbacks" not in inspect.signature(unlearn).parameters:
        pytest.skip("unlearn() takes no callbacks= (the hooks are tested by hand above)")
    model, processor = vanilla
    monitor = ProjectorMonitor([e.image for e in data.retain[:2]], [e.image for e in data.forget[:2]],
                               processor, every=2)
    config = UnlearnConfig(max_steps=4, lr=1e-3, progress=False)
    watched = unlearn(copy.deepcopy(model), "toyworld", 5, "ga", config, processor=processor,
                      params="projector", callbacks=[monitor])
    plain = unlearn(copy.deepcopy(model), "toyworld", 5, "ga", config, processor=processor, params="projector")

    assert [r["step"] for r in monitor.history] == [0, 2, 4]  # begin, every 2 steps; the end is step 4
    assert monitor.history[0]["forget_drift_cosine"] == 1.0 and monitor.history[0]["retain_drift_rel_change"] == 0.0
    assert monitor.history[-1]["forget_drift_cosine"] < 1.0
    # same RNG stream, same updates: the monitor changes nothing in the run
    trained, reference = watched.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    assert [r.get("loss") for r in watched.log] == [r.get("loss") for r in plain.log]
