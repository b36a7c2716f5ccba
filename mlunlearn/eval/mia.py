"""Membership inference on the forget set: can an attacker tell the forget people's training answers from
answers the model never saw? (Issue 13, "Does it stay forgotten?")

Each example is one training question-answer pair (image + question → answer, the ``ft_Data`` format the
model was fine-tuned and unlearned on). One teacher-forced forward pass gives the log-probability of every
answer token (prompt and image positions are not scored; the answer's end-of-sequence token is, as in
training), and from them four scores per example:

=============  ==========================================================================  ==============
attack         statistic                                                                   member if
=============  ==========================================================================  ==============
``loss``       mean answer-token NLL, ``−(1/T) Σ_t log p(x_t | x_<t)``                        low
``zlib``       that NLL / ``len(zlib.compress(answer.encode("utf-8")))`` (Carlini et al.)   low
``min_k``      Min-k%: mean of the lowest ``k`` fraction of ``log p(x_t | x_<t)``            high
``min_k_pp``   Min-k%++: the same over ``(log p(x_t|x_<t) − μ_t) / σ_t``, where under the      high
               model's own next-token distribution ``p_t``: ``μ_t = E_{z~p_t}[log p_t(z)]``,
               ``σ_t² = E_{z~p_t}[(log p_t(z) − μ_t)²]`` (Zhang et al. 2024, arXiv 2404.02936)
=============  ==========================================================================  ==============

The lowest ``k`` fraction is ``max(1, int(T·k))`` tokens, ``k = 0.2`` by default. Min-k%++ follows the
paper's formula as open-unlearning implements it (``locuslab/open-unlearning``,
``src/evals/metrics/mia/min_k_plus_plus.py``: μ and σ² from the full-vocabulary log-softmax, σ² clamped at
1e-6); zlib follows the same code base's ``ZLIBAttack`` (NLL over the zlib length of the answer text).

:func:`mia_auc` is the ROC AUC of member vs non-member (scikit-learn), oriented so that 0.5 = the attacker
cannot tell, 1.0 = every member detected, < 0.5 = the forget answers look *less* familiar than answers
never seen (over-unlearning, itself a tell). :func:`privleak` is MUSE's PrivLeak as open-unlearning computes
it: ``((1−AUC) − (1−AUC_ref)) / (1−AUC_ref) × 100`` against a reference AUC (a model retrained without the
forget set; without one, the ideal 0.5): −100 for a model that gives every member away, 0 for the
reference, positive for over-unlearning.

Which non-members. MLLMU-Bench fine-tuned *all* of its 500 fictitious people (and the ``Test_Set`` holds
the same people in other views), so "forget vs held-out" needs people the vanilla model never saw. The
synthetic world draws them with its own generator (:func:`mlunlearn.data.world.heldout_people`: 30 new
faces and names, same biography lists, their own random stream so that no existing person, image or
question changes). Their answers use the same value lists as the members' ("This person works as a
potter."), so each string is familiar to the model: what an attack detects is whether the model knows
*this face* goes with *this answer*. A benchmark folder can bring its own as a ``Holdout_Data`` config in ``ft_Data``'s
columns (e.g. people left out when fine-tuning a LLaVA-1.5 vanilla on MLLMU-Bench). The real hub
MLLMU-Bench has none: :func:`nonmember_examples` returns ``None`` and the bench leaves the MIA columns
empty rather than compare with members (Retain_Set celebrities were in LLaVA's pre-training data; the
retain people were fine-tuned on).
"""

from __future__ import annotations

import math
import zlib

import torch

from mlunlearn.collate import IGNORE, teacher_forced_batches

__all__ = ["ATTACKS", "K", "token_statistics", "min_k", "min_k_plus_plus", "standardised", "zlib_length",
           "example_scores", "mia_auc", "attack_aucs", "privleak", "member_examples", "nonmember_examples",
           "has_nonmembers", "evaluate_mia"]

K = 0.2  # Min-k%'s fraction of tokens (the papers' 20%)
# attack -> +1 when a higher statistic means "member", -1 when a lower one does
ATTACKS = {"loss": -1, "zlib": -1, "min_k": 1, "min_k_pp": 1}


# ------------------------------------------------------------------------------- per-token statistics

def _lowest(values, k: float) -> list:
    values = sorted(float(v) for v in values)
    return values[: max(1, int(len(values) * k))]


def min_k(token_logprobs, k: float = K) -> float:
    """Min-k%: the mean of the lowest ``max(1, int(T·k))`` of an answer's token log-probabilities."""
    if not 0 < k <= 1:
        raise ValueError(f"k={k}: the fraction of tokens must be in (0, 1] (e.g. 0.2 for Min-20%)")
    low = _lowest(token_logprobs, k)
    return sum(low) / len(low)


def standardised(token_logprobs: torch.Tensor, vocab_logprobs: torch.Tensor) -> torch.Tensor:
    """Min-k%++'s per-token score ``(log p_t(x_t) − μ_t) / σ_t``: ``token_logprobs`` ``(T,)``, ``vocab_logprobs``
    ``(T, V)`` the model's log-softmax at each answer position; μ_t and σ_t² are the mean and variance of
    ``log p_t(z)`` for ``z ~ p_t`` (σ_t² clamped at 1e-6, as open-unlearning does, for a certain model)."""
    vocab_logprobs = vocab_logprobs.double()
    p = vocab_logprobs.exp()
    mu = (p * vocab_logprobs).sum(-1)
    var = (p * (vocab_logprobs - mu[:, None]) ** 2).sum(-1).clamp(min=1e-6)
    return (token_logprobs.double() - mu) / var.sqrt()


def min_k_plus_plus(token_logprobs: torch.Tensor, vocab_logprobs: torch.Tensor, k: float = K) -> float:
    """Min-k%++: the mean of the lowest ``k`` fraction of :func:`standardised` token scores."""
    return min_k(standardised(token_logprobs, vocab_logprobs).tolist(), k)


def zlib_length(text: str) -> int:
    """Bytes of ``text`` (UTF-8) after zlib compression (default level): the zlib attack's denominator."""
    return len(zlib.compress(text.encode("utf-8")))


@torch.no_grad()
def token_statistics(model, processor, examples: list, batch_size: int = 16) -> list:
    """One teacher-forced forward pass per batch: for each example, ``(token_logprobs (T,),
    standardised (T,))`` over its answer tokens (answer + end of sequence; prompt and image not scored)."""
    out = []
    for batch, logits in teacher_forced_batches(model, processor, examples, batch_size):
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        for row, lab in zip(logits[:, :-1], labels):
            keep = lab != IGNORE
            vocab = torch.log_softmax(row[keep].float(), -1)
            tokens = vocab.gather(-1, lab[keep].unsqueeze(-1)).squeeze(-1)
            out.append((tokens.double().cpu(), standardised(tokens, vocab).cpu()))
    return out


def example_scores(model, processor, examples: list, k: float = K, batch_size: int = 16) -> list:
    """``[{"loss", "zlib", "min_k", "min_k_pp"}]``, one dict per example (the statistics of the table above)."""
    rows = []
    for ex, (tokens, z) in zip(examples, token_statistics(model, processor, examples, batch_size)):
        nll = -float(tokens.mean())
        rows.append({"loss": nll, "zlib": nll / zlib_length(ex.answer), "min_k": min_k(tokens.tolist(), k),
                     "min_k_pp": min_k(z.tolist(), k)})
    return rows


# ----------------------------------------------------------------------------------------------- AUC

def mia_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of membership scores (higher = "member"): 0.5 cannot tell, 1.0 all members detected."""
    from sklearn.metrics import roc_auc_score

    member_scores, nonmember_scores = list(member_scores), list(nonmember_scores)
    if not member_scores or not nonmember_scores:
        raise ValueError(f"an AUC needs members and non-members; got {len(member_scores)} and "
                         f"{len(nonmember_scores)}")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, member_scores + nonmember_scores))


def attack_aucs(members: list, nonmembers: list) -> dict:
    """``{attack: AUC}`` from two lists of :func:`example_scores` rows, each attack oriented by :data:`ATTACKS`."""
    return {a: mia_auc([s * r[a] for r in members], [s * r[a] for r in nonmembers]) for a, s in ATTACKS.items()}


def privleak(auc: float, auc_ref: float = 0.5) -> float:
    """MUSE's PrivLeak (open-unlearning's form): ``((1−AUC) − (1−AUC_ref)) / (1−AUC_ref) × 100``."""
    if not 0 <= auc_ref < 1 or not math.isfinite(auc):
        raise ValueError(f"privleak needs a finite AUC and a reference AUC in [0, 1); got {auc}, {auc_ref}")
    return ((1 - auc) - (1 - auc_ref)) / (1 - auc_ref) * 100


# ------------------------------------------------------------------------------------------- the data

def member_examples(bench, forget: int) -> list:
    """The forget people's training QA pairs (``ft_Data`` of ``forget_{forget}``): the members."""
    from mlunlearn.data.unlearning import unlearning_data

    return unlearning_data(bench, forget).forget


def nonmember_examples(bench) -> tuple | None:
    """``(examples, source)`` of people the model never saw, or ``None`` when the benchmark has none:
    its ``Holdout_Data`` config (``ft_Data``'s columns), else for the synthetic world
    :func:`~mlunlearn.data.world.heldout_rows` of its seed."""
    from mlunlearn.data.unlearning import _pairs
    from mlunlearn.data.world import HOLDOUT_CONFIG, build_world, heldout_rows

    if getattr(bench, "hub_id", None) is None and bench.has(HOLDOUT_CONFIG):
        return [e for _, e in _pairs(bench.load(HOLDOUT_CONFIG), HOLDOUT_CONFIG)], f"{bench.name} {HOLDOUT_CONFIG}"
    name = str(getattr(bench, "name", ""))
    if name == "toyworld" or name.startswith("toyworld:"):
        seed = int(name.partition(":")[2] or 0)
        return [e for _, e in _pairs(heldout_rows(build_world(seed)), HOLDOUT_CONFIG)], f"{name} heldout_people"
    return None


def has_nonmembers(source: str) -> bool:
    """Whether :func:`nonmember_examples` finds held-out people for a data source, without loading it: the
    synthetic world always, a benchmark folder when it holds ``Holdout_Data/*.parquet``, the hub never."""
    from pathlib import Path

    from mlunlearn.data.world import HOLDOUT_CONFIG

    source = str(source)
    if source == "toyworld" or source.startswith("toyworld:"):
        return True
    if source == "mllmu-bench":
        return False
    folder = Path(source.split(":", 1)[1] if source.startswith("mllmu-bench:") else source).expanduser()
    return any((folder / HOLDOUT_CONFIG).glob("*.parquet"))


def evaluate_mia(model, processor, bench, forget: int = 5, k: float = K, batch_size: int = 16,
                 nonmembers: tuple | None = None) -> dict | None:
    """Forget vs held-out membership inference: ``{"auc": {attack: AUC}, "privleak": {attack: PrivLeak vs
    0.5}, "members", "nonmembers", "nonmember_source", "k"}``, or ``None`` without held-out people."""
    nonmembers = nonmembers if nonmembers is not None else nonmember_examples(bench)
    if nonmembers is None:
        return None
    held, source = nonmembers
    members = member_examples(bench, forget)
    m = example_scores(model, processor, members, k, batch_size)
    n = example_scores(model, processor, held, k, batch_size)
    aucs = attack_aucs(m, n)
    return {"auc": aucs, "privleak": {a: privleak(v) for a, v in aucs.items()}, "members": len(m),
            "nonmembers": len(n), "nonmember_source": source, "k": k,
            "mean": {"members": {a: sum(r[a] for r in m) / len(m) for a in ATTACKS},
                     "nonmembers": {a: sum(r[a] for r in n) / len(n) for a in ATTACKS}}}
