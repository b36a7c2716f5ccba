"""Refusal preference optimisation (PO, "IdkPO"): teach "I don't know" on forget questions, keep retain.

    L = w_f · NLL(refusal | forget question) + w_r · NLL(D_r)

The refusal is drawn, per forget question, from :data:`mlunlearn.data.refusals.REFUSALS`. Unlike ascent it
has a floor (a refusal can only become certain), so it is stable; its risk is the opposite one: refusing
harmless questions too (benign refusal rate, book chapters 2 and 4).
"""

from dataclasses import dataclass

from .base import Method
from .registry import register
from .terms import nll


@register
@dataclass
class PO(Method):
    name = "po"
    summary = "refusal PO: L = NLL(\"I don't know\" | forget question) + NLL(retain)"
    needs_refusals = True
    defaults = {"tiny": {"lr": 3e-3}}  # chapter 2's tuned rate

    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def loss(self, model, batch, reference):
        refusal_nll = nll(model, batch, "forget_refusal").mean()
        retain_nll = nll(model, batch, "retain").mean()
        return {"refusal_nll": refusal_nll, "retain_nll": retain_nll,
                "loss": self.forget_weight * refusal_nll + self.retain_weight * retain_nll}
