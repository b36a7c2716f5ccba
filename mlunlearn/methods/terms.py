"""The pieces losses are made of, and the add-on terms the engine adds to any method (book chapter 2).

A step's ``batch`` is ``{"forget", "retain", "forget_refusal", "pd": collated LLaVA batch}``.
:func:`nll` runs the model once per stream and step (so an objective and an add-on that both need the
retain logits share one forward pass, and one dropout draw).

Add-on terms (:class:`PromptDecouple`, :class:`RetainKL`) are added by the engine after the method's own
loss, when their weight is > 0 (``pd=…``, ``kl_weight=…`` on any method): no method can forget them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlunlearn.collate import IGNORE, nll_from_logits

_MEMO = "_logits"  # batch key of the per-step cache of the trained model's logits, per stream


def with_memo(batch: dict) -> dict:
    """A shallow copy of ``batch`` that caches :func:`logits` per stream: one step's loss and add-ons
    share each forward pass (:meth:`Method.total_loss` uses it); the cache dies with the copy."""
    return {**batch, _MEMO: {}}


def logits(model, batch: dict, stream: str) -> torch.Tensor:
    """The trained model's logits ``(B, T, V)`` on ``batch[stream]`` (cached in a :func:`with_memo` batch)."""
    memo = batch.get(_MEMO)
    if memo is not None and stream in memo:
        return memo[stream]
    out = model(**{k: v for k, v in batch[stream].items() if k != "labels"}).logits
    if memo is not None:
        memo[stream] = out
    return out


def nll(model, batch: dict, stream: str) -> torch.Tensor:
    """Per-example mean answer-token NLL of ``batch[stream]``, shape ``(B,)`` (nats per token)."""
    return nll_from_logits(logits(model, batch, stream), batch[stream]["labels"])


def answer_kl(logits_ref, logits_model, labels) -> torch.Tensor:
    """Mean over answer positions of KL(p_ref ‖ p_θ) = Σ_v p_ref·(log p_ref − log p_θ), full vocabulary.

    ``logits*``: ``(B, T, V)``; ``labels``: ``(B, T)`` with -100 off the answer. Position t predicts token t+1.
    """
    keep = labels[:, 1:] != IGNORE
    log_ref = torch.log_softmax(logits_ref[:, :-1][keep].float(), -1)
    log_p = torch.log_softmax(logits_model[:, :-1][keep].float(), -1)
    return torch.nn.functional.kl_div(log_p, log_ref, log_target=True, reduction="batchmean")


@dataclass
class PromptDecouple:
    """SafeEraser's Prompt Decouple term, ``weight · NLL(forget question + another person's image → the
    model's own original answer)``: refuse because of *whose face* it is, not because of the wording."""

    weight: float
    needs_reference = False

    def __call__(self, model, batch, reference, terms: dict) -> dict:
        if "pd" in batch:
            terms["pd_nll"] = nll(model, batch, "pd").mean()
            terms["loss"] = terms["loss"] + self.weight * terms["pd_nll"]
        return terms


@dataclass
class RetainKL:
    """``weight · KL(p_ref ‖ p_θ)`` on the retain answers: keep retain predictions near the reference's."""

    weight: float
    needs_reference = True

    def __call__(self, model, batch, reference, terms: dict) -> dict:
        if "retain" not in batch:  # a forget-only step of a method that alternates (Method.phases)
            return terms
        retain = batch["retain"]
        terms["retain_kl"] = answer_kl(reference.logits(retain), logits(model, batch, "retain"), retain["labels"])
        terms["loss"] = terms["loss"] + self.weight * terms["retain_kl"]
        return terms
