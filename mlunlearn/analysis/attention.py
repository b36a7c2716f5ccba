"""Text→visual cross-modal attention: how much a question's tokens look at each visual token.

The core every attention analysis and CAGUL's token selection share (book chapters 7 and 8):

    scores = visual_attention_scores(attentions, image_mask, query_mask)   # (B, layers, heads, n_visual)
    order = rank_visual_tokens(scores)                                    # (B, n_visual), least attended first
    lowest = lowest_k(scores, k)                                          # (B, k) indices into the visual tokens

``attentions`` is what a Hugging Face model returns with ``output_attentions=True``: one
``(B, heads, T, T)`` tensor per decoder layer, row = query position, column = key position. Attention maps
need the eager implementation (SDPA and FlashAttention return none): :func:`eager_attention` switches a
model to it for the duration of a ``with`` block and back afterwards.

One call does all of it for examples (chapter 7)::

    att = cross_modal_attention(model, processor, example, over="answer")
    att.scores, att.grid_map(), att.layer_profile(), att.ranking()   # (B,L,H,n), (B,g,g), (B,L), (B,n)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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



# ----------------------------------------------------------------------------------------------------
# High level: one call from examples to per-layer/head scores, a patch-grid map and a ranking (chapter 7)
# ----------------------------------------------------------------------------------------------------

def _llava_config(model):
    """The LLaVA config of ``model`` (a peft ``PeftModel`` forwards ``config`` to the wrapped model)."""
    return model.config


def patch_grid_size(model) -> int:
    """Patches per image side, from the vision config: ``image_size // patch_size`` (4 for the tiny model's
    48-px portraits in 12-px patches, 24 for LLaVA-1.5's 336 px in 14-px patches)."""
    vision = _llava_config(model).vision_config
    if vision.image_size % vision.patch_size:
        raise ValueError(f"image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    return vision.image_size // vision.patch_size


def to_patch_grid(values: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-visual-token values ``(..., n_visual)`` as a patch grid ``(..., grid, grid)``.

    Visual token ``j`` is the patch in row ``j // grid`` (top to bottom) and column ``j % grid`` (left to
    right): CLIP's patch embedding flattens its output grid row by row, and with LLaVA's ``"default"``
    feature strategy the class token is dropped. With ``"full"`` (``n_visual = grid**2 + 1``) the first
    token, the class token, is dropped here.
    """
    n = values.shape[-1]
    if n == grid * grid + 1:
        values = values[..., 1:]
    elif n != grid * grid:
        raise ValueError(f"{n} visual tokens do not fill a {grid}x{grid} patch grid")
    return values.reshape(*values.shape[:-1], grid, grid)


def query_masks(batch: dict, image_token_index: int) -> dict:
    """Boolean ``(B, T)`` masks of a :func:`mlunlearn.collate.collate` batch.

    ``"image"``: the visual-token positions; ``"question"``: the prompt's text after the image (the question
    and the ``ASSISTANT:`` turn marker), padding excluded; ``"answer"``: the positions that *predict* the
    answer tokens (the last prompt token through the second-to-last answer token), i.e. where the model
    looks while it produces the answer.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    attention = batch.get("attention_mask", torch.ones_like(ids)).bool()
    image = ids == image_token_index
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    last_image = torch.where(image, positions, torch.full_like(positions, -1)).max(1, keepdim=True).values
    question = attention & (labels == -100) & ~image & (positions > last_image)
    answer = torch.zeros_like(image)
    answer[:, :-1] = labels[:, 1:] != -100
    return {"image": image, "question": question, "answer": answer}


@dataclass
class CrossModalAttention:
    """Text→visual attention of a batch, from :func:`cross_modal_attention`.

    ``scores``: ``(B, L, H, n_visual)`` mean attention from the query positions to each visual token (see
    :func:`visual_attention_scores`); ``layers``: the decoder layers they come from; ``grid``: patches per
    image side; ``over``: which positions asked (``"question"``, ``"answer"`` or ``"custom"``).
    """

    scores: torch.Tensor
    layers: list
    grid: int
    over: str

    def per_token(self, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """``(B, n_visual)``: the scores averaged over layers and heads, or of one ``layer`` (an index into
        ``layers``) and/or one ``head``."""
        s = self.scores if layer is None else self.scores[:, layer:layer + 1]
        s = s if head is None else s[:, :, head:head + 1]
        return s.mean(dim=(1, 2))

    def grid_map(self, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """``(B, grid, grid)``: :meth:`per_token` laid out on the image's patch grid (row 0 at the top)."""
        return to_patch_grid(self.per_token(layer, head), self.grid)

    def layer_profile(self) -> torch.Tensor:
        """``(B, L)``: the share of the query positions' attention that goes to the image in each layer (summed
        over visual tokens, averaged over heads); the rest goes to text tokens."""
        return self.scores.sum(-1).mean(-1)

    def head_profile(self) -> torch.Tensor:
        """``(B, L, H)``: the image's share of attention per layer and head."""
        return self.scores.sum(-1)

    def ranking(self) -> torch.Tensor:
        """``(B, n_visual)`` visual-token indices from the least to the most attended
        (:func:`rank_visual_tokens`)."""
        return rank_visual_tokens(self.scores)


def _as_batch(processor, examples) -> dict:
    if isinstance(examples, dict):
        return examples
    from mlunlearn.collate import Example, collate

    examples = [examples] if isinstance(examples, Example) else list(examples)
    if any(e.image is None for e in examples):
        raise ValueError("cross-modal analysis needs an image in every example")
    return collate(processor, examples)


def cross_modal_attention(model, processor, examples, over="question", layers=None) -> CrossModalAttention:
    """How much the question's (or the answer's) tokens attend to each visual token, per layer and head.

    ``examples``: an :class:`~mlunlearn.collate.Example`, a list of them (each with an image), or a batch
    from :func:`~mlunlearn.collate.collate` (then ``processor`` may be None). ``over``: ``"question"``,
    ``"answer"`` (see :func:`query_masks`) or a ``(B, T)`` boolean mask of the query positions. ``layers``:
    decoder-layer indices (default all). Works on a plain or a peft-wrapped LLaVA; the model runs once, in
    eval mode, without gradients, under eager attention, and gets its attention implementation and
    training mode back afterwards.
    """
    batch = _as_batch(processor, examples)
    config = _llava_config(model)
    masks = query_masks(batch, config.image_token_index)
    if isinstance(over, str):
        if over not in ("question", "answer"):
            raise ValueError(f"over={over!r}: use 'question', 'answer' or a (B, T) boolean mask")
        query, name = masks[over], over
    else:
        query, name = torch.as_tensor(over).bool(), "custom"
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.train(was_training)
    chosen = list(range(len(out.attentions))) if layers is None else list(layers)
    scores = visual_attention_scores([a.cpu() for a in out.attentions], masks["image"], query, chosen)
    return CrossModalAttention(scores=scores, layers=chosen, grid=patch_grid_size(model), over=name)


__all__ = ["CrossModalAttention", "cross_modal_attention", "eager_attention", "lowest_k", "patch_grid_size",
           "query_masks", "rank_visual_tokens", "to_patch_grid", "visual_attention_scores"]
