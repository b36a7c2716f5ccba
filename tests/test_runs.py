"""Runs as a user meets them: defaults, kill-then-resume, output folders, bad settings (issue 9)."""

import copy
import json

import pytest
import torch

from mlunlearn.cli import main
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import PairedDataset, PairedSampler, unlearning_data
from mlunlearn.engine import OutputFolderError, UnlearnConfig, model_family, unlearn
from mlunlearn.experiments import Probes
from mlunlearn.methods import MethodError, get_method
from mlunlearn.methods.ga import GA
from mlunlearn.models import load_model

from conftest import needs_vanilla

pytestmark = needs_vanilla


def _run(vanilla, method="ga", output=None, overwrite=False, **cfg):
    model, processor = vanilla
    cfg = {"lr": 3e-3, "batch_size": 4, "progress": False, "seed": 2, **cfg}
    hp = {k: cfg.pop(k) for k in list(cfg) if k not in UnlearnConfig.keys()}
    return unlearn(copy.deepcopy(model), "toyworld", 5, method, UnlearnConfig(**cfg), output=output,
                   processor=processor, overwrite=overwrite, **hp)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _differing(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


# -- the retain partner and the data order -------------------------------------------------------------
def test_pairs_depend_on_seed_epoch_and_index_only():
    data = unlearning_data(open_benchmark("toyworld"), 5)
    n = len(data.forget)
    torch.manual_seed(0)
    a = [PairedDataset(data, seed=1)[j]["retain"] for j in range(2 * n)]
    torch.manual_seed(123)  # the global generator (dropout uses it) must not matter
    b = [PairedDataset(data, seed=1)[j]["retain"] for j in range(2 * n)]
    assert a == b
    assert a[:n] != a[n:]  # a new partner draw each epoch
    assert a != [PairedDataset(data, seed=2)[j]["retain"] for j in range(2 * n)]
    sampler = PairedSampler(n, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(n)) and sorted(j - n for j in second) == list(range(n))
    assert [j - n for j in second] != first  # reshuffled each epoch


# -- kill, then resume: the same bytes as an uninterrupted run ---------------------------------------------
@pytest.mark.parametrize("method,hp", [
    ("ga", {}),
    ("npo", {"retain_weight": 1.0}),  # a retain term: its partners must be drawn again identically
    ("sineproject", {"objective": "po", "omega": 30.0}),  # the sine deltas and biases must be restored
])
def test_kill_then_resume_gives_the_uninterrupted_bytes(vanilla, tmp_path, method, hp):
    full = _run(vanilla, method, max_steps=7, **hp)
    _run(vanilla, method, output=tmp_path / "run", max_steps=5, save_steps=5, **hp)  # 5 of 7 steps: "killed"
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    assert (ckpt / "trainable.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    resumed = _run(vanilla, method, output=tmp_path / "run", max_steps=7, save_steps=5, resume=True, **hp)
    assert resumed.run["steps"] == 7 and resumed.run["resumed_from"] == "checkpoint-5"
    assert not _differing(_state(full.model), _state(resumed.model))
    losses = lambda r: [e["loss"] for e in r.log if "loss" in e]  # noqa: E731
    assert losses(resumed)[-2:] == losses(full)[-2:]


def test_a_checkpoint_holds_every_trained_tensor_of_sineproject(vanilla, tmp_path):
    from safetensors.torch import load_file

    _run(vanilla, "sineproject", output=tmp_path / "run", max_steps=2, save_steps=2, objective="po")
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainable.safetensors"))
    projector = sorted(k.split("multi_modal_projector.")[1] for k in saved if "multi_modal_projector" in k)
    assert projector == ["linear_1.bias", "linear_1.delta", "linear_2.bias", "linear_2.delta"]
    assert any(".lora_" in k for k in saved)


def test_resuming_with_another_method_or_other_settings_is_refused(vanilla, tmp_path):
    _run(vanilla, "ga", output=tmp_path / "run", max_steps=2, save_steps=2)
    with pytest.raises(MethodError, match="written by ga; use --method ga"):
        _run(vanilla, "npo", output=tmp_path / "run", max_steps=4, save_steps=2, resume=True)
    with pytest.raises(MethodError, match=r"other settings \(lr: 0.003 -> 0.01\)"):
        _run(vanilla, "ga", output=tmp_path / "run", max_steps=4, save_steps=2, resume=True, lr=1e-2)


def test_a_resume_with_nothing_left_to_train_is_an_error_and_writes_nothing(vanilla, tmp_path):
    _run(vanilla, "ga", output=tmp_path / "run", max_steps=2, save_steps=2)
    before = (tmp_path / "run" / "run.json").read_text()
    with pytest.raises(MethodError, match="nothing to resume.*raise max_steps"):
        _run(vanilla, "ga", output=tmp_path / "run", max_steps=2, save_steps=2, resume=True, lr=3e-3)
    assert (tmp_path / "run" / "run.json").read_text() == before


# -- output folders --------------------------------------------------------------------------------------
def test_a_folder_holding_a_run_is_refused_without_overwrite(vanilla, tmp_path):
    _run(vanilla, output=tmp_path / "run", max_steps=1)
    with pytest.raises(OutputFolderError, match="already holds model, run.json; pass --overwrite"):
        _run(vanilla, output=tmp_path / "run", max_steps=1)


def test_overwrite_replaces_the_old_run_and_leaves_nothing_stale(vanilla, tmp_path):
    out = tmp_path / "run"
    _run(vanilla, output=out, max_steps=2, save_steps=1)  # model/ + checkpoints/
    result = _run(vanilla, output=out, overwrite=True, max_steps=2, merge=False)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "trainable.safetensors"]
    assert json.loads((out / "run.json").read_text())["saved"] == "trainable.safetensors"
    loaded, _ = load_model(str(out), device="cpu", dtype=torch.float32)
    merged = _state(result.model.merge_and_unload())
    assert all(torch.allclose(v, _state(loaded)[k], atol=1e-6) for k, v in merged.items())


def test_an_unmerged_sineproject_run_loads_back_with_its_projector(vanilla, tmp_path):
    merged = _run(vanilla, "sineproject", max_steps=3, objective="po", omega=30.0)
    _run(vanilla, "sineproject", output=tmp_path / "run", max_steps=3, objective="po", omega=30.0, merge=False)
    loaded, _ = load_model(str(tmp_path / "run"), device="cpu", dtype=torch.float32)
    a, b = _state(merged.model), _state(loaded)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    vanilla_w = vanilla[0].model.multi_modal_projector.linear_2.weight
    assert not torch.equal(loaded.model.multi_modal_projector.linear_2.weight, vanilla_w)


def test_an_unwritable_output_is_found_before_anything_loads(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["unlearn", "--method", "ga", "--model", str(tmp_path / "no-model"), "--output", str(blocker)])
    err = capsys.readouterr().err
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1  # not "no model folder"


# -- defaults ----------------------------------------------------------------------------------------------
def test_defaults_depend_on_the_model_family_and_are_recorded(vanilla, tmp_path):
    from mlunlearn.models.configs import llava_1_5_config, meta_model

    assert model_family(vanilla[0]) == "tiny" and model_family(meta_model(llava_1_5_config("7b"))) == "llava-1.5"
    assert GA.engine_defaults("llava-1.5") == {"lr": 2e-5, "epochs": 1.0, "batch_size": 4}
    assert get_method("po").engine_defaults("tiny")["lr"] == 3e-3
    model, processor = vanilla
    probes = Probes.build(open_benchmark("toyworld"), 5)
    before = probes.score(model, processor)["forget exact %"]
    run = unlearn(copy.deepcopy(model), "toyworld", 5, "ga", UnlearnConfig(progress=False), processor=processor,
                  output=tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["defaults"] == {"family": "tiny", "applied": {"lr": 1e-3, "epochs": 10.0, "batch_size": 4}}
    assert recorded["config"]["lr"] == 1e-3 and run.run["steps"] == 40
    assert before == 100 and probes.score(run.model, processor)["forget exact %"] == 0  # the defaults forget


@pytest.mark.parametrize("method", ["mmunlearner", "nullspace-cvf"])
def test_the_new_methods_defaults_forget_something_through_the_cli(vanilla, tmp_path, capsys, method):
    """`mlunlearn unlearn --method M --output DIR` with nothing else set is no silent no-op on the tiny model."""
    model, processor = vanilla
    probes = Probes.build(open_benchmark("toyworld"), 5)
    before = probes.score(model, processor)
    assert main(["unlearn", "--method", method, "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["defaults"]["applied"] == get_method(method).engine_defaults("tiny")
    after = probes.score(load_model(str(tmp_path / "run"))[0], processor)
    assert after["forget exact %"] <= before["forget exact %"] - 40  # most forget answers are gone
    assert after["retain exact %"] >= 50  # and it is no collapse


@pytest.mark.parametrize("method,setting,message", [
    ("mmunlearner", "tau=0", "tau=0.0 must be > 0"),
    ("mmunlearner", "retain_steps=-2", "retain_steps=-2 must be a whole number >= 0"),
    ("nullspace-cvf", "threshold=2", "threshold=2.0 must be in (0, 1)"),
    ("nullspace-cvf", "layers=vision:9", "vision:9 is out of range"),
    ("nullspace-cvf", "params=lora", "unknown setting 'params' for nullspace-cvf; method settings: temperature"),
])
def test_bad_settings_of_the_geometry_methods_are_one_line_errors(tmp_path, capsys, method, setting, message):
    code = main(["unlearn", "--method", method, "--set", setting, "--output", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


# -- settings a run cannot use: one line, exit 2 ------------------------------------------------------------
@pytest.mark.parametrize("setting,message", [
    ("lr=-1", "lr=-1.0: must be a positive number"),
    ("batch_size=0", "batch_size=0: must be >= 1"),
    ("scheduler=cosinus", "scheduler='cosinus': use one of constant"),
    ("epochs=0", "epochs=0.0: must be > 0"),
    ("max_steps=0", "max_steps=0: must be >= 1"),
    ("lora_r=0", "lora_r=0 must be >= 1"),
    ("precision=fp8", "precision='fp8': use one of auto"),
])
def test_bad_engine_and_method_settings_are_one_line_errors(tmp_path, capsys, setting, message):
    code = main(["unlearn", "--method", "ga", "--set", setting, "--output", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_sineproject_rejects_settings_it_does_not_use():
    with pytest.raises(MethodError, match="unknown hyper-parameter params for sineproject"):
        get_method("sineproject", params="llm")
    with pytest.raises(MethodError, match="beta=0.2 is not used by objective=po"):
        get_method("sineproject", objective="po", beta="0.2")
    assert get_method("sineproject", objective="npo", beta="0.2")._objective.beta == 0.2
    with pytest.raises(MethodError, match="unknown hyper-parameter forget_weight for kl"):
        get_method("kl", forget_weight=2)


# -- the stages a method can use: setup with data, and a hook on the optimiser's update -----------------------
def test_setup_sees_the_data_and_the_update_hook_acts_on_the_update(vanilla):
    from dataclasses import dataclass

    seen = {}

    @dataclass
    class Probe(GA):
        name = "probe-method"

        def setup(self, model, data, processor):
            seen["setup"] = (len(data.forget), len(data.retain), any(p.requires_grad for p in model.parameters()))

        def update_hook(self):
            def hook(name, param, update):
                seen.setdefault("updates", []).append(update.abs().max().item())
                return update * 0 if "linear_2" in name else update  # linear_2 may not move at all
            return hook

    model, processor = vanilla
    method = Probe(params="projector")
    run = unlearn(copy.deepcopy(model), "toyworld", 5, method,
                  UnlearnConfig(lr=1e-3, max_steps=2, progress=False), processor=processor)
    assert seen["setup"] == (15, 285, True)
    # Adam's first update is lr·sign(g) per element: the hook sees the update, not the gradient.
    assert max(seen["updates"]) == pytest.approx(1e-3, rel=1e-2)  # float32 weights: ~1e-3 relative
    after, before = run.model.model.multi_modal_projector, model.model.multi_modal_projector
    assert torch.equal(after.linear_2.weight, before.linear_2.weight)
    assert not torch.equal(after.linear_1.weight, before.linear_1.weight)


def test_the_gradient_hook_acts_before_the_step_so_adams_moments_never_see_what_it_removes(vanilla):
    from dataclasses import dataclass

    @dataclass
    class Probe(GA):
        name = "probe-gradient"

        def gradient_hook(self):
            return lambda name, param, grad: grad * 0 if "linear_2" in name else grad

    model, processor = vanilla
    run = unlearn(copy.deepcopy(model), "toyworld", 5, Probe(params="projector"),
                  UnlearnConfig(lr=1e-3, max_steps=3, progress=False), processor=processor)
    after, before = run.model.model.multi_modal_projector, model.model.multi_modal_projector
    # a zero gradient from the first step on: Adam's moments stay 0, so linear_2 never moves
    assert torch.equal(after.linear_2.weight, before.linear_2.weight)
    assert not torch.equal(after.linear_1.weight, before.linear_1.weight)


def test_a_method_can_alternate_forget_only_and_retain_only_steps(vanilla):
    from dataclasses import dataclass

    from mlunlearn.methods.terms import nll

    seen = []

    @dataclass
    class Alternating(GA):
        name = "probe-phases"

        def phases(self, forget_batches, retain_batches):
            seen.append(("plan", forget_batches, retain_batches))
            return ["forget", "retain", "retain"] * forget_batches

        def loss(self, model, batch, reference):
            streams = sorted(k for k in batch if k in ("forget", "retain", "forget_refusal", "pd"))
            seen.append((batch["phase"], streams))
            value = nll(model, batch, batch["phase"]).mean()
            return {"loss": -value if batch["phase"] == "forget" else value}

    model, processor = vanilla
    run = unlearn(copy.deepcopy(model), "toyworld", 5, Alternating(kl_weight=0.5),
                  UnlearnConfig(lr=1e-3, epochs=1, batch_size=4, progress=False), processor=processor)
    assert seen[0] == ("plan", 4, 72)  # 15 forget and 285 retain examples, 4 per step
    steps = seen[1:]
    assert run.run["steps"] == len(steps) == 12
    assert steps[:3] == [("forget", ["forget"]), ("retain", ["retain"]), ("retain", ["retain"])]
    kl = [r.get("retain_kl") for r in run.log if "loss" in r]  # the add-on only on retain steps
    assert kl[0] is None and kl[1] is not None


def test_unlearning_data_can_be_given_directly(vanilla):
    model, processor = vanilla
    data = unlearning_data(open_benchmark("toyworld"), 10)
    data.forget = data.forget[:8]
    run = unlearn(copy.deepcopy(model), data, "round 2", "ga",
                  UnlearnConfig(lr=1e-3, max_steps=1, progress=False), processor=processor)
    assert run.run["examples"]["forget"] == 8 and run.run["data"] == "toyworld forget_10"
    assert run.run["forget"] == "round 2"


# -- benchmarks ------------------------------------------------------------------------------------------
def test_benchmarks_are_registered_and_check_their_splits():
    from mlunlearn.benchmarks import BENCHMARKS, get_benchmark
    from mlunlearn.data import BenchmarkError

    assert "mllmu-bench" in BENCHMARKS
    bench = get_benchmark("toyworld")
    assert bench.splits == (5, 10, 15) and len(bench.unlearning_data(5).forget_ids) == 5
    with pytest.raises(BenchmarkError, match="no split 7; use one of 5, 10, 15"):
        bench.unlearning_data(7)
    with pytest.raises(BenchmarkError, match="no benchmark reads --data 'nowhere-bench'"):
        get_benchmark("nowhere-bench")


def test_progress_bars_obey_tqdm_disable(monkeypatch):
    from mlunlearn.utils import progress_bar, progress_enabled

    monkeypatch.setenv("TQDM_DISABLE", "1")  # what make test / make execute set: no widget may be stored
    assert not progress_enabled(True) and progress_bar(range(3), "x").disable
    monkeypatch.delenv("TQDM_DISABLE")
    assert progress_enabled(True) and not progress_enabled(False)


def test_resuming_another_methods_finished_run_names_the_method_first(vanilla, tmp_path):
    _run(vanilla, "ga", output=tmp_path / "run", max_steps=2, save_steps=2)
    with pytest.raises(MethodError, match="written by ga; use --method ga"):
        _run(vanilla, "po", output=tmp_path / "run", max_steps=2, save_steps=2, resume=True)


def test_4bit_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    code = main(["unlearn", "--method", "ga", "--quantization", "4bit", "--device", "cpu",
                 "--output", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_loss_on_a_reused_batch_is_computed_afresh(vanilla):
    """The per-step logits cache lives in total_loss's own copy of the batch: calling a loss twice on one
    batch dict (as a benchmark or a chapter does) must not reuse the first call's graph."""
    from mlunlearn.collate import collate

    model, processor = vanilla
    method = get_method("po", params="projector")
    trained = method.prepare(copy.deepcopy(model)).train()
    data = unlearning_data(open_benchmark("toyworld"), 5)
    from mlunlearn.data.unlearning import add_refusals

    add_refusals(data)
    batch = {"forget_refusal": collate(processor, data.forget_refusal[:2]), "retain": collate(processor, data.retain[:2])}
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=1.0)
    first = method.total_loss(trained, batch, None)["loss"]
    first.backward()
    opt.step()
    second = method.total_loss(trained, batch, None)["loss"]  # new weights: a new value, no stale graph
    second.backward()
    assert set(batch) == {"forget_refusal", "retain"} and second.item() != first.item()


def test_a_run_trained_on_a_4bit_base_reloads_its_base_in_4bits(vanilla, tmp_path, monkeypatch):
    """run.json says how the base was loaded; load_model(<run>) reloads the base in 4 bits on a GPU (the
    adapters were trained against it) and, where 4-bit cannot load (the CPU), at full precision with a
    warning that says so."""
    from mlunlearn.models import loading

    out = tmp_path / "run"
    _run(vanilla, output=out, max_steps=1, merge=False)
    run = json.loads((out / "run.json").read_text())
    assert run["quantization"] is None  # the tiny model was loaded unquantized
    (out / "run.json").write_text(json.dumps({**run, "quantization": "4bit"}))
    with pytest.warns(UserWarning, match="trained on a 4-bit base; loading it at full precision on cpu"):
        loaded, _ = load_model(str(out), device="cpu", dtype=torch.float32)
    assert not getattr(loaded, "is_loaded_in_4bit", False)

    asked = []

    def fake_load(name, device=None, dtype=None, quantization=None, attn_implementation=None):
        asked.append((name, device, quantization))
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(loading, "load_model", fake_load)
    with pytest.raises(RuntimeError, match="stop before loading"):
        loading._load_run(out, "cuda:0", torch.float16, None, None)
    assert asked == [(run["model"], "cuda:0", "4bit")]
