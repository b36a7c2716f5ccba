"""MMUnlearner: masks keyed by the tensors that train (also under LoRA), masked-out weights frozen on
forget steps only, the text-only preserve set, the step plan, resume (book chapter 5)."""

import copy
import dataclasses

import pytest
import torch
from transformers import TrainerCallback

from mlunlearn.collate import answer_nll, collate
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import PairedCollator, PhasedDataset, knowledge_examples, unlearning_data
from mlunlearn.engine import UnlearnConfig, prepare_data, unlearn
from mlunlearn.methods import MethodError, get_method
from mlunlearn.methods.mmunlearner import group_of
from mlunlearn.models import load_model
from conftest import needs_vanilla

pytestmark = needs_vanilla


@pytest.fixture(scope="module")
def bench():
    return open_benchmark("toyworld")


@pytest.fixture(scope="module")
def small(bench):
    """A few forget, retain and text-only examples: saliency over them takes a fraction of a second."""
    data = unlearning_data(bench, 5)
    return dataclasses.replace(data, forget=data.forget[:4], retain=data.retain[:8],
                               knowledge=knowledge_examples(bench)[:8])


def _prepared(vanilla, small, **hp):
    model, processor = vanilla
    method = get_method("mmunlearner", saliency_batch=2, **hp)
    prepared = method.prepare(copy.deepcopy(model))
    method.setup(prepared, small, processor)
    return method, prepared


def _manual_fisher(model, processor, examples, name, batch_size=2):
    """mean over batches of (∂ mean NLL / ∂θ)², written out for one tensor."""
    param = dict(model.named_parameters())[name]
    total, batches = torch.zeros_like(param), 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        model.zero_grad()
        answer_nll(model, collate(processor, examples[start:start + batch_size])).mean().backward()
        total += param.grad ** 2
        batches += 1
    model.zero_grad()
    return total / batches


@pytest.mark.parametrize("params", ["all", "lora", "lora+projector"])
def test_masks_key_exactly_the_tensors_that_train_and_each_group_uses_its_preserve_set(vanilla, small, params):
    method, model = _prepared(vanilla, small, params=params)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(method.masks) == sorted(trained)  # issue #8: not the base weights' names
    if "lora" in params:
        assert all(".lora_" in n for n in trained if group_of(n) == "language")
        # peft's B = 0 start: every A factor's gradient is exactly 0 on both sets, (0+ε)/(0+ε) = 1 ≥ τ
        assert all(m.all() for n, m in method.masks.items() if ".lora_A" in n)
    # the public code's keys (base-weight names) are refused, not silently ignored
    base_keyed = {n.replace("base_model.model.", "").replace(".lora_A.default", "").replace(".lora_B.default", ""): m
                  for n, m in method.masks.items()}
    if set(base_keyed) != set(method.masks):
        method.masks = base_keyed
        with pytest.raises(MethodError, match="do not key the trained tensors"):
            method.check_masks(model)
    # the preserve set of each group, recomputed by hand for one tensor of each
    _, processor = vanilla
    checked = 0
    for group, preserve in (("vision", small.retain), ("language", small.knowledge + small.retain)):
        name = next((n for n in trained if group_of(n) == group and ".lora_A" not in n), None)
        if name is None:  # lora: no vision tensor trains
            continue
        f = _manual_fisher(model, processor, small.forget, name)
        p = _manual_fisher(model, processor, preserve, name)
        assert f.abs().sum() > 0 and p.abs().sum() > 0
        assert torch.allclose(method.saliency[name], (f + 1e-15) / (p + 1e-15), rtol=1e-4)
        checked += 1
    assert checked == (1 if params == "lora" else 2)


class _Moves(TrainerCallback):
    """Per optimiser step: the step's phase and, per trained tensor, which elements changed."""

    def __init__(self, method):
        self.method, self.steps = method, []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_step_begin(self, args, state, control, **kw):
        self.before = [p.detach().clone() for _, p in self.params]

    def on_step_end(self, args, state, control, **kw):
        moved = {n: p.detach() != b for (n, p), b in zip(self.params, self.before)}
        self.steps.append((self.method._phase, moved))


def _run_watched(vanilla, small, steps=6, gradient_mask_only=False, **hp):
    """F R F R ...: the forget steps after the first come after retain steps (Adam has momentum then)."""
    model, processor = vanilla
    method = get_method("mmunlearner", saliency_batch=2, retain_steps=1, **hp)
    if gradient_mask_only:
        method.update_hook = lambda: None
    watch = _Moves(method)
    unlearn(copy.deepcopy(model), small, 5, method, UnlearnConfig(lr=1e-2, max_steps=steps, batch_size=2,
                                                                   progress=False),
            processor=processor, callbacks=[watch])
    return method, watch.steps


def _outside(method, moved):
    """How many masked-out elements changed."""
    return sum(int((moved[n] & ~method.masks[n]).sum()) for n in moved)


def test_masked_out_weights_do_not_move_on_forget_steps_but_do_on_retain_steps(vanilla, small):
    method, steps = _run_watched(vanilla, small, params="all")
    assert [p for p, _ in steps] == ["forget", "retain"] * 3
    for phase, moved in steps:
        inside = sum(int((moved[n] & method.masks[n]).sum()) for n in moved)
        if phase == "forget":
            assert _outside(method, moved) == 0  # bit-identical, also after retain steps gave Adam momentum
            assert inside > 0
        else:
            assert _outside(method, moved) > 0  # retain steps are unmasked


def test_without_the_mask_masked_out_weights_move_on_forget_steps(vanilla, small):
    method, steps = _run_watched(vanilla, small, params="all", mask=False)
    assert all(_outside(method, moved) > 0 for phase, moved in steps if phase == "forget")


def test_a_gradient_mask_alone_leaks_through_adams_momentum(vanilla, small):
    """Why the update is masked too: with the gradient mask only, a forget step that follows a retain
    step moves masked-out weights (by the momentum of the retain gradients)."""
    method, steps = _run_watched(vanilla, small, steps=4, gradient_mask_only=True)
    outside = [_outside(method, moved) for phase, moved in steps if phase == "forget"]
    assert outside[0] == 0 and outside[1] > 0  # the first forget step has no momentum yet


def test_the_text_only_preserve_set_holds_every_profile_without_images(vanilla, bench):
    rows = bench.load("Full_Set")
    knowledge = knowledge_examples(bench)
    assert len(knowledge) == sum(len(r["Classification_Task"]["Pure_Text_Questions"]) for r in rows)
    assert all(e.image is None and "<image>" not in e.prompt for e in knowledge)
    prompts = {e.prompt: e.answer for e in knowledge}
    forget_ids = {r["ID"] for r in bench.load("forget_5")}
    for row in rows:
        if row["ID"] in forget_ids:  # the forgotten people's text questions are preserved too
            for q in row["Classification_Task"]["Pure_Text_Questions"]:
                assert prompts[f"USER: {q['Question']}\nASSISTANT:"] == q["Options"][q["Correct_Answer"]]
    model, processor = vanilla
    batch = collate(processor, knowledge[:3])
    assert "pixel_values" not in batch and torch.isfinite(answer_nll(model, batch)).all()
    assert prepare_data(get_method("mmunlearner"), "toyworld", 5, model, processor).knowledge == knowledge
    assert prepare_data(get_method("ga"), "toyworld", 5, model, processor).knowledge is None


def test_a_higher_tau_selects_fewer_weights(vanilla, small):
    counts = [sum(int(m.sum()) for m in _prepared(vanilla, small, tau=tau)[0].masks.values())
              for tau in (0.25, 1.0, 4.0)]
    assert counts[0] > counts[1] > counts[2] > 0


@pytest.mark.parametrize("hp,message", [
    ({"tau": 0}, "tau=0 must be > 0"),
    ({"tau": float("nan")}, "tau=nan must be > 0"),
    ({"forget_weight": -1}, "forget_weight=-1 must be >= 0"),
    ({"retain_steps": -1}, "retain_steps=-1 must be a whole number"),
    ({"retain_steps": 1.5}, "retain_steps=1.5 must be a whole number"),
    ({"saliency_batch": 0}, "saliency_batch=0 must be"),
])
def test_bad_hyperparameters_are_one_line_errors(hp, message):
    with pytest.raises(MethodError, match=message) as err:
        get_method("mmunlearner", **hp)
    assert "\n" not in str(err.value)


def test_a_trained_tensor_outside_both_groups_is_an_error(vanilla, small):
    model, processor = vanilla
    method = get_method("mmunlearner", params="projector", saliency_batch=2)
    prepared = method.prepare(copy.deepcopy(model))
    prepared.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(MethodError, match="stray is in no module group"):
        method.setup(prepared, small, processor)


def test_the_plan_alternates_one_forget_step_and_r_retain_steps():
    assert get_method("mmunlearner", retain_steps=2).phases(2, 9) == ["forget", "retain", "retain"] * 2
    assert get_method("mmunlearner", retain_steps=None).phases(4, 72) == (["forget"] + ["retain"] * 18) * 4


def test_phased_batches_are_homogeneous_under_grad_accum_and_fixed_by_seed_and_epoch(small):
    plan = ["forget", "retain", "retain"]
    ds = PhasedDataset(small, plan, batch_size=2, repeat=3, seed=1)
    items = [ds[j] for j in range(2 * len(ds))]  # two epochs
    phases = [it["phase"] for it in items]
    assert phases == [p for p in plan for _ in range(6)] * 2  # every micro-batch of a step: one phase
    again = [PhasedDataset(small, plan, batch_size=2, repeat=3, seed=1)[j] for j in range(2 * len(ds))]
    assert items == again
    assert items[:len(ds)] != items[len(ds):]  # reshuffled per epoch
    assert items != [PhasedDataset(small, plan, batch_size=2, repeat=3, seed=2)[j] for j in range(2 * len(ds))]


def test_a_phased_run_with_gradient_accumulation_sees_one_phase_per_step(vanilla, small):
    model, processor = vanilla
    method = get_method("mmunlearner", params="projector", retain_steps=1, saliency_batch=2)
    seen = []
    real = method.loss
    method.loss = lambda m, b, r: seen.append(b["phase"]) or real(m, b, r)
    unlearn(copy.deepcopy(model), small, 5, method, UnlearnConfig(lr=1e-3, max_steps=3, batch_size=2, grad_accum=2,
                                                                   progress=False), processor=processor)
    assert seen == ["forget", "forget", "retain", "retain", "forget", "forget"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_resumed_phased_run_gives_the_uninterrupted_bytes_and_an_unmerged_run_loads(vanilla, small, tmp_path):
    model, processor = vanilla

    def run(output=None, **cfg):
        cfg = {"lr": 3e-3, "batch_size": 2, "seed": 2, "progress": False, **cfg}
        return unlearn(copy.deepcopy(model), small, 5, get_method("mmunlearner", retain_steps=1, saliency_batch=2),
                       UnlearnConfig(**cfg), output=output, processor=processor)

    full = run(max_steps=7)
    run(tmp_path / "run", max_steps=5, save_steps=5)  # "killed" after 5 of 7 steps
    resumed = run(tmp_path / "run", max_steps=7, save_steps=5, resume=True)
    assert resumed.run["resumed_from"] == "checkpoint-5"
    a, b = _state(full.model), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run(tmp_path / "unmerged", max_steps=7, merge=False)
    loaded, _ = load_model(str(tmp_path / "unmerged"), device="cpu", dtype=torch.float32)
    c = _state(loaded)
    assert a.keys() == c.keys() and all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert not torch.equal(c["model.multi_modal_projector.linear_2.weight"],
                           model.model.multi_modal_projector.linear_2.weight)


def test_a_benchmark_without_profiles_is_a_one_line_error(vanilla):
    """MMUnlearner's language preserve set is MLLMU-Bench's text-only profile questions; the safety world has none."""
    model, processor = vanilla
    with pytest.raises(MethodError, match="needs Full_Set's text-only questions of every profile") as err:
        prepare_data(get_method("mmunlearner"), "toyworld-safety", "train", model, processor)
    assert "\n" not in str(err.value)
