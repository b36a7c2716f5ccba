"""What trains: a method's *parametrisation* of the model (book chapter 2).

A method is two things: which tensors of the LLaVA may change, and how (this module), and the loss that
changes them (its ``loss``). A parametrisation

- ``apply(model)``: freezes everything, then unfreezes or adds what trains (LoRA adapters through peft,
  the projector, sine deltas, masks, external modules) and returns the model to train;
- ``trainable_state(model)`` / ``load_trainable_state(model, state)``: every tensor that trains, by
  name, and its strict reload — the one format of checkpoints, unmerged run folders and
  ``load_model(run_dir)``, so no trained tensor is lost (peft alone saves only ``lora_*``);
- ``merge(model)``: the trained model as a plain ``LlavaForConditionalGeneration`` (LoRA folded into the
  weights, sine terms folded into the projector), where that is possible (not for 4-bit weights);
- ``reference(model)``: the frozen starting model's outputs, as a view of the trained one
  (:class:`mlunlearn.methods.base.Reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# The language model's linear layers (LLaMA / Vicuna names): MLLMU-Bench's LoRA targets.
LLM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PARAM_CHOICES = ("lora", "lora+projector", "projector", "llm", "all")
STATE_FILE = "trainable.safetensors"


class TrainableStateError(ValueError):
    """A saved trainable state does not fit the model it is loaded into (another method or settings)."""


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def llava_parts(model):
    """The inner ``LlavaModel`` (vision tower, projector, language model) of a (peft-wrapped) LLaVA."""
    return _base(model).model


class Parametrisation:
    """Base class. Subclasses implement :meth:`apply`; the rest has defaults that fit most of them."""

    name = "parametrisation"

    def apply(self, model):
        raise NotImplementedError

    def trainable_state(self, model) -> dict:
        """``{name: tensor}`` of every parameter that trains (names as ``model.named_parameters()`` gives
        them, peft prefixes included: the same parametrisation applied to the same base gives the same names)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model, state: dict, source: str = "the saved state") -> None:
        """Copy ``state`` into the trainable parameters; every trainable tensor must be there, nothing else."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise TrainableStateError(
                f"{source} does not fit this method: {len(missing)} trained tensors missing"
                + (f" (e.g. {missing[0]})" if missing else "") + f", {len(unexpected)} unexpected"
                + (f" (e.g. {unexpected[0]})" if unexpected else "")
                + "; it was written by another method or other settings: use the same method and settings, "
                  "or start over (overwrite)")
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise TrainableStateError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model "
                                          f"{tuple(p.shape)}; it was written with other settings (e.g. lora_r) or "
                                          "for another base model (another hidden size): load it on the base "
                                          "it was trained on, with the same settings")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(device=p.device, dtype=p.dtype))

    def can_merge(self, model) -> bool:
        return not getattr(_base(model), "is_loaded_in_4bit", False)

    def merge(self, model):
        """A plain LLaVA with the trained tensors folded in (LoRA merged); the model itself otherwise."""
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def reference(self, model, separate=None):
        from .base import Reference

        return Reference(model, separate)


@dataclass
class Standard(Parametrisation):
    """``params`` names what trains: ``lora`` (adapters on the LLM's linear layers, MLLMU-Bench's
    setting), ``lora+projector`` (SafeEraser's), ``projector``, ``llm`` (all LLM weights) or ``all``."""

    params: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05

    @property
    def name(self) -> str:
        return self.params

    def apply(self, model):
        model.requires_grad_(False)
        if "lora" in self.params:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                target_modules=LLM_LINEAR, bias="none")
            model = get_peft_model(model, config)
        inner = llava_parts(model)
        if "projector" in self.params or self.params == "all":
            inner.multi_modal_projector.requires_grad_(True)
            train_in_fp32(inner.multi_modal_projector)
        if self.params in ("llm", "all"):
            inner.language_model.requires_grad_(True)
            _base(model).lm_head.requires_grad_(True)
        if self.params == "all":
            inner.vision_tower.requires_grad_(True)
        return model


def _inputs_to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def train_in_fp32(module) -> None:
    """Make a module of a half-precision (bf16/fp16, or 4-bit) model train in fp32, as LoRA adapters do:
    its parameters become fp32 (the Trainer's fp16 GradScaler refuses fp16 gradients, and small bf16 Adam
    steps round away) and its input is cast to fp32. LLaVA casts the projector's output to the embeddings'
    dtype. In an fp32 model nothing changes (no copy, no hook)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return
    module.float()
    module.register_forward_pre_hook(_inputs_to_fp32)


def save_trainable_state(parametrisation: Parametrisation, model, folder: Path) -> Path:
    """Write ``folder/trainable.safetensors`` (every trainable tensor, CPU, contiguous)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().to("cpu").contiguous() for n, t in parametrisation.trainable_state(model).items()}
    path = folder / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


def load_trainable_state(parametrisation: Parametrisation, model, folder: Path) -> None:
    """Read ``folder/trainable.safetensors`` into ``model`` (strict: see :meth:`Parametrisation.load_trainable_state`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise TrainableStateError(f"{path} is missing; the folder was not written by `mlunlearn unlearn` "
                                  "(or the write was interrupted): start over with overwrite")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TrainableStateError(f"{path} is not a readable safetensors file ({exc}); start over with "
                                  "overwrite") from None
    parametrisation.load_trainable_state(model, state, source=str(path))
