"""KL minimisation (KL_Min): GradDiff plus a KL term that keeps retain predictions near the original model.

    L = −NLL(D_f) + w_r · NLL(D_r) + w_kl · KL(p_ref ‖ p_θ)   on retain inputs, full vocabulary

The KL is averaged over the retain *answer* positions (the tokens the model is asked to produce), the
same positions every other loss of the book uses. It is the engine's retain-KL add-on
(:class:`mlunlearn.methods.terms.RetainKL`, ``kl_weight``, which any method can switch on), on by default
here. The reference is the frozen starting model, obtained without a second copy of its weights
(:class:`mlunlearn.methods.base.Reference`).
"""

from dataclasses import dataclass

from .graddiff import GradDiff
from .registry import register
from .terms import answer_kl  # noqa: F401  (re-exported: the KL itself lives with the other terms)


@register
@dataclass
class KL(GradDiff):
    name = "kl"
    summary = "GradDiff + KL(reference || model) on retain answers: L = -NLL(f) + NLL(r) + KL(r)"
    unused = ("forget_weight",)
    defaults = {"tiny": {"lr": 1e-3}}  # chapter 2's tuned rate
    pd_weight = 1.0  # SafeEraser: KL+PD = -NLL_f + KL + PD (GradDiff's is 0.5)

    kl_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.kl_weight <= 0:
            from .base import MethodError

            raise MethodError(f"kl_weight={self.kl_weight} must be > 0 for kl (with 0 it is graddiff)")
