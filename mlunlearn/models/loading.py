"""One entry point for every model the book uses: ``load_model("tiny")`` or a LLaVA-1.5 checkpoint.

A chapter switches from the tiny model to LLaVA-1.5-7B by changing one string::

    model, processor = load_model("tiny")                        # CPU, seconds
    model, processor = load_model("llava-hf/llava-1.5-7b-hf")    # GPU; bf16 (fp16 on a T4)
    model, processor = load_model("llava-hf/llava-1.5-7b-hf", quantization="4bit")  # 16 GB cards

Weights load from safetensors; remote code is never trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from mlunlearn.utils import default_device, default_dtype

TINY = "tiny"


class ModelLoadError(ValueError):
    """A model that cannot be loaded as asked; the message names the problem and the fix."""


def _check_llava(folder: Path) -> None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a folder written by save_pretrained, "
                             "a Hugging Face id like llava-hf/llava-1.5-7b-hf, or 'tiny'")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if model_type != "llava":
        raise ModelLoadError(f"{folder} holds a '{model_type}' model, not LLaVA; mlunlearn needs a "
                             "LlavaForConditionalGeneration checkpoint (e.g. llava-hf/llava-1.5-7b-hf)")


def load_model(name: str = TINY, device: str | None = None, dtype: torch.dtype | None = None,
               quantization: str | None = None, attn_implementation: str | None = None):
    """Load ``(model, processor)`` in eval mode.

    ``name``: ``"tiny"`` (the vanilla tiny model shipped with the package), a local folder, or a Hugging
    Face id. ``device``/``dtype`` default to the machine's best (:func:`mlunlearn.utils.default_device`).
    ``quantization="4bit"`` loads NF4 weights with bitsandbytes (GPU only; for 16 GB cards).
    ``attn_implementation="eager"`` is needed to read attention maps.
    """
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if name == TINY:
        from .vanilla import ASSET_DIR

        if not (ASSET_DIR / "model.safetensors").is_file():
            raise ModelLoadError(f"the tiny vanilla weights are missing from {ASSET_DIR}; reinstall the package "
                                 "or rebuild them with mlunlearn.models.load_vanilla(train_if_missing=True)")
        source = str(ASSET_DIR)
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local:
            if not path.is_dir():
                raise ModelLoadError(f"no model folder at {path}; pass 'tiny', a Hugging Face id, or a folder "
                                     "written by save_pretrained")
            if (path / "run.json").is_file():  # an `mlunlearn unlearn` output folder
                return _load_run(path, device, dtype, quantization, attn_implementation)
            _check_llava(path)
        source = str(path) if looks_local else name
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    elif quantization is not None:
        raise ModelLoadError(f"unknown quantization {quantization!r}; use None or '4bit'")
    try:  # the config first: a bad id or folder fails in one line, before any weights are fetched
        LlavaConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot load {name!r} ({str(exc).splitlines()[0][:120]}); check the id or "
                             "folder, and the network (HF_HUB_OFFLINE=1 allows only cached models)") from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # why: a loading bar on stderr would differ run to run in notebooks
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, use_safetensors=True, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if quantization is None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(source)
    return model.eval(), processor


def _load_run(path: Path, device, dtype, quantization, attn_implementation):
    """The model an unlearning run saved: ``model/`` as is, or its base model with ``adapter/`` applied."""
    if (path / "model" / "config.json").is_file():
        return load_model(str(path / "model"), device, dtype, quantization, attn_implementation)
    if not (path / "adapter" / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path} has a run.json but neither model/ nor adapter/; was the run interrupted?")
    from peft import PeftModel

    base = json.loads((path / "run.json").read_text())["model"]
    model, processor = load_model(base, device, dtype, quantization, attn_implementation)
    model = PeftModel.from_pretrained(model, str(path / "adapter"))
    if quantization is None:
        model = model.merge_and_unload()
    return model.eval(), processor


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
