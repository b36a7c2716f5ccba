"""Gradient difference (GradDiff): ascend on the forget set, descend on the retain set.

    L = −w_f · NLL(D_f) + w_r · NLL(D_r)

MLLMU-Bench alternates a full ascent pass and a full descent pass per epoch; like CLEAR and
open-unlearning we add both terms at every step on a paired batch (w_f = w_r = 1), which is smoother and
needs no pass ordering.
"""

from dataclasses import dataclass

from .base import Method
from .registry import register
from .terms import nll


@register
@dataclass
class GradDiff(Method):
    name = "graddiff"
    summary = "gradient difference: L = -NLL(forget) + NLL(retain)"
    defaults = {"tiny": {"lr": 1e-3}}  # chapter 2's tuned rate
    pd_weight = 0.5  # SafeEraser: GD+PD = -NLL_f + 0.5 NLL_r + 0.5 PD (its retain weight: retain_weight=0.5)

    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def loss(self, model, batch, reference):
        forget_nll = nll(model, batch, "forget").mean()
        retain_nll = nll(model, batch, "retain").mean()
        return {"forget_nll": forget_nll, "retain_nll": retain_nll,
                "loss": -self.forget_weight * forget_nll + self.retain_weight * retain_nll}
