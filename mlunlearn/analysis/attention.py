"""Text→visual cross-modal attention: how much a question's tokens look at each visual token.

The core every attention analysis and CAGUL's token selection share (book chapters 7 and 8):

    scores = visual_attention_scores(attentions, image_mask, query_mask)   # (B, layers, heads, n_visual)
    order = rank_visual_tokens(scores)                                    # (B, n_visual), least attended first
    lowest = lowest_k(scores, k)                                          # (B, k) indices into the visual tokens

``attentions`` is what a Hugging Face model returns with ``output_attentions=True``: one
``(B, heads, T, T)`` tensor per decoder layer, row = query position, column = key position. Attention maps
need the eager implementation (SDPA and FlashAttention return none): :func:`eager_attention` switches a
model to it for the duration of a ``with`` block and back afterwards.
"""

from __future__ import annotations

import contextlib

import torch


def _text_config_holder(model):
    """The module whose ``config`` carries the language model's attention implementation."""
    base = getattr(model, "base_model", model)  # peft wraps: PeftModel.base_model.model
    return getattr(base, "model", base) if hasattr(base, "peft_config") else model


@contextlib.contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention inside the block (attention weights available), then restore.

    Switched only for the analysis: training and generation keep the faster implementation.
    """
    target = _text_config_holder(model)
    before = getattr(target.config, "_attn_implementation", None)
    if before == "eager":
        yield model
        return
    target.set_attn_implementation("eager")
    try:
        yield model
    finally:
        target.set_attn_implementation(before or "sdpa")


def visual_attention_scores(attentions, image_mask: torch.Tensor, query_mask: torch.Tensor,
                            layers=None) -> torch.Tensor:
    """Mean attention from the query positions to each visual token, per layer and head.

    ``attentions``: a sequence of ``(B, H, T, T)`` tensors (one per layer); ``image_mask`` and ``query_mask``:
    ``(B, T)`` booleans marking the visual-token positions (every example must hold the same number of them,
    ``n_visual``) and the text positions whose attention counts (e.g. the question, or the answer).
    ``layers``: indices into ``attentions`` (default all). Returns ``(B, L, H, n_visual)``: for example b,
    layer l, head h, visual token j, the attention weight from the query positions to j averaged over those
    positions (each row of attention sums to 1 over all keys, so the scores of one query sum to at most 1).
    """
    if not len(attentions) or attentions[0] is None:
        raise ValueError("no attention weights: run the model with output_attentions=True under eager "
                         "attention (mlunlearn.analysis.eager_attention(model))")
    image_mask, query_mask = image_mask.bool(), query_mask.bool()
    counts = image_mask.sum(1)
    if counts.min() != counts.max() or int(counts[0]) == 0:
        raise ValueError(f"every example needs the same, non-zero number of visual tokens (got {counts.tolist()})")
    if (query_mask.sum(1) == 0).any():
        raise ValueError("an example has no query position: the query mask selects nothing in it")
    chosen = [attentions[i] for i in (range(len(attentions)) if layers is None else layers)]
    att = torch.stack(chosen, 1).float()  # (B, L, H, T, T)
    q = query_mask.to(att.dtype)
    from_query = torch.einsum("blhqk,bq->blhk", att, q) / q.sum(1).view(-1, 1, 1, 1)  # (B, L, H, T)
    n_visual = int(counts[0])
    batch, n_layers, heads, _ = from_query.shape
    return from_query[image_mask.unsqueeze(1).unsqueeze(1).expand_as(from_query)].view(batch, n_layers, heads, n_visual)


def rank_visual_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Visual-token indices ``(B, n_visual)`` ordered from the least to the most attended, by the scores
    averaged over layers and heads (``scores``: ``(B, L, H, n_visual)`` or already ``(B, n_visual)``).
    Ties keep the token order (a stable sort)."""
    mean = scores.float().mean(dim=(1, 2)) if scores.dim() == 4 else scores.float()
    return torch.sort(mean, dim=-1, stable=True).indices


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` least-attended visual tokens (CAGUL's choice: the *lowest*)."""
    n_visual = scores.shape[-1]
    if not 1 <= k <= n_visual:
        raise ValueError(f"k={k} must be between 1 and the number of visual tokens ({n_visual})")
    return rank_visual_tokens(scores)[:, :k]


__all__ = ["eager_attention", "lowest_k", "rank_visual_tokens", "visual_attention_scores"]
