"""Negative preference optimisation (NPO): gradient ascent that slows down once an answer is unlikely.

    L = −(2/β) · E_f[ log σ( β · (NLL_θ − NLL_ref) ) ]  (+ w_r · NLL(D_r), off by default as in MLLMU-Bench)

Its gradient is GA's weighted by σ(−β·(NLL_θ − NLL_ref))·2: near 1 at the start, → 0 as the answer's
likelihood falls below the reference's; as β → 0 it is exactly GA's. NLL is the mean over answer tokens
(MLLMU-Bench's β = 0.4 was set for that scale). The reference is the frozen starting model
(``reference="vanilla"``, no second copy of the weights) or a model folder given as
``reference="<folder>"``, e.g. a retain-only "oracle" as in MLLMU-Bench.
"""

from dataclasses import dataclass

import torch

from .base import Method, MethodError
from .registry import register
from .terms import nll


def npo_loss(nll_model, nll_ref, beta: float) -> torch.Tensor:
    """−(2/β)·mean log σ(β·(nll − nll_ref)), shape ``()``."""
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(beta * (nll_model - nll_ref)).mean()


@register
@dataclass
class NPO(Method):
    name = "npo"
    summary = "negative preference optimisation: GA that saturates, L = -(2/b) log sigmoid(b (NLL - NLL_ref))"
    needs_reference = True
    defaults = {"tiny": {"lr": 1e-3}}  # chapter 2: like GA, no rate with a window

    beta: float = 0.4
    reference: str = "vanilla"
    retain_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise MethodError(f"beta={self.beta} must be > 0 (NPO tends to GA as beta -> 0)")
        if self.retain_weight < 0:
            raise MethodError(f"retain_weight={self.retain_weight} must be >= 0")

    def loss(self, model, batch, reference):
        nll_model = nll(model, batch, "forget")
        terms = {"forget_nll": nll_model.mean(),
                 "npo": npo_loss(nll_model, reference.nll(batch["forget"]), self.beta)}
        terms["loss"] = terms["npo"]
        if self.retain_weight:
            terms["retain_nll"] = nll(model, batch, "retain").mean()
            terms["loss"] = terms["loss"] + self.retain_weight * terms["retain_nll"]
        return terms
