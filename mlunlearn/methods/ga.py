"""Gradient ascent (GA): push the forget answers' likelihood down, and nothing else.

    L = −NLL(D_f)

The simplest unlearning objective and the one every paper beats: it has no term that holds the rest of
the model in place, so it forgets everyone at once (book chapter 2).
"""

from dataclasses import dataclass

from .base import Method
from .registry import register
from .terms import nll


@register
@dataclass
class GA(Method):
    name = "ga"
    summary = "gradient ascent on the forget answers: L = -NLL(forget)"
    defaults = {"tiny": {"lr": 1e-3}}  # chapter 2: no rate forgets without destroying the rest
    pd_weight = 0.5  # SafeEraser: GA+PD = -NLL_f + 0.5 PD

    def loss(self, model, batch, reference):
        forget_nll = nll(model, batch, "forget").mean()
        return {"forget_nll": forget_nll, "loss": -forget_nll}
