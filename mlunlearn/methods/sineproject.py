"""SineProject (Garg, Saratchandran & Lucey, arXiv 2511.18444): unlearn through a sine-modulated projector.

The projector's weights W1, W2 stay frozen; trainable dense ΔW1, ΔW2 enter through a sine:

    G(x) = (W2 + sin(ω·ΔW2)/ω) · gelu((W1 + sin(ω·ΔW1)/ω) · x + b1) + b2       (book chapter 4)

with the biases b1, b2 trainable and not modulated, LoRA on the language model, the vision tower frozen,
and any loss of the engine as the objective (the paper: PO+PD for safety, NPO for MLLMU-Bench).

Choices the paper leaves open, and ours:
- ΔW = 0 at the start (``init="zero"``): sin 0 = 0, so the model starts exactly as the vanilla one, and
  cos 0 = 1, so the first gradient is the plain one;
- a frequency ω, as sin(ω·ΔW)/ω (the paper's formula is ω = 1, our default). Under Adam, W, W0 + ΔW
  and W0 + sin(ΔW) near ΔW = 0 are the same optimisation (Adam normalises away the cos(ΔW) ≈ 1 factor);
  what sin(ω·ΔW)/ω adds is a bound: no weight moves by more than 1/ω from its vanilla value;
- ``additive=True`` trains W0 + ΔW instead (the control: same parameters, no sine).

:func:`merge_sine` folds the trained terms back into plain ``nn.Linear`` weights, so the result loads as an
ordinary LLaVA checkpoint; the engine does it after training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, MethodError
from .params import Standard, llava_parts as _llava
from .registry import METHODS, get_method, register


class SineLinear(nn.Module):
    """``y = x (W + sin(ω·ΔW)/ω)ᵀ + b``: W frozen, ΔW (same shape) and b trainable.

    With ``additive=True``, ``W + ΔW`` (the control). ``effective_weight()`` is the matrix applied, in fp32.

    In a half-precision model (bf16/fp16) W stays in its dtype, but what trains (ΔW, b) is fp32 (the
    Trainer's fp16 GradScaler refuses fp16 gradients; bf16 Adam steps of a small lr would round away), and
    W + sin(ω·ΔW)/ω is summed in fp32 and only then cast to W's dtype for the matmul: added in bf16, most
    of the first small updates to the projector (~87% on the tiny model at lr 1e-5) rounded back to W. In
    fp32 every cast is a no-op, so the computation is exactly ``x (W + sin(ω·ΔW)/ω)ᵀ + b``.
    """

    def __init__(self, linear: nn.Linear, omega: float = 1.0, additive: bool = False, init: str = "zero",
                 init_scale: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.omega, self.additive = float(omega), bool(additive)
        if not linear.weight.is_floating_point():  # e.g. a bitsandbytes 4-bit layer: packed uint8
            raise MethodError(f"the projector's weights are quantized ({linear.weight.dtype}); SineProject needs "
                              "them in full precision: load_model(..., quantization='4bit') keeps the projector "
                              "out of quantization")
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)  # W: frozen
        # b trains: fp32 whatever W's dtype (a no-op copy in fp32)
        self.bias = nn.Parameter(linear.bias.detach().clone().float()) if linear.bias is not None else None
        self.delta = nn.Parameter(torch.zeros_like(self.weight, dtype=torch.float32))  # ΔW
        if init == "normal":  # a small random start; zero is the default (exact vanilla start)
            nn.init.normal_(self.delta, std=init_scale)
        elif init != "zero":
            raise MethodError(f"init={init!r}: use 'zero' or 'normal'")

    def modulation(self) -> torch.Tensor:
        """The added term in fp32: sin(ω·ΔW)/ω, or ΔW when additive."""
        delta = self.delta.float()
        if self.additive:
            return delta
        return torch.sin(self.omega * delta) / self.omega

    def effective_weight(self) -> torch.Tensor:
        """W + sin(ω·ΔW)/ω, summed in fp32 (what the analysis reads and merging folds in)."""
        return self.weight.float() + self.modulation()

    def forward(self, x):
        dtype = self.weight.dtype  # the matmul runs in W's dtype; in fp32 both casts are no-ops
        bias = self.bias.to(dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.effective_weight().to(dtype), bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the effective weight (the merge step)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.effective_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        kind = "additive" if self.additive else f"sine, omega={self.omega:g}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


PROJECTOR_LAYERS = ("linear_1", "linear_2")


def add_sine(model, omega: float = 1.0, additive: bool = False, init: str = "zero", init_scale: float = 0.0) -> dict:
    """Replace the projector's ``linear_1``/``linear_2`` by :class:`SineLinear` in place; returns them."""
    projector = _llava(model).multi_modal_projector
    wrapped = {}
    for name in PROJECTOR_LAYERS:
        layer = getattr(projector, name)
        if isinstance(layer, SineLinear):
            raise MethodError("the projector is already sine-modulated")
        wrapped[name] = SineLinear(layer, omega, additive, init, init_scale)
        setattr(projector, name, wrapped[name])
    return wrapped


def merge_sine(model) -> dict:
    """Fold every :class:`SineLinear` of the projector back into ``nn.Linear``; returns the removed modules."""
    projector = _llava(model).multi_modal_projector
    removed = {}
    for name in PROJECTOR_LAYERS:
        layer = getattr(projector, name)
        if isinstance(layer, SineLinear):
            removed[name] = layer
            setattr(projector, name, layer.to_linear())
    return removed


@dataclass
class SineProjector(Standard):
    """SineProject's parametrisation: LoRA on the LLM (``params="lora"``; ``"projector"`` = none), the
    projector's W1, W2 frozen behind :class:`SineLinear`, their ΔW and biases trainable."""

    omega: float = 1.0
    additive: bool = False
    init: str = "zero"
    init_scale: float = 0.0

    @property
    def name(self) -> str:
        return "sine projector" + (" + lora" if self.params == "lora" else "")

    def apply(self, model):
        model = super().apply(model)  # freezes everything; adds LoRA when params="lora"
        self.modules = add_sine(model, self.omega, self.additive, self.init, self.init_scale)
        return model

    def merge(self, model):
        """Fold sin(ω·ΔW)/ω into the projector's weights, then merge LoRA."""
        merge_sine(model)
        return super().merge(model)


@register
@dataclass
class SineProject(Method):
    name = "sineproject"
    summary = "sine-modulated projector (W + sin(w dW)/w, W frozen) + LoRA, trained with any objective"
    unused = ("params",)  # what trains is fixed: the sine projector, plus LoRA unless lora=false
    defaults = {"tiny": {"lr": 1e-3}}  # chapter 4: the tuned rate of every projector variant (objective po)

    objective: str = "npo"  # any registered baseline: npo, po, ga, graddiff, kl
    omega: float = 1.0
    additive: bool = False  # the control: W + dW, no sine
    init: str = "zero"
    init_scale: float = 0.0  # std of dW when init="normal"
    lora: bool = True  # LoRA on the LLM as well (the paper's setting)
    beta: float | None = None  # passed to the objective (NPO's beta; default: the objective's)
    retain_weight: float | None = None  # passed to the objective (default: the objective's)

    def __post_init__(self):
        if self.params != "lora":
            raise MethodError(f"sineproject takes no params={self.params!r}: it trains the sine projector, "
                              "plus LoRA on the LLM unless lora=false")
        self.params = "lora" if self.lora else "projector"
        super().__post_init__()
        if self.objective == self.name or self.objective not in METHODS:
            raise MethodError(f"objective={self.objective!r}: use one of "
                              f"{', '.join(n for n in sorted(METHODS) if n != self.name)}")
        if self.omega <= 0:
            raise MethodError(f"omega={self.omega} must be > 0 (weights move at most 1/omega)")
        if self.init not in ("zero", "normal"):
            raise MethodError(f"init={self.init!r}: use 'zero' or 'normal'")
        known = METHODS[self.objective].hyperparameters()
        passed = {}
        for key in ("beta", "retain_weight"):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in known:
                raise MethodError(f"{key}={value} is not used by objective={self.objective} "
                                  f"(it takes {', '.join(k for k in known if k not in Method.hyperparameters())})")
            passed[key] = value
        # The add-on terms (pd, kl_weight) are the engine's: they stay on this method, not the objective.
        self._objective = get_method(self.objective, **passed)
        self._parametrisation = None

    def safeeraser_pd(self) -> float:
        """The objective's SafeEraser weight (PO+PD, the paper's safety setting: 1.0)."""
        return METHODS[self.objective].pd_weight if self.objective in METHODS else 1.0

    @property
    def sine_modules(self) -> dict:
        """The :class:`SineLinear` modules of the last model this method prepared (kept after merging)."""
        return getattr(self._parametrisation, "modules", {})

    @property
    def needs_reference(self):
        return self._objective.needs_reference

    @property
    def needs_refusals(self):
        return self._objective.needs_refusals

    def parametrisation(self):
        if self._parametrisation is None:
            self._parametrisation = SineProjector(self.params, self.lora_r, self.lora_alpha, self.lora_dropout,
                                                  self.omega, self.additive, self.init, self.init_scale)
        return self._parametrisation

    def addons(self) -> list:
        return self._objective.addons() + super().addons()

    def loss(self, model, batch, reference):
        return self._objective.loss(model, batch, reference)
