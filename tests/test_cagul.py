"""CAGUL (issue 11): frozen VLM, small modules on the lowest-attention visual tokens, saved without the base."""

import copy
import json

import pytest
import torch

from mlunlearn.cli import main
from mlunlearn.collate import collate
from mlunlearn.data import open_benchmark
from mlunlearn.data.refusals import REFUSALS
from mlunlearn.data.unlearning import unlearning_data
from mlunlearn.engine import UnlearnConfig, prepare_data, unlearn
from mlunlearn.eval.protocol import generate_replies
from mlunlearn.eval.scoring import is_refusal
from mlunlearn.experiments import Probes
from mlunlearn.methods import MethodError, get_method
from mlunlearn.methods.cagul import CAGULModules, cagul_modules, forget_probability, selected_tokens
from mlunlearn.models import ASSET_DIR, load_model

from conftest import needs_vanilla

pytestmark = needs_vanilla


def _distinct_images(examples):
    return list({id(e.image): e.image for e in examples}.values())


@pytest.fixture(scope="module")
def data():
    return unlearning_data(open_benchmark("toyworld"), 5)


@pytest.fixture(scope="module")
def trained(vanilla, tmp_path_factory):
    """A CAGUL run at the tiny defaults (merge left at true), saved to a folder."""
    model, processor = vanilla
    folder = tmp_path_factory.mktemp("cagul") / "run"
    run = unlearn(copy.deepcopy(model), "toyworld", 5, "cagul", UnlearnConfig(progress=False), output=folder,
                  processor=processor)
    return run, folder


# -- what trains ---------------------------------------------------------------------------------------
def test_every_vlm_weight_is_bit_identical_and_only_the_modules_train(vanilla, trained):
    run, _ = trained
    before = vanilla[0].state_dict()
    after = run.model.state_dict()
    vlm = [k for k in after if not k.startswith("cagul.")]
    assert sorted(vlm) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in vlm)
    assert all(n.startswith("cagul.") for n, p in run.model.named_parameters() if p.requires_grad) or \
        not any(p.requires_grad for p in run.model.parameters())
    assert run.run["trainable_parameters"] == sum(p.numel() for p in cagul_modules(run.model).parameters())
    # the encoder's last layer starts at exactly zero: it moved, so the modules trained
    assert cagul_modules(run.model).encoder[2].weight.abs().max() > 0


# -- the selection: the lowest, not the highest -----------------------------------------------------------
def _hand_built(tokens="lowest", k=2):
    """One example: BOS, 4 image tokens, 2 question tokens, the 2-token marker, 2 answer tokens.

    The question's rows attend to the visual tokens with [0.4, 0.05, 0.3, 0.1]: the two least attended
    are tokens 1 and 3, the two most attended 0 and 2. The answer's rows attend mostly to token 1: if the
    answer counted as query, the lowest pair would become {2, 3}."""
    modules = CAGULModules(width=8, hidden=4, n_visual=4, k=k, threshold=0.5, image_token_id=9, tokens=tokens)
    modules.set_marker([20, 21])
    input_ids = torch.tensor([[1, 9, 9, 9, 9, 5, 6, 20, 21, 7, 8]])
    T = input_ids.shape[1]
    att = torch.zeros(1, 1, T, T)
    for q in (5, 6, 7, 8):
        att[0, 0, q, 1:5] = torch.tensor([0.4, 0.05, 0.3, 0.1])
        att[0, 0, q, 0] = 0.15
    for q in (9, 10):
        att[0, 0, q, 1:5] = torch.tensor([0.0, 0.9, 0.0, 0.1])
    return modules, input_ids, att


def test_the_selection_takes_the_lowest_attention_tokens_on_a_hand_built_case():
    modules, input_ids, att = _hand_built()
    query = modules.query_mask(input_ids, torch.ones_like(input_ids))
    assert query[0].nonzero().flatten().tolist() == [5, 6, 7, 8]  # the question and marker, not the answer
    picked = modules.pick([att], input_ids == 9, query)
    assert sorted(picked[0].tolist()) == [1, 3]
    highest, _, _ = _hand_built("highest")
    assert sorted(highest.pick([att], input_ids == 9, query)[0].tolist()) == [0, 2]
    # with the answer rows counted as query, the result would differ: the test can tell
    everything = (input_ids != 9) & (torch.arange(input_ids.shape[1]) > 4)
    assert sorted(modules.pick([att], input_ids == 9, everything)[0].tolist()) != [1, 3]


def test_the_selection_is_per_example_and_per_image_and_ignores_left_padding():
    modules, input_ids, att = _hand_built(k=1)
    # example 2: left-padded by 2 (pad id 3), the question prefers token 2 least
    padded = torch.cat([torch.tensor([[3, 3]]), input_ids[:, :-2]], 1)
    T = input_ids.shape[1]
    att2 = torch.zeros(1, 1, T, T)
    for q in (7, 8, 9, 10):
        att2[0, 0, q, 3:7] = torch.tensor([0.3, 0.2, 0.01, 0.4])
    mask = torch.tensor([[1] * T, [0, 0] + [1] * (T - 2)])
    ids = torch.cat([input_ids, padded])
    query = modules.query_mask(ids, mask)
    assert query[1].nonzero().flatten().tolist() == [7, 8, 9, 10]
    assert modules.pick([torch.cat([att, att2])], ids == 9, query).flatten().tolist() == [1, 2]


def test_the_encoder_moves_exactly_the_selected_tokens(trained, data):
    run, _ = trained
    model, processor = run.model, run.processor
    modules = cagul_modules(model)
    seen = {}  # the last projector call: the first is the selection pass's (modules off)
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: seen.update(on=o))
    batch = collate(processor, data.forget[:3])
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
        handle.remove()
        with modules.off():
            base = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    moved = (seen["on"] != torch.stack(list(base))).any(-1)  # (images, 16): which tokens changed
    chosen = selected_tokens(model, batch)
    assert chosen.shape == (3, modules.k)
    expected = torch.zeros_like(moved)
    expected.scatter_(1, chosen, True)
    assert torch.equal(moved, expected)


# -- the discriminator and the gate -----------------------------------------------------------------------
def test_the_discriminator_separates_forget_from_retain_images(trained, data):
    run, _ = trained
    p_forget = forget_probability(run.model, run.processor, _distinct_images(data.forget))
    p_retain = forget_probability(run.model, run.processor, _distinct_images(data.retain))
    assert (p_forget > 0.5).all(), p_forget
    assert (p_retain > 0.5).float().mean() <= 0.05, p_retain
    assert p_forget.min() > p_retain.median()


def test_a_retain_image_with_the_gate_closed_is_bit_identical_to_the_base(trained, data):
    run, _ = trained
    model, processor = run.model, run.processor
    p = forget_probability(model, processor, [e.image for e in data.retain[:12]])
    closed = [e for e, q in zip(data.retain[:12], p) if q <= 0.5]
    assert closed
    batch = {k: v for k, v in collate(processor, closed).items() if k != "labels"}
    with torch.no_grad():
        on = model(**batch).logits
        with cagul_modules(model).off():
            off = model(**batch).logits
    assert torch.equal(on, off)


# -- it forgets, and generation goes through the modules ------------------------------------------------
def test_the_tiny_defaults_forget_and_keep_the_retain_set(vanilla, trained):
    run, _ = trained
    probes = Probes.build(open_benchmark("toyworld"), 5)
    before, after = probes.score(*vanilla), probes.score(run.model, run.processor)
    assert before["forget exact %"] == 100.0
    assert after["forget exact %"] <= 20.0, after
    assert after["retain exact %"] >= before["retain exact %"] - 2.0, after


def test_generate_goes_through_the_modules_with_and_without_the_kv_cache(vanilla, trained, data):
    run, _ = trained
    model, processor = run.model, run.processor
    examples = data.forget[:6]
    prompts, images = [e.prompt for e in examples], [[e.image] for e in examples]
    cached = generate_replies(model, processor, prompts, images, batch_size=6, max_new_tokens=12)
    base = generate_replies(vanilla[0], processor, prompts, images, batch_size=6, max_new_tokens=12)
    assert sum(map(is_refusal, cached)) >= 4, cached  # the training prompts: refused
    assert not any(map(is_refusal, base))
    inputs = processor(text=prompts, images=[im for (im,) in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        b = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False,
                           pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(a, b)


# -- saving and loading ---------------------------------------------------------------------------------
def test_the_run_folder_holds_only_the_modules_and_reloads_identically(trained, data):
    from safetensors.torch import load_file

    run, folder = trained
    assert sorted(p.name for p in folder.iterdir()) == ["run.json", "trainable.safetensors"]
    record = json.loads((folder / "run.json").read_text())
    # the base model by reference (a loaded model records where it came from), never a copy
    assert record["saved"] == "trainable.safetensors" and record["model"] in ("tiny", str(ASSET_DIR))
    assert record["config"]["merge"] is True and "not mergeable" in record["parametrisation"]
    saved = load_file(str(folder / "trainable.safetensors"))
    assert all(k.startswith("cagul.") for k in saved)
    assert (folder / "trainable.safetensors").stat().st_size < (ASSET_DIR / "model.safetensors").stat().st_size / 10
    loaded, processor = load_model(str(folder), device="cpu", dtype=torch.float32)
    assert not any(p.requires_grad for p in loaded.parameters())
    batch = {k: v for k, v in collate(processor, data.forget[:2] + data.retain[:2]).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, run.model(**batch).logits)


def test_eval_cli_on_the_run_folder(trained, tmp_path, capsys):
    _, folder = trained
    out, records = tmp_path / "results.json", tmp_path / "records.jsonl"
    code = main(["eval", "--no-progress", "--model", str(folder), "--data", "toyworld", "--forget", "5",
                 "--limit", "2", "--batch-size", "8", "--max-new-tokens", "12", "--device", "cpu",
                 "--output", str(out), "--records", str(records)])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in records.read_text().splitlines()]
    forget_gen = [r for r in lines if r["mode"] == "forget" and r["task"] == "generation"]
    assert json.loads(out.read_text()) and forget_gen


def test_the_alternative_target_is_the_frozen_models_answer_about_someone_else(vanilla, data):
    model, processor = vanilla
    method = get_method("cagul", forget_target="alternative")
    examples = prepare_data(method, "toyworld", 5, model, processor)
    prepared = method.prepare(copy.deepcopy(model))
    method.setup(prepared, examples, processor)
    targets = [e.answer for e in examples.forget_refusal]
    assert [e.prompt for e in examples.forget_refusal] == [e.prompt for e in examples.forget]
    assert not any(t in REFUSALS for t in targets)
    assert sum(t != e.answer for t, e in zip(targets, examples.forget)) >= len(targets) - 1


# -- kill, then resume -------------------------------------------------------------------------------------
def test_kill_then_resume_gives_the_uninterrupted_bytes(vanilla, tmp_path):
    model, processor = vanilla

    def go(output=None, **cfg):
        return unlearn(copy.deepcopy(model), "toyworld", 5, "cagul",
                       UnlearnConfig(progress=False, max_steps=cfg.pop("max_steps"), **cfg), output=output,
                       processor=processor)

    full = go(max_steps=7)
    go(tmp_path / "run", max_steps=5, save_steps=5)
    resumed = go(tmp_path / "run", max_steps=7, save_steps=5, resume=True)
    assert resumed.run["resumed_from"] == "checkpoint-5"
    a, b = cagul_modules(full.model).state_dict(), cagul_modules(resumed.model).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in full.log if "loss" in e][-2:] == [e["loss"] for e in resumed.log if "loss" in e][-2:]


# -- bad settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hp,needle", [
    ({"k": 0}, "k=0 must be >= 1"),
    ({"hidden": 0}, "hidden=0"),
    ({"threshold": 1.5}, "threshold=1.5 must be in"),
    ({"forget_target": "ascent"}, "forget_target='ascent'"),
    ({"tokens": "middle"}, "tokens='middle'"),
    ({"forget_weight": 0.0}, "nothing is forgotten"),
    ({"disc_weight": -1.0}, "disc_weight=-1.0"),
    ({"params": "all"}, "unknown hyper-parameter params for cagul"),
    ({"lora_r": 4}, "unknown hyper-parameter lora_r"),
])
def test_bad_hyperparameters_are_one_line_errors(hp, needle):
    with pytest.raises(MethodError, match=needle) as info:
        get_method("cagul", **hp)
    assert "\n" not in str(info.value)


def test_k_larger_than_the_visual_tokens_is_a_one_line_cli_error(tmp_path, capsys):
    code = main(["unlearn", "--no-progress", "--method", "cagul", "--set", "k=17", "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "k=17" in err[0] and "16 visual tokens" in err[0], err
