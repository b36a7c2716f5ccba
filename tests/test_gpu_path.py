"""The GPU path (LLaVA-1.5 on Colab), checked on the CPU with the tiny model: 4-bit loading settings,
SineProject in half precision, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from conftest import needs_vanilla
from mlunlearn.engine import FAMILY_SETTINGS, UnlearnConfig, split_settings, unlearn
from mlunlearn.methods import MethodError

pytestmark = needs_vanilla


# -- gradient checkpointing --------------------------------------------------------------------------------


class _Seen(TrainerCallback):
    """What the Trainer trained with: its checkpointing argument, and whether the model checkpointed."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.argument = args.activation_checkpointing
        self.model_checkpointing = base.is_activation_checkpointing


def _losses(vanilla, method, checkpointing):
    model, processor = vanilla
    seen = _Seen()
    config = UnlearnConfig(lr=1e-3, max_steps=2, batch_size=2, progress=False, gradient_checkpointing=checkpointing)
    result = unlearn(copy.deepcopy(model), "toyworld", 5, method, config, processor=processor, callbacks=[seen])
    return [r["loss"] for r in result.log if "loss" in r], seen, result


@pytest.mark.parametrize("method", ["graddiff", "sineproject"])  # LoRA only; LoRA + the sine projector
def test_gradient_checkpointing_reaches_the_trainer_and_keeps_the_losses(vanilla, method):
    off, seen_off, _ = _losses(vanilla, method, False)
    on, seen_on, result = _losses(vanilla, method, True)
    assert (seen_off.argument, seen_off.model_checkpointing) == (False, False)
    assert (seen_on.argument, seen_on.model_checkpointing) == (True, True)
    assert len(on) == len(off) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(on, off)), (on, off)
    assert result.run["config"]["gradient_checkpointing"] is True
    assert not result.model.is_activation_checkpointing  # the returned model evaluates as usual


def test_gradient_checkpointing_defaults_per_family_and_parses():
    assert FAMILY_SETTINGS["tiny"]["gradient_checkpointing"] is False
    assert FAMILY_SETTINGS["llava-1.5"]["gradient_checkpointing"] is True
    assert UnlearnConfig().gradient_checkpointing is None  # unset: the family's
    for text, value in (("true", True), ("false", False), ("1", True)):
        assert split_settings({"gradient_checkpointing": text}, "ga") == ({}, {"gradient_checkpointing": value})
    with pytest.raises(MethodError, match="gradient_checkpointing='maybe': expected a bool"):
        split_settings({"gradient_checkpointing": "maybe"}, "ga")
    with pytest.raises(MethodError, match="gradient_checkpointing"):
        UnlearnConfig(gradient_checkpointing="yes")


def test_the_tiny_family_trains_without_checkpointing_by_default(vanilla):
    model, processor = vanilla
    seen = _Seen()
    result = unlearn(copy.deepcopy(model), "toyworld", 5, "ga", UnlearnConfig(max_steps=1, progress=False),
                     processor=processor, callbacks=[seen])
    assert seen.argument is False and result.run["config"]["gradient_checkpointing"] is False


# -- 4-bit loading -----------------------------------------------------------------------------------------


def test_4bit_keeps_the_vision_tower_projector_and_head_in_full_precision(vanilla):
    """The BitsAndBytesConfig load_model passes, checked against the tiny LLaVA's module names with the rule
    transformers applies: every Linear of the language model is quantized, none of the three kept parts."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from mlunlearn.models.loading import FULL_PRECISION_MODULES, ModelLoadError, quantization_kwargs

    kwargs = quantization_kwargs("4bit", torch.bfloat16, "cuda:0")
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": "cuda:0"}
    assert set(config.llm_int8_skip_modules) == set(FULL_PRECISION_MODULES)
    model = vanilla[0]
    kept = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and not should_convert_module(n, config.llm_int8_skip_modules)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kept == {n for n in linears if n.startswith(("model.vision_tower.", "model.multi_modal_projector.", "lm_head"))}
    assert {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head"} <= kept
    assert any(".language_model." in n for n in linears - kept) and not any(".language_model." in n for n in kept)
    assert quantization_kwargs(None, torch.float32, "cpu") == {}
    with pytest.raises(ModelLoadError, match="unknown quantization '8bit'"):
        quantization_kwargs("8bit", torch.float16, "cuda")


def test_sineproject_refuses_a_quantized_projector_in_one_line():
    from mlunlearn.methods.sineproject import SineLinear

    layer = torch.nn.Linear(4, 3)
    layer.weight = torch.nn.Parameter(torch.zeros(6, 1, dtype=torch.uint8), requires_grad=False)  # packed 4-bit
    with pytest.raises(MethodError, match=r"projector's weights are quantized \(torch.uint8\).*quantization='4bit'\) keeps"):
        SineLinear(layer)


def test_a_real_4bit_tiny_model_trains_sineproject_and_its_projector():
    """With bitsandbytes (not installed on the CI machine: skipped there), the tiny LLaVA loads in 4 bits on
    the CPU with its projector in full precision, and one SineProject step and one lora+projector step run."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mlunlearn.models import ASSET_DIR
    from mlunlearn.models.loading import quantization_kwargs

    processor = AutoProcessor.from_pretrained(str(ASSET_DIR))
    for method in ("sineproject", "graddiff"):
        model = LlavaForConditionalGeneration.from_pretrained(
            str(ASSET_DIR), dtype=torch.float32, use_safetensors=True,
            **quantization_kwargs("4bit", torch.float32, "cpu"))
        assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
        hp = {} if method == "sineproject" else {"params": "lora+projector"}
        result = unlearn(model, "toyworld", 5, method, UnlearnConfig(lr=1e-4, max_steps=1, batch_size=2,
                                                                     progress=False), processor=processor, **hp)
        assert result.run["steps"] == 1 and result.run["saved"] is None


# -- half precision ----------------------------------------------------------------------------------------


def _bf16_batch(vanilla, method):
    from mlunlearn.benchmarks import as_benchmark
    from mlunlearn.data.unlearning import PairedCollator, PairedDataset
    from mlunlearn.engine import prepare_data

    model, processor = vanilla
    model = copy.deepcopy(model).to(torch.bfloat16)
    data = prepare_data(method, as_benchmark("toyworld"), 5, model.eval(), processor)
    dataset = PairedDataset(data, seed=0)
    return model, PairedCollator(processor)([dataset[0], dataset[1]])


def _one_step(model, method, batch, lr=1e-5):
    torch.manual_seed(0)
    model.train()
    loss = method.total_loss(model, batch, None)["loss"]
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0).step()
    return loss


def test_sineproject_in_bf16_trains_fp32_tensors_and_keeps_small_updates(vanilla):
    """A bf16 model: ΔW and the biases train in fp32, and one Adam step at lr 1e-5 moves nearly every entry
    of the effective projector weights W + sin(ω·ΔW)/ω (summed in fp32). Before the fix the biases were
    bf16 and the sum was taken in bf16, where ~87% of those first updates rounded back to W."""
    from mlunlearn.methods import get_method

    method = get_method("sineproject", objective="ga")
    model, batch = _bf16_batch(vanilla, method)
    model = method.parametrisation().apply(model)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("linear_2.bias") for n in trainable) and any(n.endswith("linear_2.delta") for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    layers = method.sine_modules
    assert all(layer.weight.dtype == torch.bfloat16 for layer in layers.values())  # W itself stays bf16
    before = {k: layer.effective_weight().detach().clone() for k, layer in layers.items()}
    loss = _one_step(model, method, batch)
    assert torch.isfinite(loss)
    for name, layer in layers.items():
        after = layer.effective_weight()
        assert after.dtype == torch.float32
        moved = (after != before[name]).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.0%} of the effective weights moved"
        # what the matmul uses: the fp32 sum, rounded once to W's dtype
        x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
        expected = torch.nn.functional.linear(x, after.to(torch.bfloat16), layer.bias.to(torch.bfloat16))
        assert torch.equal(layer(x), expected)


def test_sineproject_in_fp32_is_the_previous_formula_exactly():
    """The fp32 path (every committed tiny number) computes exactly x (W + sin(ω·ΔW)/ω)ᵀ + b, as before."""
    from mlunlearn.methods.sineproject import SineLinear

    torch.manual_seed(0)
    for omega, additive in ((1.0, False), (30.0, False), (1.0, True)):
        layer = SineLinear(torch.nn.Linear(16, 8), omega=omega, additive=additive, init="normal", init_scale=0.1)
        x = torch.randn(5, 16, requires_grad=True)
        added = layer.delta if additive else torch.sin(omega * layer.delta) / omega
        previous = torch.nn.functional.linear(x, layer.weight + added.to(layer.weight.dtype), layer.bias)
        now = layer(x)
        assert torch.equal(now, previous)
        assert torch.equal(layer.effective_weight(), layer.weight + added)
        g_now = torch.autograd.grad(now.sum(), [layer.delta, layer.bias])
        g_previous = torch.autograd.grad(previous.sum(), [layer.delta, layer.bias])
        assert all(torch.equal(a, b) for a, b in zip(g_now, g_previous))


@pytest.mark.parametrize("params", ["projector", "lora+projector"])
def test_a_trained_projector_of_a_bf16_model_trains_in_fp32(vanilla, params):
    """params="projector"/"lora+projector" on a half-precision model (a 4-bit one keeps its projector in
    the compute dtype): the projector trains in fp32 (no fp16 gradients for the GradScaler, no bf16
    rounding of small steps), the model runs without autocast, and one small step moves its weights."""
    from mlunlearn.methods import get_method

    method = get_method("ga", params=params)
    model, batch = _bf16_batch(vanilla, method)
    model = method.parametrisation().apply(model)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    projector = model.get_base_model().model.multi_modal_projector if "lora" in params else model.model.multi_modal_projector
    before = projector.linear_2.weight.detach().clone()
    loss = _one_step(model, method, batch)
    assert torch.isfinite(loss) and loss.dtype in (torch.bfloat16, torch.float32)
    assert (projector.linear_2.weight != before).float().mean().item() > 0.9
    language_model = model.get_base_model() if "lora" in params else model
    assert language_model.lm_head.weight.dtype == torch.bfloat16  # the rest stays bf16


def test_a_trained_projector_of_an_fp32_model_is_untouched(vanilla):
    from mlunlearn.methods import get_method

    model = copy.deepcopy(vanilla[0])
    model = get_method("ga", params="projector").parametrisation().apply(model)
    assert not model.model.multi_modal_projector._forward_pre_hooks  # no cast, no copy: the tiny path as before


# -- 4-bit asked for in the Python API; the reference model loaded as the trained one ---------------------


class _LoadSpy:
    """Stands in for ``mlunlearn.models.load_model``: records each call's arguments, then either loads the
    model for real (``then="load"``) or stops the run with a sentinel error (``then="stop"``)."""

    class Stop(Exception):
        pass

    def __init__(self, then="load"):
        from mlunlearn.models import load_model

        self.real, self.then, self.calls, self.loaded = load_model, then, [], []

    def __call__(self, name, device=None, dtype=None, quantization=None, **kw):
        self.calls.append({"name": name, "device": device, "dtype": dtype, "quantization": quantization})
        if self.then == "stop":
            raise self.Stop(name)
        model, processor = self.real(name, device=device, dtype=dtype, **kw)
        self.loaded.append(model)
        return model, processor


def _as_if_4bit(model, compute_dtype=torch.bfloat16):
    """Mark ``model`` as transformers marks a bitsandbytes 4-bit model (bitsandbytes is not installed here):
    ``is_loaded_in_4bit`` and the config's quantization_config, as load_model would have passed it."""
    from mlunlearn.models.loading import quantization_kwargs

    model.is_loaded_in_4bit = True
    model.config.quantization_config = quantization_kwargs("4bit", compute_dtype, "cpu")["quantization_config"]
    return model


def test_load_settings_reads_device_dtype_and_4bit_from_a_loaded_model(vanilla):
    from mlunlearn.models.loading import ModelLoadError, load_settings

    model = copy.deepcopy(vanilla[0])
    assert load_settings(model) == {"device": "cpu", "dtype": torch.float32, "quantization": None}
    assert load_settings(model.to(torch.bfloat16))["dtype"] == torch.bfloat16
    assert load_settings(_as_if_4bit(model, torch.float16)) == {"device": "cpu", "dtype": torch.float16,
                                                                "quantization": "4bit"}
    model.config.quantization_config = model.config.quantization_config.to_dict()  # as read from a config.json
    assert load_settings(model)["dtype"] == torch.float16
    other = copy.deepcopy(vanilla[0])
    other.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ModelLoadError, match=r"quantized \(gptq\).*load_model\(\.\.\., quantization='4bit'\)"):
        load_settings(other)


def test_npo_reference_folder_loads_in_the_trained_models_dtype(vanilla, monkeypatch):
    """A bf16 model's NPO reference="<folder>" loads in bf16 on the model's device (it loaded in fp32, the
    CPU default, before), and the run trains against it as a separate model."""
    from mlunlearn.models import ASSET_DIR

    spy = _LoadSpy()
    monkeypatch.setattr("mlunlearn.models.load_model", spy)
    model, processor = vanilla
    result = unlearn(copy.deepcopy(model).to(torch.bfloat16), "toyworld", 5, "npo",
                     UnlearnConfig(lr=1e-3, max_steps=1, batch_size=2, progress=False), processor=processor,
                     reference=str(ASSET_DIR))
    assert spy.calls == [{"name": str(ASSET_DIR), "device": "cpu", "dtype": torch.bfloat16, "quantization": None}]
    assert spy.loaded[0].dtype == torch.bfloat16
    assert result.run["reference"] == "separate model" and result.run["steps"] == 1


@pytest.mark.parametrize("method,hp", [("npo", {}), ("npo", {"params": "lora+projector"})])
def test_a_4bit_models_npo_reference_is_loaded_in_4bit(vanilla, monkeypatch, method, hp):
    """The reference of a 4-bit model is asked for in 4 bits, with the model's compute dtype and device
    (before: full precision, +13 GiB beside LLaVA-1.5-7B on a T4). Without a GPU the real load_model then
    refuses 4 bits in one line: the same settings reach it."""
    from mlunlearn.models import ASSET_DIR, ModelLoadError

    model, processor = vanilla
    config = UnlearnConfig(lr=1e-3, max_steps=1, batch_size=2, progress=False)
    spy = _LoadSpy(then="stop")
    monkeypatch.setattr("mlunlearn.models.load_model", spy)
    with pytest.raises(_LoadSpy.Stop):
        unlearn(_as_if_4bit(copy.deepcopy(model)), "toyworld", 5, method, config, processor=processor,
                reference=str(ASSET_DIR), **hp)
    assert spy.calls == [{"name": str(ASSET_DIR), "device": "cpu", "dtype": torch.bfloat16, "quantization": "4bit"}]
    monkeypatch.setattr("mlunlearn.models.load_model", spy.real)
    with pytest.raises(ModelLoadError, match="quantization='4bit' needs a CUDA GPU"):
        unlearn(_as_if_4bit(copy.deepcopy(model)), "toyworld", 5, method, config, processor=processor,
                reference=str(ASSET_DIR), **hp)


def test_unlearn_by_name_loads_in_4bit_when_asked(monkeypatch):
    """unlearn("<name>", quantization="4bit") loads the model in 4 bits; a model already loaded cannot be
    re-quantized (one line naming load_model); on the CPU the real load is the one-line GPU error."""
    from mlunlearn.models import ModelLoadError

    spy = _LoadSpy(then="stop")
    monkeypatch.setattr("mlunlearn.models.load_model", spy)
    with pytest.raises(_LoadSpy.Stop):
        unlearn("llava-hf/llava-1.5-7b-hf", "toyworld", 5, "ga", UnlearnConfig(max_steps=1), quantization="4bit")
    assert spy.calls == [{"name": "llava-hf/llava-1.5-7b-hf", "device": None, "dtype": None, "quantization": "4bit"}]
    with pytest.raises(_LoadSpy.Stop):
        unlearn("tiny", "toyworld", 5, "ga", UnlearnConfig(max_steps=1))
    assert spy.calls[-1]["quantization"] is None
    monkeypatch.setattr("mlunlearn.models.load_model", spy.real)
    with pytest.raises(ModelLoadError, match="quantization='4bit' needs a CUDA GPU"):
        unlearn("tiny", "toyworld", 5, "ga", UnlearnConfig(max_steps=1), quantization="4bit")
    with pytest.raises(MethodError, match=r"a loaded model keeps how it was loaded: load it with load_model\("):
        unlearn(torch.nn.Linear(1, 1), "toyworld", 5, "ga", quantization="4bit", processor=object())


# -- the package source, named once -------------------------------------------------------------------------


def test_every_chapter_installs_from_the_pyproject_repository():
    """pyproject.toml's [project.urls] Repository is where the package installs from: install_command()
    builds the pip line from it, and every chapter's Colab cell and the book's _config.yml must name it."""
    import json
    import re
    import tomllib
    from pathlib import Path

    from mlunlearn.utils import install_command, install_requirement, package_source

    root = Path(__file__).resolve().parent.parent
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert package_source() == url
    assert install_requirement() == f"mlunlearn[analysis,gpu] @ git+{url}"
    assert install_command("gpu") == f'pip install -q "mlunlearn[gpu] @ git+{url}"'
    wrong = {}
    chapters = sorted((root / "book").glob("*.ipynb"))
    assert len(chapters) >= 9
    for chapter in chapters:
        cells = json.loads(chapter.read_text())["cells"]
        sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        installs = [source for source in sources if "pip install" in source]
        assert len(installs) == 1, f"{chapter.name}: {len(installs)} install cells"
        packages = re.findall(r'PACKAGE = "([^"]+)"', installs[0])
        if packages != [install_requirement()]:
            wrong[chapter.name] = packages or installs[0]
    assert not wrong, f"chapters whose Colab cell does not install {install_requirement()!r}: {wrong}"
    config = (root / "_config.yml").read_text()
    assert re.search(rf"^\s*url:\s*{re.escape(url)}\s*$", config, re.M), "_config.yml's repository url differs"


def test_package_source_reads_the_installed_metadata_first(monkeypatch):
    """An installed package (a wheel on Colab, no pyproject.toml beside it) answers from its metadata's
    Project-URL; the pyproject.toml of a checkout is only the fallback for metadata without the entry."""
    from importlib import metadata
    from pathlib import Path

    from mlunlearn.utils import install_command, package_source

    class Dist:
        def __init__(self, urls):
            self.metadata = type("M", (), {"get_all": lambda _, key: urls if key == "Project-URL" else None})()

    urls = ["Documentation, https://docs.example.org", "Repository, https://git.example.org/me/mlunlearn"]
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(urls))
    assert package_source() == "https://git.example.org/me/mlunlearn"
    assert install_command("gpu") == 'pip install -q "mlunlearn[gpu] @ git+https://git.example.org/me/mlunlearn"'
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(None))  # an install older than the entry
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert package_source() == pyproject["project"]["urls"]["Repository"]  # this checkout's pyproject.toml
