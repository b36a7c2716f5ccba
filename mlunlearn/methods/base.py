"""What every unlearning method is: a parametrisation (what trains), an objective (its loss), and the
add-on terms and hooks the engine applies (book chapter 2).

A method is a dataclass whose fields are its hyper-parameters (``--set key=value`` on the command line).
The engine (:mod:`mlunlearn.engine`) calls, in order:

1. :meth:`Method.parametrisation` — a :class:`~mlunlearn.methods.params.Parametrisation` that freezes
   the model and adds or unfreezes what trains (LoRA via peft, the projector, sine deltas, ...); it also
   saves and reloads the trainable state and merges it back into a plain LLaVA;
2. :meth:`Method.setup` — once, before training, with the model and the forget/retain data (saliency
   masks, retain covariances, attention-guided selections); nothing for the baselines;
3. :meth:`Method.loss` at every step, with a batch ``{"forget", "retain", "forget_refusal", "pd"}`` of
   collated LLaVA batches (answer-token labels) and a :class:`Reference` giving the frozen model's outputs.
   It returns a dict of named loss terms; ``"loss"`` is what is minimised, the rest are logged;
   (:meth:`Method.phases` may instead alternate forget-only and retain-only steps, ``batch["phase"]``);
4. :meth:`Method.addons` — terms the engine adds to every method's loss (Prompt Decouple ``pd``, the
   retain KL ``kl_weight``), so that no method can forget them;
5. :meth:`Method.update_hook` — optionally, a function applied to each optimiser *update* (after the
   optimiser step, so it acts on what Adam does to the weights, not on the gradient), e.g. a null-space
   projection.

``defaults`` gives a method's engine settings per model family (``tiny`` and ``llava-1.5``): used for
every setting the caller leaves unset, and recorded in ``run.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from mlunlearn.collate import answer_nll

from .params import LLM_LINEAR, PARAM_CHOICES, Standard, llava_parts
from .terms import PromptDecouple, RetainKL, with_memo

# Engine settings per model family, for every method; a method's ``defaults`` override them.
# tiny: the rates and epochs the book's chapters tune on the tiny world (chapters 2 and 4);
# llava-1.5: MLLMU-Bench's published LLaVA-1.5-7B settings (AdamW, lr 2e-5, batch 4, 1 epoch).
FAMILY_DEFAULTS = {
    "tiny": {"lr": 1e-3, "epochs": 10.0, "batch_size": 4},
    "llava-1.5": {"lr": 2e-5, "epochs": 1.0, "batch_size": 4},
}


PD_ON = ("on", "safeeraser")  # pd="on": the objective's SafeEraser weight (Method.pd_weight)


class MethodError(ValueError):
    """A method was asked for something it cannot do (unknown method or hyper-parameter, bad value)."""


@dataclass
class Method:
    """Base class: hyper-parameters every method shares.

    ``params`` says what trains (see :class:`~mlunlearn.methods.params.Standard`). ``pd`` weights
    SafeEraser's Prompt Decouple term and ``kl_weight`` a KL to the reference on retain answers (0 = off).
    ``lora_*`` configure the adapters.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False  # the frozen model's outputs are used by the loss
    needs_refusals: ClassVar[bool] = False  # forget questions paired with refusal answers
    defaults: ClassVar[dict] = {}  # {family: {engine setting: value}} over FAMILY_DEFAULTS
    unused: ClassVar[tuple] = ()  # base fields this method does not take (rejected if set)
    # SafeEraser's Prompt Decouple weight for this objective (its code: 0.5 for GA and GD, 1.0 for KL and
    # PO); ``pd="on"`` uses it. Methods SafeEraser does not train (NPO, the book's others) take 1.0.
    pd_weight: ClassVar[float] = 1.0

    params: str = "lora"
    pd: float = 0.0
    kl_weight: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05

    def __post_init__(self):
        if isinstance(self.pd, str):
            if self.pd.strip().lower() not in PD_ON:
                raise MethodError(f"pd={self.pd!r}: give a weight (0 = off) or 'on' for SafeEraser's weight for "
                                  f"{self.name} ({self.safeeraser_pd():g})")
            self.pd = self.safeeraser_pd()
        if self.params not in PARAM_CHOICES:
            raise MethodError(f"params={self.params!r} is not one of {', '.join(PARAM_CHOICES)}")
        for key in ("pd", "kl_weight"):
            if getattr(self, key) < 0:
                raise MethodError(f"{key}={getattr(self, key)} must be >= 0 (it weights an added term; 0 = off)")
        if self.lora_r < 1:
            raise MethodError(f"lora_r={self.lora_r} must be >= 1 (the rank of the LoRA adapters)")
        if self.lora_alpha <= 0:
            raise MethodError(f"lora_alpha={self.lora_alpha} must be > 0 (LoRA's scale is alpha / r)")
        if not 0 <= self.lora_dropout < 1:
            raise MethodError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")

    def safeeraser_pd(self) -> float:
        """The Prompt Decouple weight SafeEraser's code uses with this objective (what ``pd="on"`` sets)."""
        return self.pd_weight

    # -- what trains -------------------------------------------------------------------------------
    def parametrisation(self):
        """What trains and how (:mod:`mlunlearn.methods.params`)."""
        return Standard(self.params, self.lora_r, self.lora_alpha, self.lora_dropout)

    def prepare(self, model):
        """Apply :meth:`parametrisation` to ``model``; returns the model to train."""
        return self.parametrisation().apply(model)

    def setup(self, model, data, processor) -> None:
        """Once before training, with the prepared model and the :class:`UnlearningData`. Nothing by default."""

    def phases(self, forget_batches: int, retain_batches: int) -> list | None:
        """How one epoch's optimiser steps alternate. ``None`` (default): every step sees a forget batch
        and a retain batch, paired. Otherwise a list of ``"forget"`` / ``"retain"``, one per optimiser
        step: that step's batch holds only that stream, with ``batch["phase"]`` saying which
        (:class:`~mlunlearn.data.unlearning.PhasedDataset`). ``forget_batches`` / ``retain_batches``:
        how many optimiser steps one pass over each set takes."""
        return None

    def update_hook(self) -> Callable | None:
        """``None``, or ``f(name, parameter, update) -> update`` applied to every optimiser update."""
        return None

    def gradient_hook(self) -> Callable | None:
        """``None``, or ``f(name, parameter, grad) -> grad`` applied to every gradient after clipping and
        before the optimiser step (what the optimiser's moments see), e.g. a saliency mask."""
        return None

    # -- the objective -----------------------------------------------------------------------------
    def loss(self, model, batch: dict, reference: "Reference") -> dict:
        """Named loss terms; ``terms["loss"]`` is minimised. Implemented by each method."""
        raise NotImplementedError

    def addons(self) -> list:
        """The add-on terms the engine adds after :meth:`loss` (in this order: retain KL, Prompt Decouple)."""
        out = []
        if self.kl_weight > 0:
            out.append(RetainKL(self.kl_weight))
        if self.pd > 0:
            out.append(PromptDecouple(self.pd))
        return out

    def uses_reference(self) -> bool:
        """Whether the loss or an add-on needs the frozen model's outputs."""
        return bool(self.needs_reference) or any(a.needs_reference for a in self.addons())

    def total_loss(self, model, batch: dict, reference: "Reference") -> dict:
        """:meth:`loss` plus the add-on terms: what the engine minimises."""
        batch = with_memo(batch)
        terms = self.loss(model, batch, reference)
        for addon in self.addons():
            terms = addon(model, batch, reference, terms)
        return terms

    # -- description ------------------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> dict:
        """``{name: default}`` of every field the method takes."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in cls.unused}

    @classmethod
    def engine_defaults(cls, family: str) -> dict:
        """The engine settings this method uses on ``family`` unless told otherwise."""
        if family not in FAMILY_DEFAULTS:
            raise MethodError(f"unknown model family {family!r}; known: {', '.join(FAMILY_DEFAULTS)}")
        out = dict(FAMILY_DEFAULTS[family])
        for klass in reversed(cls.__mro__):
            out.update(getattr(klass, "defaults", {}).get(family, {}))
        return out

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.unused}


class Reference:
    """The frozen model's outputs, without a second copy of its weights.

    The trained model itself is run with its starting point restored for the duration of the call:
    LoRA adapters are disabled (peft), and any other trainable tensor (a projector, sine deltas, ...)
    is swapped for a snapshot taken at the start, via ``torch.func.functional_call``. Only the
    trainable non-adapter tensors are copied; everything frozen is shared. A ``separate`` model (e.g.
    a retain-only oracle) is used as is instead.
    """

    def __init__(self, trained, separate=None):
        self.trained, self.separate = trained, separate
        self._peft = separate is None and hasattr(trained, "disable_adapter")
        self._snapshot = {}
        if separate is None:
            self._snapshot = {n: p.detach().clone() for n, p in trained.named_parameters()
                              if p.requires_grad and not (self._peft and ".lora_" in n)}

    @property
    def kind(self) -> str:
        if self.separate is not None:
            return "separate model"
        parts = (["adapters disabled"] if self._peft else []) + (["snapshot of trainable tensors"] if self._snapshot else [])
        return " + ".join(parts) or "the model itself (nothing trains)"

    @torch.no_grad()
    def run(self, fn, batch):
        """``fn(model, batch)`` evaluated with the reference weights (no gradient, no dropout)."""
        if self.separate is not None:
            return fn(self.separate, batch)
        model = _Swapped(self.trained, self._snapshot) if self._snapshot else self.trained
        was_training = self.trained.training
        self.trained.eval()
        try:
            if self._peft:
                with self.trained.disable_adapter():
                    return fn(model, batch)
            return fn(model, batch)
        finally:
            self.trained.train(was_training)

    def nll(self, batch):
        """Per-example answer NLL under the reference, shape ``(B,)``."""
        return self.run(answer_nll, batch)

    def logits(self, batch):
        return self.run(lambda m, b: m(**{k: v for k, v in b.items() if k != "labels"}).logits, batch)

    def extra_parameters(self) -> int:
        """Tensor elements the reference holds beyond the trained model (0 when it shares everything)."""
        if self.separate is not None:
            return sum(p.numel() for p in self.separate.parameters())
        return sum(t.numel() for t in self._snapshot.values())


class _Swapped:
    """Call ``model`` with some parameters replaced (``torch.func.functional_call``)."""

    def __init__(self, model, tensors):
        self.model, self.tensors = model, tensors

    def __call__(self, **inputs):
        return torch.func.functional_call(self.model, self.tensors, args=(), kwargs=inputs, strict=False)

    def __getattr__(self, name):  # answer_loss & co. reach for .model / .lm_head: not supported here
        raise AttributeError(name)


_llava = llava_parts  # the name the analysis module and older code use


def trainable_parameter_names(model) -> list:
    """Names of the parameters that train, with peft's wrapper prefixes removed."""
    return [_plain(n) for n, p in model.named_parameters() if p.requires_grad]


def _plain(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name
