"""What every unlearning method is: a loss over paired forget/retain batches, and the parameters it trains.

A method is a dataclass whose fields are its hyper-parameters (``--set key=value`` on the command line).
The engine (:mod:`mlunlearn.engine`) calls, in order:

1. :meth:`Method.prepare` — choose the trainable parameters (LoRA adapters via peft, the projector, ...)
   and return the model to train;
2. :meth:`Method.install_hooks` — anything that shapes gradients (masks, projections); none for baselines;
3. :meth:`Method.loss` at every step, with a batch ``{"forget", "retain", "forget_refusal", "pd"}`` of
   collated LLaVA batches (answer-token labels) and a :class:`Reference` giving the frozen model's outputs.

It returns a dict of named loss terms; ``"loss"`` is what is minimised, the rest are logged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from mlunlearn.collate import answer_nll

# The language model's linear layers (LLaMA / Vicuna names): MLLMU-Bench's LoRA targets.
LLM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PARAM_CHOICES = ("lora", "lora+projector", "projector", "llm", "all")


class MethodError(ValueError):
    """A method was asked for something it cannot do (unknown method or hyper-parameter, bad value)."""


@dataclass
class Method:
    """Base class: hyper-parameters every method shares.

    ``params`` says what trains: ``lora`` (adapters on the LLM's linear layers, MLLMU-Bench's setting),
    ``lora+projector`` (SafeEraser's), ``projector``, ``llm`` (all LLM weights) or ``all``. ``pd`` weights
    SafeEraser's Prompt Decouple term (0 = off). ``lora_*`` configure the adapters.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False  # the frozen model's outputs are used by the loss
    needs_refusals: ClassVar[bool] = False  # forget questions paired with refusal answers

    params: str = "lora"
    pd: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05

    def __post_init__(self):
        if self.params not in PARAM_CHOICES:
            raise MethodError(f"params={self.params!r} is not one of {', '.join(PARAM_CHOICES)}")
        if self.pd < 0:
            raise MethodError(f"pd={self.pd} must be >= 0 (it weights the Prompt Decouple term)")

    # -- what trains -------------------------------------------------------------------------------
    def prepare(self, model):
        """Freeze everything, then unfreeze (or add) what ``params`` names; returns the model to train."""
        model.requires_grad_(False)
        if "lora" in self.params:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                target_modules=LLM_LINEAR, bias="none")
            model = get_peft_model(model, config)
        inner = _llava(model)
        if "projector" in self.params or self.params == "all":
            inner.multi_modal_projector.requires_grad_(True)
        if self.params in ("llm", "all"):
            inner.language_model.requires_grad_(True)
            _lm_head(model).requires_grad_(True)
        if self.params == "all":
            inner.vision_tower.requires_grad_(True)
        return model

    def finalize(self, model):
        """After training: turn the trained model into a plain LLaVA where the method changed its
        structure (e.g. fold sine-modulated weights back into ``nn.Linear``). Identity by default."""
        return model

    def install_hooks(self, model) -> list:
        """Gradient-shaping hooks (masks, projections); returns their handles. None for the baselines."""
        return []

    # -- the objective -----------------------------------------------------------------------------
    def loss(self, model, batch: dict, reference: "Reference") -> dict:
        """Named loss terms; ``terms["loss"]`` is minimised. Implemented by each method."""
        raise NotImplementedError

    def with_prompt_decouple(self, model, batch: dict, terms: dict) -> dict:
        """Add SafeEraser's Prompt Decouple term, ``pd · NLL(forget question + another person's image →
        the model's own original answer)``: refuse because of *whose face* it is, not because of the wording."""
        if self.pd > 0 and "pd" in batch:
            terms["pd_nll"] = answer_nll(model, batch["pd"]).mean()
            terms["loss"] = terms["loss"] + self.pd * terms["pd_nll"]
        return terms

    # -- description ------------------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> dict:
        """``{name: default}`` of every field."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def settings(self) -> dict:
        return dataclasses.asdict(self)


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


def _llava(model):
    """The inner ``LlavaModel`` (vision tower, projector, language model) of a (peft-wrapped) LLaVA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _lm_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


def trainable_parameter_names(model) -> list:
    """Names of the parameters that train, with peft's wrapper prefixes removed."""
    return [_plain(n) for n, p in model.named_parameters() if p.requires_grad]


def _plain(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name
