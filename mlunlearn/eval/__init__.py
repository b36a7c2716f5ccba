"""Evaluation: MLLMU-Bench's protocol, its scoring rules and its result format.

``evaluate`` and ``evaluate_benign`` load on first use (they need torch and the data module); the
prompts, the scoring functions and ``EvalResult`` import without them.
"""

from mlunlearn.eval import prompts
from mlunlearn.eval.results import EvalResult, Record
from mlunlearn.eval.tofu import (
    forget_quality_js,
    forget_quality_ks,
    normalised_probability,
    option_probability,
    truth_ratio,
    truth_ratio_score,
)
from mlunlearn.eval.scoring import (
    REFUSAL_PHRASES,
    answer_matches,
    bleu,
    clean_reply,
    cloze_correct,
    is_refusal,
    letter_correct,
    rouge_scores,
)

__all__ = [
    "evaluate",
    "evaluate_benign",
    "generate_replies",
    "EvalResult",
    "Record",
    "prompts",
    "letter_correct",
    "cloze_correct",
    "rouge_scores",
    "bleu",
    "is_refusal",
    "answer_matches",
    "clean_reply",
    "REFUSAL_PHRASES",
    "truth_ratio",
    "truth_ratio_score",
    "normalised_probability",
    "option_probability",
    "forget_quality_ks",
    "forget_quality_js",
]

_LAZY = ("evaluate", "evaluate_benign", "generate_replies")


def __getattr__(name):
    # Why lazy: importing the protocol pulls in torch and transformers; scoring alone should stay light.
    if name in _LAZY:
        from mlunlearn.eval import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'mlunlearn.eval' has no attribute {name!r}")
