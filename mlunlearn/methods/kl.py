"""KL minimisation (KL_Min): GradDiff plus a KL term that keeps retain predictions near the original model.

    L = −NLL(D_f) + w_r · NLL(D_r) + w_kl · KL(p_ref ‖ p_θ)   on retain inputs, full vocabulary

The KL is averaged over the retain *answer* positions (the tokens the model is asked to produce), the
same positions every other loss of the book uses. The reference is the frozen starting model, obtained
without a second copy of its weights (:class:`mlunlearn.methods.base.Reference`).
"""

from dataclasses import dataclass

import torch

from mlunlearn.collate import IGNORE, answer_nll, nll_from_logits

from .base import Method
from .registry import register


def answer_kl(logits_ref, logits, labels) -> torch.Tensor:
    """Mean over answer positions of KL(p_ref ‖ p_θ) over the full vocabulary.

    ``logits*``: ``(B, T, V)``; ``labels``: ``(B, T)`` with -100 off the answer. Position t predicts token t+1.
    """
    keep = labels[:, 1:] != IGNORE
    log_ref = torch.log_softmax(logits_ref[:, :-1][keep].float(), -1)
    log_p = torch.log_softmax(logits[:, :-1][keep].float(), -1)
    return torch.nn.functional.kl_div(log_p, log_ref, log_target=True, reduction="batchmean")


@register
@dataclass
class KL(Method):
    name = "kl"
    summary = "GradDiff + KL(reference || model) on retain answers: L = -NLL(f) + NLL(r) + KL(r)"
    needs_reference = True

    retain_weight: float = 1.0
    kl_weight: float = 1.0

    def loss(self, model, batch, reference):
        retain = batch["retain"]
        forget_nll = answer_nll(model, batch["forget"]).mean()
        logits = model(**{k: v for k, v in retain.items() if k != "labels"}).logits
        retain_nll = nll_from_logits(logits, retain["labels"]).mean()
        kl = answer_kl(reference.logits(retain), logits, retain["labels"])
        terms = {"forget_nll": forget_nll, "retain_nll": retain_nll, "retain_kl": kl,
                 "loss": -forget_nll + self.retain_weight * retain_nll + self.kl_weight * kl}
        return self.with_prompt_decouple(model, batch, terms)

