"""The unlearning engine: reproducible, resumable, accumulation-correct, loud on bad input (book chapter 2)."""

import copy
import json

import pytest
import torch

from mlunlearn.cli import main
from mlunlearn.data import open_benchmark
from mlunlearn.data.bench import Benchmark
from mlunlearn.data.unlearning import PairedDataset, UnlearningDataError, unlearning_data
from mlunlearn.engine import NonFiniteLossError, UnlearnConfig, split_settings, unlearn
from mlunlearn.methods import MethodError, get_method
from mlunlearn.models import load_model

from conftest import needs_vanilla


pytestmark = needs_vanilla


def _run(vanilla, method="ga", output=None, **cfg):
    model, processor = vanilla
    cfg = {"lr": 3e-3, "max_steps": 4, "progress": False, **cfg}
    hp = {k: cfg.pop(k) for k in list(cfg) if k not in UnlearnConfig.keys()}
    return unlearn(copy.deepcopy(model), "toyworld", 5, method, UnlearnConfig(**cfg), output=output,
                   processor=processor, **hp)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_unlearning_data_is_ft_data_of_the_forget_and_retain_people():
    bench = open_benchmark("toyworld")
    data = unlearning_data(bench, 5)
    assert len(data.forget_ids) == 5 and len(data.retain_ids) == 95
    per_person = len(json.loads(bench.load("ft_Data")[0]["metadata"]))
    assert len(data.forget) == 5 * per_person and len(data.retain) == 95 * per_person
    assert all(e.prompt.startswith("USER: <image>\n") and e.prompt.endswith("ASSISTANT:") for e in data.forget)
    item = PairedDataset(data)[0]
    assert set(item) == {"forget", "retain"} and item["forget"] == data.forget[0]


def test_same_seed_same_result_and_another_seed_differs(vanilla):
    a = _state(_run(vanilla, seed=3).model)
    b = _state(_run(vanilla, seed=3).model)
    c = _state(_run(vanilla, seed=4).model)
    assert _same(a, b) and not _same(a, c)


def test_gradient_accumulation_matches_the_larger_batch(vanilla):
    # Projector only, no dropout: the update is a deterministic function of the batch.
    one = _run(vanilla, params="projector", batch_size=4, grad_accum=1, max_steps=1, seed=1)
    two = _run(vanilla, params="projector", batch_size=2, grad_accum=2, max_steps=1, seed=1)
    w1 = one.model.model.multi_modal_projector.linear_2.weight
    w2 = two.model.model.multi_modal_projector.linear_2.weight
    base = vanilla[0].model.multi_modal_projector.linear_2.weight
    step = (w1 - base).abs().max()
    assert step > 0
    # Equal up to float rounding, which Adam's first step (g / (|g| + eps)) amplifies on elements whose
    # gradient is near 0: a few 1e-6 where the step is 3e-3 (an absolute 1e-6 failed on accelerate 1.16);
    # a wrong batch composition would differ by the size of the step.
    assert (w1 - w2).abs().max() < 1e-2 * step, ((w1 - w2).abs().max(), step)


def test_checkpoint_and_resume_give_the_uninterrupted_result(vanilla, tmp_path):
    full = _state(_run(vanilla, max_steps=4, params="projector", seed=2).model)
    _run(vanilla, output=tmp_path / "run", max_steps=2, save_steps=2, params="projector", seed=2)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = _run(vanilla, output=tmp_path / "run", max_steps=4, save_steps=2, resume=True, params="projector", seed=2)
    assert resumed.run["steps"] == 4
    assert _same(full, _state(resumed.model))


def test_non_finite_loss_stops_with_the_last_checkpoint_named(vanilla, tmp_path, monkeypatch):
    from mlunlearn.methods.ga import GA

    original = GA.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, reference):
        calls["n"] += 1
        terms = original(self, model, batch, reference)
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GA, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3.*checkpoint-2.*lower the learning rate"):
        _run(vanilla, output=tmp_path / "run", save_steps=2, params="projector")
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()


def test_run_folder_holds_run_json_and_a_loadable_model(vanilla, tmp_path):
    result = _run(vanilla, "npo", output=tmp_path / "run", beta=0.2)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["method"] == "npo" and run["hyperparameters"]["beta"] == 0.2 and run["seed"] == 0
    assert run["steps"] == 4 and run["reference"] == "adapters disabled"
    assert [r["step"] for r in run["log"] if "npo" in r] == [1, 2, 3, 4]
    loaded, _ = load_model(str(tmp_path / "run"), device="cpu", dtype=torch.float32)
    assert _same(_state(result.model), _state(loaded))


def test_unmerged_run_saves_the_trainable_state_that_loads_onto_its_base(vanilla, tmp_path):
    cfg = UnlearnConfig(lr=3e-3, max_steps=2, progress=False, merge=False)
    result = unlearn("tiny", "toyworld", 5, "ga", cfg, output=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "trainable.safetensors"]
    loaded, _ = load_model(str(tmp_path / "run"), device="cpu", dtype=torch.float32)
    merged = result.model.merge_and_unload()
    assert all(torch.allclose(v, _state(loaded)[k], atol=1e-6) for k, v in _state(merged).items())


def _bench_with(**changes) -> Benchmark:
    world = open_benchmark("toyworld")
    configs = {n: world.load(n) for n in ("forget_5", "retain_95", "ft_Data")}
    configs.update(changes)
    return Benchmark("edited", configs=configs)


def test_empty_forget_set_and_overlap_are_one_line_errors():
    with pytest.raises(UnlearningDataError, match="forget_5 of edited is empty"):
        unlearning_data(_bench_with(forget_5=[]), 5)
    world = open_benchmark("toyworld")
    overlapping = world.load("retain_95") + world.load("forget_5")[:1]
    with pytest.raises(UnlearningDataError, match="1 people are in both forget_5 and retain_95"):
        unlearning_data(_bench_with(retain_95=overlapping), 5)


def test_a_model_that_is_not_llava_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(MethodError, match="not LLaVA-shaped.*LlavaForConditionalGeneration"):
        unlearn(llama, "toyworld", 5, "ga", processor=object())


def test_settings_split_between_method_and_engine():
    method_kw, engine_kw = split_settings({"beta": "0.1", "lr": "1e-3", "resume": "true"}, "npo")
    assert method_kw == {"beta": "0.1"} and engine_kw == {"lr": 1e-3, "resume": True}
    with pytest.raises(MethodError, match="unknown setting 'betta' for npo.*engine settings: lr"):
        split_settings({"betta": "1"}, "npo")
    assert get_method("npo", **method_kw).beta == 0.1


def test_cli_methods_and_unlearn(tmp_path, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("ga ", "graddiff", "kl ", "npo", "po "))
    code = main(["unlearn", "--method", "po", "--set", "lr=1e-3", "--set", "max_steps=2", "--output",
                 str(tmp_path / "po"), "--no-progress"])
    assert code == 0 and (tmp_path / "po" / "run.json").is_file() and (tmp_path / "po" / "model").is_dir()
    capsys.readouterr()
    for bad, message in ((["--method", "nope"], "unknown method 'nope'"),
                         (["--method", "ga", "--set", "lr"], "not KEY=VALUE"),
                         (["--method", "ga", "--set", "lr=fast"], "lr='fast': expected a float"),
                         (["--method", "npo", "--set", "beta=-1"], "beta=-1.0 must be > 0")):
        assert main(["unlearn", *bad, "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
