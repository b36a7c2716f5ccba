"""Gradient ascent (GA): push the forget answers' likelihood down, and nothing else.

    L = −NLL(D_f)

The simplest unlearning objective and the one every paper beats: it has no term that holds the rest of
the model in place, so it forgets everyone at once (book chapter 2).
"""

from dataclasses import dataclass

from mlunlearn.collate import answer_nll

from .base import Method
from .registry import register


@register
@dataclass
class GA(Method):
    name = "ga"
    summary = "gradient ascent on the forget answers: L = -NLL(forget)"

    def loss(self, model, batch, reference):
        forget_nll = answer_nll(model, batch["forget"]).mean()
        terms = {"forget_nll": forget_nll, "loss": -forget_nll}
        return self.with_prompt_decouple(model, batch, terms)
