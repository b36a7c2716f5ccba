"""TOFU-style metrics: length-normalised answer probability, truth ratio, forget quality, option probability.

Definitions followed (file by file, so a reader can check them):

- ``locuslab/tofu`` ``aggregate_eval_stat.py`` (``get_model_utility``, ``get_forget_quality``) and
  ``locuslab/open-unlearning`` ``src/evals/metrics/memorization.py`` (``truth_ratio``, ``probability_w_options``);
- CLEAR (``somvy/multimodal_unlearning``) ``mm/eval.py`` (``eval_perturbation_ratio``: per-token losses, the
  truth ratio of one item) and ``mm/calculate_metrics.py`` (``evaluate_forget_quality``, ``compute_model_utility``).

With ``ℓ(a | q)`` the mean negative log-likelihood of answer ``a``'s tokens given prompt ``q`` (nats per token):

- **normalised probability** ``P̄(a | q) = exp(−ℓ(a | q))`` (TOFU's ``Prob.`` on the forget and retain sets);
- **truth ratio** of one item with paraphrased (correct) answer ``ã`` and perturbed (wrong) answers
  ``â_1..â_K``: ``R = mean_k P̄(â_k) / P̄(ã)``. TOFU's and CLEAR's code average the perturbed answers' *losses*
  before exponentiating, ``R = exp(ℓ(ã) − mean_k ℓ(â_k))``, i.e. the **geometric** mean of ``P̄(â_k) / P̄(ã)``
  (the default here, ``mean="geometric"``); the TOFU paper's equation averages the probabilities
  (``mean="arithmetic"``). ``R`` near 0: the model prefers the truth; near 1: it cannot tell.
- **reporting forms** (TOFU's ``Truth Ratio`` columns): on a *forget* set ``mean(min(R, 1/R))`` (best when the
  model cannot tell true from false, 1 = indifferent); on *retain* / real sets ``mean(max(0, 1 − R))`` (best
  when the truth is preferred). open-unlearning calls them ``closer_to_1_better`` and ``true_better``.
- **forget quality** (TOFU): the p-value of the two-sample Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``)
  between the unlearned model's per-item truth ratios on the forget set and those of a model trained without
  the forget set (the retain-only, "gold" model). High p: indistinguishable from never having learned it.
  CLEAR also reports ``1 − JS`` (Jensen–Shannon distance between the two truth-ratio distributions): see
  :func:`forget_quality_js` for the binning (CLEAR's published code does not include that step).
- **option probability** (TOFU's ``Prob.`` on real authors / world facts, CLEAR's on ``real_faces``):
  ``P̄(answer) / (P̄(answer) + Σ_k P̄(option_k))``, the options being the wrong ones.

Everything below :func:`answer_nll` is pure NumPy on per-item numbers, so each formula is tested on hand-made
values (``tests/test_tofu.py``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = [
    "answer_nll",
    "forget_quality_js",
    "forget_quality_ks",
    "normalised_probability",
    "option_probability",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_score",
]


# ------------------------------------------------------------------------------------------ model side

def answer_nll(model, processor, examples: Sequence, *, batch_size: int = 8) -> np.ndarray:
    """Mean token NLL ``ℓ(a | q)`` of each example's answer given its prompt, shape ``(N,)`` (nats per token).

    ``examples`` are :class:`mlunlearn.collate.Example` (prompt ending in ``ASSISTANT:``, answer, optional PIL
    image; image and text-only examples may share a batch). Batched through :func:`mlunlearn.collate.collate`,
    so the tokens scored are exactly the trained ones: the answer and the EOS that ends it (prompt, image and
    padding positions carry the label -100). CLEAR's labels likewise include the chat template's end of turn.
    """
    from mlunlearn.collate import nll_from_logits, teacher_forced_batches

    out = [nll_from_logits(logits, batch["labels"]).double().cpu().numpy()
           for batch, logits in teacher_forced_batches(model, processor, examples, batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


# ------------------------------------------------------------------------------------------ formulas

def normalised_probability(nll) -> np.ndarray:
    """``P̄ = exp(−ℓ)``: the per-token geometric-mean probability of an answer, from its mean token NLL."""
    return np.exp(-np.asarray(nll, dtype=float))


def truth_ratio(paraphrased_nll, perturbed_nll, *, mean: str = "geometric") -> np.ndarray:
    """Per-item truth ratio ``R = mean_k P̄(perturbed_k) / P̄(paraphrased)``, shape ``(N,)``.

    ``paraphrased_nll``: ``(N,)`` mean token NLLs of the correct (paraphrased) answers; ``perturbed_nll``:
    ``(N, K)`` those of the K wrong answers of each item. ``mean="geometric"`` is TOFU's and CLEAR's code,
    ``exp(ℓ(ã) − mean_k ℓ(â_k))``; ``"arithmetic"`` the TOFU paper's ``mean_k exp(−ℓ(â_k)) / exp(−ℓ(ã))``.
    """
    para = np.asarray(paraphrased_nll, dtype=float)
    pert = np.asarray(perturbed_nll, dtype=float)
    if pert.ndim != 2 or para.shape != pert.shape[:1] or pert.shape[1] == 0:
        raise ValueError(f"truth_ratio needs (N,) paraphrased and (N, K>0) perturbed NLLs, got {para.shape} and "
                         f"{pert.shape}")
    if mean == "geometric":
        return np.exp(para - pert.mean(axis=1))
    if mean == "arithmetic":
        return np.exp(-pert).mean(axis=1) / np.exp(-para)
    raise ValueError(f"mean={mean!r}: use 'geometric' (TOFU's code) or 'arithmetic' (TOFU's paper)")


def truth_ratio_score(ratios, kind: str) -> float:
    """TOFU's reported truth ratio: ``kind="forget"``: ``mean(min(R, 1/R))``; ``"retain"``: ``mean(max(0, 1 − R))``.

    Both lie in [0, 1] and are higher-is-better for their set (forget: indifferent between true and false;
    retain: the truth preferred). TOFU applies the retain form to the retain set, real authors and world facts.
    """
    r = np.asarray(ratios, dtype=float)
    if r.size == 0:
        raise ValueError("truth_ratio_score of no items")
    if kind == "forget":
        return float(np.mean(np.minimum(r, 1.0 / r)))
    if kind == "retain":
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    raise ValueError(f"kind={kind!r}: use 'forget' or 'retain'")


def option_probability(answer_nll, option_nll) -> np.ndarray:
    """Per-item ``P̄(answer) / (P̄(answer) + Σ_k P̄(option_k))`` from ``(N,)`` and ``(N, K)`` mean token NLLs.

    1/(K+1) when the model is indifferent among the K+1 choices; TOFU and CLEAR report its mean.
    """
    p = normalised_probability(answer_nll)
    q = normalised_probability(option_nll)
    if q.ndim != 2 or p.shape != q.shape[:1]:
        raise ValueError(f"option_probability needs (N,) and (N, K) NLLs, got {p.shape} and {q.shape}")
    return p / (p + q.sum(axis=1))


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:  # a user-fixable environment problem, said in one line
        from mlunlearn.data import BenchmarkError

        raise BenchmarkError("forget quality needs scipy (scipy.stats.ks_2samp); fix: pip install scipy") from None
    return stats


def forget_quality_ks(unlearned_ratios, reference_ratios) -> dict:
    """TOFU's Forget Quality: the two-sample KS test between two truth-ratio samples.

    Returns ``{"p_value", "statistic"}``; ``p_value`` is the forget quality (1: identical distributions; small:
    the unlearned model is distinguishable from the retain-only reference). The test is invariant to any
    monotone transform of both samples, so it does not matter whether R or 1/R is compared (TOFU compares 1/R).
    """
    a, b = np.asarray(unlearned_ratios, dtype=float), np.asarray(reference_ratios, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality_ks needs two non-empty samples")
    res = _scipy_stats().ks_2samp(a, b)
    return {"p_value": float(res.pvalue), "statistic": float(res.statistic)}


def forget_quality_js(unlearned_ratios, reference_ratios, *, bins: int = 20) -> dict:
    """CLEAR's variant: ``1 − JS`` between the two truth-ratio distributions, in [0, 1] (1: identical histograms).

    Binning (ours; CLEAR's released code reads a precomputed "JS metric" column and does not show it): both
    samples are histogrammed on ``log R`` over ``bins`` equal-width bins spanning the pooled range of the two
    samples. Why ``log R``: a ratio's natural scale is multiplicative (R = 2 and R = 1/2 are equally far from
    indifference), and a linear scale would put almost all mass of a confident model in the first bin. Why the
    pooled range: both histograms must share their bins. The distance is ``scipy.spatial.distance.jensenshannon``
    with base 2, so it lies in [0, 1]. Identical samples give 1; samples with disjoint ranges give 0.
    """
    a = np.log(np.asarray(unlearned_ratios, dtype=float))
    b = np.log(np.asarray(reference_ratios, dtype=float))
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality_js needs two non-empty samples")
    if bins < 1:
        raise ValueError(f"bins={bins}: must be at least 1")
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    if hi == lo:  # every value equal in both samples: one bin, identical distributions
        return {"value": 1.0, "js_distance": 0.0, "bins": 1, "range_log_ratio": [lo, hi]}
    edges = np.linspace(lo, hi, bins + 1)
    p = np.histogram(a, edges)[0] / a.size
    q = np.histogram(b, edges)[0] / b.size
    _scipy_stats()  # the same one-line error if scipy is missing
    from scipy.spatial.distance import jensenshannon

    js = float(jensenshannon(p, q, base=2))
    return {"value": 1.0 - js, "js_distance": js, "bins": bins, "range_log_ratio": [lo, hi]}


@lru_cache(maxsize=1)
def _rouge_l():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reply: str, reference: str) -> float:
    """ROUGE-L recall of a generated reply against the reference (LCS / reference length), Porter stemmer on:
    what TOFU and CLEAR (``eval_rouge_recall``) report for generated answers."""
    from mlunlearn.eval.scoring import clean_reply

    return float(_rouge_l().score(reference, clean_reply(reply))["rougeL"].recall)
