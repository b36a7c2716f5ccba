"""One entry point for every model the book uses: ``load_model("tiny")`` or a LLaVA-1.5 checkpoint.

A chapter switches from the tiny model to LLaVA-1.5-7B by changing one string::

    model, processor = load_model("tiny")                        # CPU, seconds
    model, processor = load_model("llava-hf/llava-1.5-7b-hf")    # GPU; bf16 (fp16 on a T4)
    model, processor = load_model("llava-hf/llava-1.5-7b-hf", quantization="4bit")  # 16 GB cards

Weights load from safetensors; remote code is never trusted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from mlunlearn.utils import default_device, default_dtype, process_device

TINY = "tiny"
TINY_SAFETY = "tiny-safety"  # the tiny model that complies with the safety world (models/safety.py)

# Published checkpoints by a short name: where the weights are, and where the processor is.
# MLLMU-Bench's vanilla model: LLaVA-1.5-7B fine-tuned on the benchmark's 500 fictitious people (ft_Data;
# LoRA r16 on the LLM, lr 2e-5, 5 epochs, merged), named in the MLLMU-Bench README as "MLLMMU/LLaVA_Vanilla".
# The official eval.py loads its weights with LlavaForConditionalGeneration.from_pretrained and takes the
# processor from llava-hf/llava-1.5-7b-hf, so we do the same. It is what chapters 2-4 and 10 unlearn on a GPU.
PRESETS = {
    "mllmu-vanilla-7b": {"weights": "MLLMMU/LLaVA_Vanilla", "processor": "llava-hf/llava-1.5-7b-hf"},
}


class ModelLoadError(ValueError):
    """A model that cannot be loaded as asked; the message names the problem and the fix."""


def _read_json(file: Path, fix: str) -> object:
    """Parse a JSON file of a model folder, or fail in one line naming the file, the place and ``fix``."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{file} is not valid JSON (not UTF-8 text); fix: {fix}") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}; "
                             f"truncated?); fix: {fix}") from None


def _check_llava(folder: Path) -> None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a folder written by save_pretrained, "
                             "a Hugging Face id like llava-hf/llava-1.5-7b-hf, or 'tiny'")
    config = _read_json(cfg, "restore the file, or save the model again with save_pretrained")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg} holds a JSON {type(config).__name__}, not a model configuration object; "
                             "fix: restore the file, or save the model again with save_pretrained")
    model_type = config.get("model_type")
    if model_type != "llava":
        raise ModelLoadError(f"{folder} holds a '{model_type}' model, not LLaVA; mlunlearn needs a "
                             "LlavaForConditionalGeneration checkpoint (e.g. llava-hf/llava-1.5-7b-hf)")


_RESAVE = "copy or download the weights again, or save the model again with save_pretrained"


def _check_weights(folder: Path) -> None:
    """The folder's safetensors weights exist and their headers read, before anything is loaded.

    One ``model.safetensors``, or the shards listed in ``model.safetensors.index.json``. Only the header of
    each file is read (cheap); a missing, truncated or random-bytes file fails here in one line.
    """
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index, _RESAVE)
        shards = sorted(set(weight_map.get("weight_map", {}).values())) if isinstance(weight_map, dict) else []
        if not shards:
            raise ModelLoadError(f"{index} lists no weight files; fix: {_RESAVE}")
        files = [folder / shard for shard in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder} is missing {len(missing)} of its {len(files)} weight shards "
                                 f"({', '.join(missing[:3])}); fix: {_RESAVE}")
    elif any(folder.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{folder} holds only PyTorch .bin weights and mlunlearn loads safetensors only "
                             "(no pickle); fix: load it once with transformers and save_pretrained it "
                             "(safetensors is the default)")
    else:
        raise ModelLoadError(f"{folder} has a config.json but its weights are missing (no model.safetensors); "
                             f"fix: {_RESAVE}")
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"{file} is not a readable safetensors file ({reason}): the copy is corrupt "
                                 f"or truncated; fix: {_RESAVE}") from None


def check_device(device: str) -> str:
    """``device`` if torch knows it and this machine has it, else :class:`ModelLoadError` (one line).

    Called by :func:`load_model`, so ``mlunlearn eval``, ``mlunlearn unlearn`` and the chapters all fail
    before any weights are read, rather than deep inside ``model.to(device)``.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; fix: use cpu, cuda, cuda:<N> or mps, "
                             "or leave the device out to pick the best one") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available ({built}); "
                                 "fix: use the cpu (--device cpu), or leave the device out")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} asked for, but this machine has "
                                 f"{torch.cuda.device_count()} GPU(s) (cuda:0..); fix: pick one of them")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but MPS (Apple silicon) is not available; "
                                 "fix: use the cpu (--device cpu), or leave the device out")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ModelLoadError(f"device {device!r} is not available on this machine; fix: use cpu, cuda or "
                                 "mps, or leave the device out")
    return device


# What 4-bit loading keeps in full precision (names as LlavaForConditionalGeneration.named_modules() gives
# them; transformers skips a module whose name starts with one, up to a dot). The vision tower: LLaVA's
# recipes keep it in full precision. The projector: SineProject copies its weights and params="projector" /
# "lora+projector" train them, neither possible on packed uint8 weights. lm_head: transformers keeps it
# unquantized by default only when no skip list is given.
FULL_PRECISION_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


def quantization_kwargs(quantization: str | None, dtype: torch.dtype, device: str) -> dict:
    """The ``from_pretrained`` arguments for ``quantization`` (None: none; ``"4bit"``: NF4 weights computing
    in ``dtype``, :data:`FULL_PRECISION_MODULES` left in ``dtype``, everything on ``device``). Builds the
    ``BitsAndBytesConfig`` only: neither a GPU nor bitsandbytes is needed to call it."""
    if quantization is None:
        return {}
    if quantization != "4bit":
        raise ModelLoadError(f"unknown quantization {quantization!r}; use None or '4bit'")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                llm_int8_skip_modules=list(FULL_PRECISION_MODULES))
    return {"quantization_config": config, "device_map": {"": device}}


def load_model(name: str = TINY, device: str | None = None, dtype: torch.dtype | None = None,
               quantization: str | None = None, attn_implementation: str | None = None):
    """Load ``(model, processor)`` in eval mode.

    ``name``: ``"tiny"`` (the vanilla tiny model shipped with the package), ``"tiny-safety"`` (the tiny
    model that complies with the safety world's harmful requests), ``"mllmu-vanilla-7b"`` (MLLMU-Bench's
    published vanilla LLaVA-1.5-7B, :data:`PRESETS`), a local folder, or a Hugging Face id.
    ``device``/``dtype`` default to the machine's best (:func:`mlunlearn.utils.default_device`). Under a
    distributed launch (``accelerate launch``, ``torchrun``) ``cuda`` means this process's GPU,
    ``cuda:<LOCAL_RANK>`` (:func:`mlunlearn.utils.process_device`).
    ``quantization="4bit"`` loads NF4 weights with bitsandbytes (GPU only; for 16 GB cards); the vision
    tower, projector and LM head stay in ``dtype`` (:func:`quantization_kwargs`).
    ``attn_implementation="eager"`` is needed to read attention maps.
    """
    device = check_device(process_device(device)) if device else default_device()
    dtype = dtype or default_dtype(device)
    local = None  # the folder to check before loading, when the model is on disk
    if name == TINY:
        from .vanilla import ASSET_DIR

        if not (ASSET_DIR / "model.safetensors").is_file():
            raise ModelLoadError(f"the tiny vanilla weights are missing from {ASSET_DIR}; reinstall the package "
                                 "or rebuild them with mlunlearn.models.load_vanilla(train_if_missing=True)")
        source, local = str(ASSET_DIR), ASSET_DIR
    elif name == TINY_SAFETY:
        from .safety import ASSET_DIR as SAFETY_DIR

        if not (SAFETY_DIR / "model.safetensors").is_file():
            raise ModelLoadError(f"the tiny-safety weights are missing from {SAFETY_DIR}; reinstall the package or "
                                 "rebuild them with mlunlearn.models.train_safety_vanilla(out_dir=SAFETY_DIR)")
        source, local = str(SAFETY_DIR), SAFETY_DIR
    elif name in PRESETS:
        source = PRESETS[name]["weights"]
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local:
            if not path.is_dir():
                raise ModelLoadError(f"no model folder at {path}; pass 'tiny', a Hugging Face id, or a folder "
                                     "written by save_pretrained")
            if (path / "run.json").is_file():  # an `mlunlearn unlearn` output folder
                return _load_run(path, device, dtype, quantization, attn_implementation)
            _check_not_a_partial_run(path)
            local = path
        source = str(path) if looks_local else name
    processor_source, weights_files = source, True  # True: safetensors only
    if name in PRESETS and local is None:
        processor_source = PRESETS[name]["processor"]
        # a published upload may hold only pytorch_model.bin: transformers then reads it with
        # torch.load(weights_only=True), which unpickles tensors only (no code)
        weights_files = None
    if local is not None:
        _check_llava(local)
        _check_weights(local)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "4bit":
        if not str(device).startswith("cuda"):
            raise ModelLoadError(f"quantization='4bit' needs a CUDA GPU (bitsandbytes), and the device is "
                                 f"{device!r}; fix: drop --quantization on the CPU, or run on a GPU")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("quantization='4bit' needs bitsandbytes; fix: pip install 'mlunlearn[gpu]'")
    kwargs.update(quantization_kwargs(quantization, dtype, device))
    try:  # the config first: a bad id or folder fails in one line, before any weights are fetched
        LlavaConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot load {name!r} ({str(exc).splitlines()[0][:120]}); check the id or "
                             "folder, and the network (HF_HUB_OFFLINE=1 allows only cached models)") from None
    try:  # the processor before the weights: a bad tokenizer file should not cost a 14 GB load
        processor = AutoProcessor.from_pretrained(processor_source)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # tokenizer/processor files missing or corrupt
        raise ModelLoadError(f"cannot load the processor (tokenizer and image processor) of {name!r} "
                             f"({_first_line(exc)}); fix: save the processor beside the model with "
                             "processor.save_pretrained(folder), or restore its files") from None
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # why: a loading bar on stderr would differ run to run in notebooks
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, use_safetensors=weights_files, **kwargs)
    except (SafetensorError, OSError) as exc:  # a hub download that is corrupt, or weights not found
        raise ModelLoadError(f"cannot load the weights of {name!r} ({_first_line(exc)}); fix: {_RESAVE}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if quantization is None:
        model = model.to(device)
    return model.eval(), processor


def load_settings(model) -> dict:
    """How ``model`` was loaded, as :func:`load_model` arguments: ``{"device", "dtype", "quantization"}``.

    For a second model that must sit beside it on the same terms (NPO's ``reference="<folder>"``): a 4-bit
    model's reference in 4 bits on the same GPU, not in full precision (+13 GiB for LLaVA-1.5-7B). A 4-bit
    model's ``dtype`` is its compute dtype (the one its unquantized parts are in). Another quantization
    (8-bit, GPTQ, ...) is a :class:`ModelLoadError`: load_model cannot reproduce it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = str(next(base.parameters()).device)
    config = getattr(base.config, "quantization_config", None)
    if getattr(base, "is_loaded_in_4bit", False):
        dtype = getattr(config, "bnb_4bit_compute_dtype", None)
        if isinstance(config, dict):
            dtype = config.get("bnb_4bit_compute_dtype")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return {"device": device, "dtype": dtype or torch.float32, "quantization": "4bit"}
    if config is not None:
        kind = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", config)
        raise ModelLoadError(f"the model is quantized ({kind}) in a way load_model cannot repeat for a second "
                             "model; fix: load it with load_model(..., quantization='4bit') or unquantized")
    return {"device": device, "dtype": base.dtype, "quantization": None}


def _first_line(exc: BaseException, width: int = 120) -> str:
    """The first line of an exception's message, cut at a sentence end when it is longer than ``width``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) > width:
        cut = text[:width]
        end = cut.rfind(". ")
        text = cut[: end + 1] if end > width // 3 else cut.rstrip() + "…"
    return text


def _load_run(path: Path, device, dtype, quantization, attn_implementation):
    """The model an unlearning run saved: ``model/`` as is, or its base model with the run's method applied
    and ``trainable.safetensors`` loaded into it (strictly), then merged unless the weights are 4-bit."""
    if (path / "model" / "config.json").is_file():
        return load_model(str(path / "model"), device, dtype, quantization, attn_implementation)
    try:
        run = json.loads((path / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/run.json is unreadable ({exc.__class__.__name__}); was the run "
                             "interrupted? Re-run it with --overwrite") from None
    from mlunlearn.methods.params import STATE_FILE

    needed = ("model", "method", "hyperparameters") if (path / STATE_FILE).is_file() else ("model",)
    lacking = [key for key in needed if not isinstance(run, dict) or key not in run]
    if lacking:  # why: run.json names the base and the method the saved tensors belong to; without them: a KeyError
        raise ModelLoadError(f"{path}/run.json is not a run record of `mlunlearn unlearn` (no "
                             f"{', '.join(repr(k) for k in lacking)}); fix: restore it, or re-run the run with "
                             "--overwrite")
    base = str(run["model"])
    if (base.startswith((".", "/", "~")) or base.count("/") > 1) and not Path(base).expanduser().is_dir():
        # why say so: the bare "no model folder at <base>" would not tell that the run folder itself is fine
        shipped = " (the shipped tiny model: \"tiny\")" if Path(base).name == "tiny-vanilla" else ""
        raise ModelLoadError(f"the run in {path} was trained on the base model {base}, which is not there any "
                             "more (the run holds only what trained, not the base); fix: restore that folder, or "
                             f"set \"model\" in {path}/run.json to where the base is now{shipped}")

    if quantization is None and run.get("quantization") == "4bit":
        # trained against a 4-bit base: its adapters belong with that base. On a GPU reload it so; elsewhere
        # (bitsandbytes 4-bit needs CUDA here) the full-precision base is the closest, and we say so
        if str(device).startswith("cuda"):
            quantization = "4bit"
        else:
            warnings.warn(f"{path} was trained on a 4-bit base; loading it at full precision on {device} (the "
                          "adapters were trained against the quantized weights: scores can differ slightly)",
                          stacklevel=3)
    if (path / STATE_FILE).is_file():
        from mlunlearn.methods import MethodError, get_method
        from mlunlearn.methods.params import load_trainable_state

        model, processor = load_model(run["model"], device, dtype, quantization, attn_implementation)
        try:
            parametrisation = get_method(run["method"], **run["hyperparameters"]).parametrisation()
            model = parametrisation.apply(model)
            load_trainable_state(parametrisation, model, path)
        except (MethodError, ValueError) as exc:
            raise ModelLoadError(f"cannot rebuild the run in {path}: {exc}") from None
        if quantization is None and parametrisation.can_merge(model):
            model = parametrisation.merge(model)
        model.requires_grad_(False)
        return model.eval(), processor
    if (path / "adapter" / "adapter_config.json").is_file():  # runs saved by mlunlearn 0.1.0
        from peft import PeftModel

        model, processor = load_model(run["model"], device, dtype, quantization, attn_implementation)
        model = PeftModel.from_pretrained(model, str(path / "adapter"))
        if quantization is None:
            model = model.merge_and_unload()
        return model.eval(), processor
    raise ModelLoadError(f"{path} has a run.json but neither model/ nor {STATE_FILE}; was the run interrupted? "
                         "Re-run it with --overwrite")


def _check_not_a_partial_run(path: Path) -> None:
    """A folder without run.json that holds a run's parts (``trainable.safetensors``, or ``model/``) is a
    partial or moved run, not a model folder: say that, instead of "has no config.json"."""
    from mlunlearn.methods.params import STATE_FILE

    if (path / "config.json").is_file():
        return
    if (path / "model" / "config.json").is_file():
        raise ModelLoadError(f"{path} holds a merged run's model/ but no run.json; fix: pass {path / 'model'} "
                             "(the merged model), or restore run.json")
    if (path / STATE_FILE).is_file():
        raise ModelLoadError(f"{path} holds {STATE_FILE} but no run.json, which names the base model and the "
                             "method it belongs to; fix: restore run.json, or re-run the run with --overwrite")


def parameter_counts(model) -> dict:
    """Parameters per part of a LLaVA model: vision tower, projector, language model (with its head)."""
    inner = model.model
    parts = {
        "vision tower": inner.vision_tower,
        "projector": inner.multi_modal_projector,
        "language model": inner.language_model,
    }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["language model"] += sum(p.numel() for p in model.lm_head.parameters()) if not model.config.tie_word_embeddings else 0
    counts["total"] = sum(counts.values())
    return counts
