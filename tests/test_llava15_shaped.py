"""The LLaVA-1.5 path in CI, on a model with llava-hf/llava-1.5-7b-hf's exact shapes (one layer per tower,
random weights; mlunlearn/models/shaped.py): loading, the processor's 576 image tokens and the published
prompt, evaluation on a published-layout MLLMU-Bench folder, and one unlearning step of each method with LoRA
on Llama's module names.

Budget: about 4.5 CPU minutes, the newer methods (MMUnlearner, nullspace-cvf, CAGUL) 2.5 of them: saliency over
every stream, 4096 x 4096 eigendecompositions, a second attention pass per image, each at 576 image tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
from transformers import TrainerCallback

from mlunlearn.benchmarks import as_benchmark
from mlunlearn.data import write_benchmark
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.models import build_llava_1_5_shaped, load_model
from mlunlearn.models.configs import llava_1_5_config

torch.set_num_threads(1)

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="session")
def shaped_dir(tmp_path_factory):
    """The 7B-shaped model folder, written once per test session (~1 GB of fp16 safetensors, seconds)."""
    folder = tmp_path_factory.getbasetemp() / "llava-1.5-7b-shaped"
    if not (folder / "model.safetensors").is_file():
        build_llava_1_5_shaped(folder, "7b", text_layers=1, vision_layers=1, seed=0)
    return folder


@pytest.fixture(scope="module")
def shaped(shaped_dir):
    return load_model(str(shaped_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A published-layout MLLMU-Bench folder: one forget and one retain person (tests/test_bad_input.py's)."""
    from test_bad_input import _small_configs

    configs = _small_configs()
    keep = {configs["forget_5"][0]["ID"], configs["retain_95"][0]["ID"]}
    configs = {k: [r for r in rows if r["ID"] in keep] if k != "Retain_Set" else rows[:1]
               for k, rows in configs.items()}
    return write_benchmark(configs, tmp_path_factory.mktemp("mllmu") / "bench")


@pytest.fixture(scope="module")
def data(bench_dir):
    """One forget and one retain example of the folder (batch 1, one step)."""
    full = as_benchmark(str(bench_dir)).unlearning_data(5)
    return dataclasses.replace(full, forget=full.forget[:1], retain=full.retain[:1])


# ------------------------------------------------------------------------------------------- the model


def test_the_folder_loads_with_the_published_config_and_layer_counts(shaped, shaped_dir):
    model, processor = shaped
    published = llava_1_5_config("7b")
    config = model.config
    for key in ("image_token_id", "vision_feature_layer", "vision_feature_select_strategy", "image_seq_length",
                "projector_hidden_act"):
        assert getattr(config, key) == getattr(published, key), key
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "pad_token_id"):
        assert getattr(config.text_config, key) == getattr(published.text_config, key), key
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size", "hidden_act"):
        assert getattr(config.vision_config, key) == getattr(published.vision_config, key), key
    assert config.text_config.num_hidden_layers == 1 and config.vision_config.num_hidden_layers == 1
    inner = model.model
    assert tuple(inner.multi_modal_projector.linear_1.weight.shape) == (4096, 1024)
    assert tuple(inner.multi_modal_projector.linear_2.weight.shape) == (4096, 4096)
    assert tuple(model.lm_head.weight.shape) == (32064, 4096)
    from mlunlearn.engine import model_family

    assert model_family(model) == "llava-1.5"  # so FAMILY_SETTINGS["llava-1.5"] and its defaults apply
    from safetensors import safe_open

    with safe_open(str(shaped_dir / "model.safetensors"), framework="pt") as f:  # fp16, as llava-hf publishes
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_the_tokenizer_is_llama_shaped():
    from mlunlearn.models.shaped import llama_style_tokenizer

    tok = llama_style_tokenizer()
    ids = tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>", "<image>", "<pad>"])
    assert ids == [0, 1, 2, 3, 13, 258, 32000, 32001]
    assert len(tok) == 32002 and tok.pad_token_id == 32001 and tok.bos_token_id == 1
    text = "USER: <image>\nWho is Zoë Ödegaard? 你好 ASSISTANT:"
    encoded = tok(text).input_ids
    assert encoded[0] == 1 and 32000 in encoded and 13 in encoded  # BOS, the image token, "\n" as <0x0A>
    assert tok.decode(encoded, skip_special_tokens=False) == "<s> " + text  # byte fallback: nothing lost
    assert tok.convert_ids_to_tokens(tok("ASSISTANT: yes").input_ids)[1].startswith("▁")  # SentencePiece's marker


def test_one_image_is_576_tokens_and_the_prompt_is_llava_1_5s(shaped):
    from PIL import Image

    from mlunlearn.collate import Example, collate
    from mlunlearn.eval import prompts

    _, processor = shaped
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    published = "USER: <image>\nWho is this? ASSISTANT:"  # llava-hf's chat template
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == published
    assert prompts.qa_prompt("Who is this?", True) == "USER: <image>\nWho is this?\nASSISTANT:"  # MLLMU-Bench's
    images = [Image.new("RGB", (500, 375), "red"), Image.new("RGB", (200, 300), "blue")]
    batch = collate(processor, [Example(prompts.qa_prompt("Who?", True), "Ann", im) for im in images])
    assert batch["pixel_values"].shape == (2, 3, 336, 336)  # resized and centre-cropped to 336
    assert ((batch["input_ids"] == 32000).sum(1) == 576).all()
    pixels = batch["pixel_values"][0]
    assert pixels.mean(dim=(1, 2)).tolist() == pytest.approx(  # a red image, normalised with CLIP's mean/std
        [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (0 - 0.40821073) / 0.27577711], abs=0.02)


def test_eval_runs_and_writes_mllmu_benchs_keys(shaped, bench_dir):
    from mlunlearn.eval import evaluate

    model, processor = shaped
    result = evaluate(model, processor, str(bench_dir), 5, tasks=("classification",), limit=1, max_new_tokens=2)
    official = result.to_official()
    assert list(official) == ["Forget Set Results", "Test Set Results", "Retain Set (shared dataset) Results",
                              "Retain Set (real person) Results"]
    assert set(official["Forget Set Results"]) >= {"fill_in_the_blank", "classification"}
    assert {r.modality for r in result.records} == {"Image_Textual", "Pure_Text"} and len(result.records) == 8


# ------------------------------------------------------------------------------------------- unlearning


class _Watch(TrainerCallback):
    """What trained (names, at the start), and the projector's output shape on every image batch."""

    def __init__(self, model):
        self.trained, self.visual = [], []
        model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, out: self.visual.append(tuple(out.shape)))

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.trained = [n for n, p in model.named_parameters() if p.requires_grad]


def _run(shaped, data, method, **hp):
    """One step of ``method`` at batch 1 on a fresh copy; returns (result, what trained, visual shapes, the
    original model for comparison)."""
    original, processor = shaped
    model = copy.deepcopy(original)
    watch = _Watch(model)
    config = UnlearnConfig(max_steps=1, batch_size=1, progress=False, merge=False)
    result = unlearn(model, data, 5, method, config, processor=processor, callbacks=[watch], **hp)
    return result, watch


def _finite_losses(result):
    losses = [r["loss"] for r in result.log if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), result.log
    return losses


def _lora_modules(names):
    """{(layer, module)} of the LoRA tensors among ``names``; every name must be a LoRA tensor of the LLM."""
    out = set()
    for n in names:
        m = re.search(r"language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_[AB]\.", n)
        assert m, n
        out.add((int(m.group(1)), m.group(2)))
    return out


def _same(a, b, name):
    return torch.equal(dict(a.named_parameters())[name], dict(b.named_parameters())[name])


FROZEN = ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", "model.multi_modal_projector.linear_1.weight",
          "model.language_model.layers.0.self_attn.q_proj.weight")


def _assert_frozen_unchanged(result, original, names=FROZEN):
    base = result.model.get_base_model() if hasattr(result.model, "get_base_model") else result.model
    params = {n.replace(".base_layer", ""): p for n, p in base.named_parameters()}
    for name in names:
        assert torch.equal(params[name], dict(original.named_parameters())[name]), name


def test_ga_trains_lora_on_llamas_seven_linears_with_the_llava_1_5_defaults(shaped, data):
    result, watch = _run(shaped, data, "ga")
    _finite_losses(result)
    assert _lora_modules(watch.trained) == {(0, t) for t in LLAMA_TARGETS}
    assert len(watch.trained) == 14  # lora_A and lora_B of each
    run = result.run
    assert run["defaults"]["family"] == "llava-1.5" and run["config"]["gradient_checkpointing"] is True
    assert run["config"]["lr"] == 2e-5 and run["steps"] == 1
    assert watch.visual and all(s[1:] == (576, 4096) for s in watch.visual)  # 576 visual tokens per image
    _assert_frozen_unchanged(result, shaped[0])
    moved = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in moved)  # lora_B starts at zero: the step moved it


def test_npo_uses_the_model_with_adapters_disabled_as_its_reference(shaped, data):
    result, watch = _run(shaped, data, "npo")
    losses = _finite_losses(result)
    assert result.run["reference"] == "adapters disabled"
    assert losses[0] == pytest.approx(-2 / 0.4 * math.log(0.5), rel=1e-5)  # NLL = NLL_ref at the start
    assert _lora_modules(watch.trained) == {(0, t) for t in LLAMA_TARGETS}
    _assert_frozen_unchanged(result, shaped[0])


def test_sineproject_trains_lora_and_the_projector_deltas_only(shaped, data):
    result, watch = _run(shaped, data, "sineproject")
    _finite_losses(result)
    sine = {n for n in watch.trained if "multi_modal_projector" in n}
    assert {n.rsplit("multi_modal_projector.", 1)[1] for n in sine} == {
        "linear_1.delta", "linear_1.bias", "linear_2.delta", "linear_2.bias"}
    assert _lora_modules(set(watch.trained) - sine) == {(0, t) for t in LLAMA_TARGETS}
    assert all(s[1:] == (576, 4096) for s in watch.visual)
    _assert_frozen_unchanged(result, shaped[0], FROZEN[::2])
    base = result.model.get_base_model()
    assert torch.equal(base.model.multi_modal_projector.linear_1.weight,
                       shaped[0].model.multi_modal_projector.linear_1.weight)  # W stays, ΔW trains


def test_mmunlearner_with_lora_masks_the_tensors_that_train(shaped, data):
    from mlunlearn.collate import Example
    from mlunlearn.eval import prompts

    # the language group's preserve set: text-only questions (MLLMU-Bench's Full_Set; two, by hand, here)
    knowledge = [Example(prompts.qa_prompt(q, False), a) for q, a in (("Who is Ann?", "A farmer."),
                                                                     ("Where does Bo live?", "In Oslo."))]
    result, watch = _run(shaped, dataclasses.replace(data, knowledge=knowledge), "mmunlearner", params="lora",
                         retain_steps=0)
    _finite_losses(result)
    assert _lora_modules(watch.trained) == {(0, t) for t in LLAMA_TARGETS}
    _assert_frozen_unchanged(result, shaped[0])


def test_nullspace_cvf_trains_only_the_visual_linears(shaped, data):
    result, watch = _run(shaped, data, "nullspace-cvf")
    _finite_losses(result)
    assert watch.trained and all(("vision_tower" in n or "multi_modal_projector" in n) and n.endswith(".weight")
                                 for n in watch.trained)
    assert all(s[1:] == (576, 4096) for s in watch.visual)
    _assert_frozen_unchanged(result, shaped[0], FROZEN[2:])


def test_cagul_trains_only_its_modules_on_576_visual_tokens(shaped, data):
    result, watch = _run(shaped, data, "cagul", k=16)
    _finite_losses(result)
    assert watch.trained and all(n.startswith("cagul.") for n in watch.trained)
    assert all(s[1:] == (576, 4096) for s in watch.visual)
    _assert_frozen_unchanged(result, shaped[0])
