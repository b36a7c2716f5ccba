"""Saliency: which pixels, patches, visual tokens and question words an answer rests on (book chapter 7).

Every attribution here explains one number per example, the answer's log-probability under teacher
forcing (:func:`answer_logprob`: the sum over the answer tokens of log p(token | image, prompt, earlier
answer tokens)), and is computed by captum's own classes (Kokhlikyan et al., 2020):

- :func:`pixel_attribution`: ``IntegratedGradients`` on ``pixel_values``, with the convergence delta
  (completeness: the attributions sum to f(x) - f(baseline) up to the delta);
- :func:`patch_ablation`: ``FeatureAblation`` over a patch ``feature_mask``: for each patch, how much the
  log-probability drops when that patch alone is replaced by the baseline;
- :func:`visual_token_attribution`: ``LayerIntegratedGradients`` at the projector's output, one value per
  visual token;
- :func:`word_attribution`: ``LayerIntegratedGradients`` at ``embed_tokens`` over the question's text
  positions (each replaced by the pad token in the baseline; the ``<image>`` ids and the answer are kept).

Known pitfalls, handled here (see also the tests): attribution at ``embed_tokens`` is exactly 0 at the
image positions, which LLaVA overwrites with the image features, so :func:`word_attribution` refuses them;
the baseline keeps the ``<image>`` ids (otherwise LLaVA's feature count no longer matches); integrated
gradients on pixels needs a few hundred steps to converge, so the delta is always returned; and an
attribution that is exactly zero everywhere (the image dropped somewhere on the way, a target that does not
depend on the input) raises :class:`ZeroAttributionError` instead of drawing an empty map. captum's
``LLMAttribution`` is not used: with its default cached path it silently returns zeros for LLaVA under
transformers 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlunlearn.analysis.attention import _as_batch, patch_grid_size, query_masks
from mlunlearn.analysis.projector import get_projector
from mlunlearn.collate import IGNORE


class ZeroAttributionError(RuntimeError):
    """An attribution that is exactly zero everywhere: the explained number does not depend on the input."""


def check_nonzero(attributions: torch.Tensor, what: str, hint: str = "") -> torch.Tensor:
    """Return ``attributions``, or raise :class:`ZeroAttributionError` (all exactly zero) or
    ``ValueError`` (NaN or infinite values). ``what`` names the attribution in the message."""
    if not torch.isfinite(attributions).all():
        raise ValueError(f"{what}: the attributions hold NaN or infinite values")
    if not bool((attributions != 0).any()):
        raise ZeroAttributionError(
            f"{what}: every attribution is exactly 0, so the answer's log-probability does not depend on the "
            f"attributed input here{'; ' + hint if hint else ''}")
    return attributions


def answer_logprob(model, input_ids, attention_mask, labels, pixel_values=None) -> torch.Tensor:
    """Teacher-forced log-probability of each example's answer, ``(B,)`` in nats: the sum over the answer
    tokens (``labels != -100``) of log p(token | everything before it)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(1)


@dataclass
class Attribution:
    """One attribution of the answers' log-probabilities in a batch.

    ``values``: what captum returned (the shape of the attributed input or layer output). ``map``: the
    summary to plot: ``(B, grid, grid)`` for pixels, patches and visual tokens, ``(B, T)`` for words (zero
    off the attributed positions). ``target``: f(x), the answers' log-probabilities ``(B,)``;
    ``baseline_target``: f(baseline) ``(B,)``; ``delta``: captum's convergence delta ``(B,)`` (integrated
    gradients only: sum of attributions - (f(x) - f(baseline))); ``tokens``: the batch's tokens (words).
    """

    method: str
    values: torch.Tensor
    map: torch.Tensor
    target: torch.Tensor
    baseline_target: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    tokens: list | None = None
    positions: torch.Tensor | None = None

    @property
    def relative_delta(self) -> torch.Tensor | None:
        """``|delta| / |f(x) - f(baseline)|`` per example: the share of the difference the attributions miss."""
        if self.delta is None:
            return None
        return self.delta.abs() / (self.target - self.baseline_target).abs().clamp(min=1e-12)

    def converged(self, tolerance: float = 0.05) -> torch.Tensor:
        """``(B,)`` booleans: the relative convergence delta is within ``tolerance`` (integrated gradients)."""
        if self.delta is None:
            raise ValueError(f"{self.method} has no convergence delta (only integrated gradients have one)")
        return self.relative_delta <= tolerance


# ----------------------------------------------------------------------------------------------------
# Inputs, baselines, masks
# ----------------------------------------------------------------------------------------------------

def _prepare(model, processor, examples):
    batch = _as_batch(processor, examples)
    if "pixel_values" not in batch:
        raise ValueError("the batch has no pixel_values: saliency over the image needs an image per example")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    n_images = batch["pixel_values"].shape[0]
    if n_images != batch["input_ids"].shape[0]:
        raise ValueError(f"{n_images} images for {batch['input_ids'].shape[0]} examples: every example needs "
                         "exactly one image")
    return batch


def pixel_baseline(pixel_values: torch.Tensor, baseline="mean", processor=None) -> torch.Tensor:
    """The baseline image in the processor's normalised pixel space, shape of ``pixel_values``.

    ``"mean"``: all zeros, i.e. every pixel the normalisation's mean colour (a flat grey-beige);
    ``"black"``: raw 0 in every channel, ``(0 - mean) / std`` (needs ``processor``); a number or a tensor
    broadcastable to ``pixel_values``: used as it is.
    """
    if isinstance(baseline, str):
        if baseline == "mean":
            return torch.zeros_like(pixel_values)
        if baseline == "black":
            if processor is None:
                raise ValueError("baseline='black' needs the processor (its normalisation mean and std)")
            ip = processor.image_processor
            mean = torch.tensor(ip.image_mean, dtype=pixel_values.dtype, device=pixel_values.device)
            std = torch.tensor(ip.image_std, dtype=pixel_values.dtype, device=pixel_values.device)
            return (-mean / std).view(1, -1, 1, 1).expand_as(pixel_values).clone()
        raise ValueError(f"baseline={baseline!r}: use 'mean', 'black', a number or a tensor")
    return torch.as_tensor(baseline, dtype=pixel_values.dtype, device=pixel_values.device).expand_as(
        pixel_values).clone()


def patch_feature_mask(grid: int, patch_size: int, channels: int = 3) -> torch.Tensor:
    """``(1, channels, grid*patch_size, grid*patch_size)`` integer mask: every pixel (all channels) holds the
    index of its patch, ``row * grid + col`` (the visual-token order), for ``FeatureAblation``."""
    index = torch.arange(grid * patch_size) // patch_size
    mask = index.view(-1, 1) * grid + index.view(1, -1)
    return mask.expand(1, channels, -1, -1).clone()


def _patch_pool(values: torch.Tensor, patch_size: int, reduce: str = "sum") -> torch.Tensor:
    """Pixel values ``(B, H, W)`` pooled per patch to ``(B, H/p, W/p)``."""
    pooled = torch.nn.functional.avg_pool2d(values.unsqueeze(1), patch_size).squeeze(1)
    return pooled * patch_size ** 2 if reduce == "sum" else pooled


def _targets(model, batch, pixel_values):
    with torch.no_grad():
        return answer_logprob(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                              pixel_values).detach().cpu()


class _EvalMode:
    """Run the model in eval mode (dropout off) and give it its mode back afterwards."""

    def __init__(self, model):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


# ----------------------------------------------------------------------------------------------------
# The four attributions
# ----------------------------------------------------------------------------------------------------

def _pixels_first(model):
    """``answer_logprob`` of ``model`` with the pixels as the first (attributed) argument, as captum wants."""
    def forward(pixel_values, input_ids, attention_mask, labels):
        return answer_logprob(model, input_ids, attention_mask, labels, pixel_values)
    return forward


def pixel_attribution(model, processor, examples, baseline="mean", n_steps: int = 256,
                      internal_batch_size: int = 64) -> Attribution:
    """Integrated gradients (Sundararajan et al., 2017) of the answers' log-probabilities on the input pixels.

    ``map``: ``(B, grid, grid)``, the attributions summed over channels and over each patch's pixels (so the
    map sums to the total attribution, ≈ f(x) - f(baseline)); ``values``: per pixel ``(B, 3, H, W)``.
    ``delta``: captum's convergence delta per example (see :meth:`Attribution.relative_delta`): on a tiny-model
    portrait 16 steps leave several percent of f(x) - f(baseline) unexplained, the default 256 well under 1%
    (chapter 7 prints both).
    ``internal_batch_size``: interpolation steps per forward pass (memory against speed).
    """
    from captum.attr import IntegratedGradients

    batch = _prepare(model, processor, examples)
    pixels = batch["pixel_values"]
    base = pixel_baseline(pixels, baseline, processor)

    forward = _pixels_first(model)

    with _EvalMode(model):
        values, delta = IntegratedGradients(forward).attribute(
            pixels, base, additional_forward_args=(batch["input_ids"], batch["attention_mask"], batch["labels"]),
            n_steps=n_steps, internal_batch_size=internal_batch_size, return_convergence_delta=True)
        target, base_target = _targets(model, batch, pixels), _targets(model, batch, base)
    values = check_nonzero(values.detach().cpu(), "integrated gradients on the pixels",
                           "is the image reaching the language model (projector, image tokens)?")
    patch = _llava_patch_size(model)
    return Attribution("integrated gradients (pixels)", values, _patch_pool(values.sum(1), patch), target,
                       base_target, delta.detach().cpu())


def patch_ablation(model, processor, examples, baseline="mean", perturbations_per_eval: int = 16) -> Attribution:
    """Feature ablation over image patches: ``map[b, i, j]`` = f(x) - f(x with patch (i, j) set to the
    baseline), the drop of the answer's log-probability when that patch alone is removed (positive: the
    patch supports the answer). One forward pass per patch (``perturbations_per_eval`` at a time)."""
    from captum.attr import FeatureAblation

    batch = _prepare(model, processor, examples)
    pixels = batch["pixel_values"]
    base = pixel_baseline(pixels, baseline, processor)
    grid, patch = patch_grid_size(model), _llava_patch_size(model)
    mask = patch_feature_mask(grid, patch, pixels.shape[1]).to(pixels.device)

    forward = _pixels_first(model)

    with _EvalMode(model), torch.no_grad():
        values = FeatureAblation(forward).attribute(
            pixels, baselines=base, feature_mask=mask,
            additional_forward_args=(batch["input_ids"], batch["attention_mask"], batch["labels"]),
            perturbations_per_eval=perturbations_per_eval)
        target = _targets(model, batch, pixels)
    values = check_nonzero(values.detach().cpu(), "feature ablation over patches",
                           "is the image reaching the language model (projector, image tokens)?")
    # every pixel of a patch holds that patch's drop: the mean over the patch is the drop itself
    return Attribution("feature ablation (patches)", values, _patch_pool(values.mean(1), patch, "mean"), target)


def visual_token_attribution(model, processor, examples, baseline="mean", n_steps: int = 64,
                             internal_batch_size: int = 64) -> Attribution:
    """Layer integrated gradients at the projector's output: one value per visual token, summed over the
    hidden dimension. The path runs from the projector output of the baseline image to that of the image,
    so completeness holds against the same f(baseline) as :func:`pixel_attribution`. ``map``:
    ``(B, grid, grid)``."""
    from captum.attr import LayerIntegratedGradients

    from mlunlearn.analysis.attention import to_patch_grid

    batch = _prepare(model, processor, examples)
    pixels = batch["pixel_values"]
    base = pixel_baseline(pixels, baseline, processor)

    forward = _pixels_first(model)

    with _EvalMode(model):
        lig = LayerIntegratedGradients(forward, get_projector(model))
        values, delta = lig.attribute(
            pixels, base, additional_forward_args=(batch["input_ids"], batch["attention_mask"], batch["labels"]),
            n_steps=n_steps, internal_batch_size=internal_batch_size, return_convergence_delta=True)
        target, base_target = _targets(model, batch, pixels), _targets(model, batch, base)
    values = check_nonzero(values.detach().cpu(), "layer integrated gradients at the projector")
    per_token = values.sum(-1)  # (B, n_visual)
    return Attribution("layer integrated gradients (projector)", values,
                       to_patch_grid(per_token, patch_grid_size(model)), target, base_target, delta.detach().cpu())


def word_attribution(model, processor, examples, positions="question", n_steps: int = 128,
                     internal_batch_size: int = 64, baseline_token: int | None = None) -> Attribution:
    """Layer integrated gradients at ``embed_tokens`` for the question's words.

    The baseline replaces the tokens at ``positions`` (``"question"``, see
    :func:`~mlunlearn.analysis.attention.query_masks`, or a ``(B, T)`` boolean mask) by ``baseline_token``
    (default: the pad token) and keeps every other id, the ``<image>`` ids and the answer included, so only
    those positions get attributions. ``map``: ``(B, T)`` per-token attributions (0 elsewhere); ``tokens``:
    the batch's tokens. Image positions are refused: their embeddings are overwritten by the image
    features, so their attribution at ``embed_tokens`` is exactly 0 whatever the image says.
    """
    from captum.attr import LayerIntegratedGradients

    batch = _prepare(model, processor, examples)
    image_index = model.config.image_token_index
    masks = query_masks({k: v.cpu() for k, v in batch.items()}, image_index)
    chosen = masks[positions] if isinstance(positions, str) else torch.as_tensor(positions).bool()
    chosen = chosen.to(batch["input_ids"].device)
    if (chosen & (batch["input_ids"] == image_index)).any():
        raise ValueError("attribution at embed_tokens is exactly 0 at image positions (LLaVA overwrites them "
                         "with the image features): attribute the image with visual_token_attribution (projector) "
                         "or pixel_attribution / patch_ablation (pixels)")
    if (chosen & (batch["labels"] != IGNORE)).any():
        raise ValueError("positions include answer tokens: the answer is the explained target and stays fixed")
    if not chosen.any():
        raise ValueError("positions select no token")
    tokenizer = processor.tokenizer if processor is not None else None
    pad = baseline_token if baseline_token is not None else (tokenizer.pad_token_id if tokenizer else None)
    if pad is None:
        raise ValueError("pass baseline_token= (no processor to take the pad token from)")
    ids = batch["input_ids"]
    base_ids = torch.where(chosen, torch.full_like(ids, pad), ids)

    def forward(input_ids, pixel_values, attention_mask, labels):
        return answer_logprob(model, input_ids, attention_mask, labels, pixel_values)

    with _EvalMode(model):
        lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
        values, delta = lig.attribute(
            ids, base_ids, additional_forward_args=(batch["pixel_values"], batch["attention_mask"], batch["labels"]),
            n_steps=n_steps, internal_batch_size=internal_batch_size, return_convergence_delta=True)
        with torch.no_grad():
            target = answer_logprob(model, ids, batch["attention_mask"], batch["labels"], batch["pixel_values"]).cpu()
            base_target = answer_logprob(model, base_ids, batch["attention_mask"], batch["labels"],
                                         batch["pixel_values"]).cpu()
    per_token = check_nonzero(values.detach().cpu().sum(-1) * chosen.cpu(), "integrated gradients on the words")
    tokens = ([tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids.cpu()] if tokenizer else None)
    return Attribution("layer integrated gradients (words)", values.detach().cpu(), per_token, target, base_target,
                       delta.detach().cpu(), tokens, chosen.cpu())


def _llava_patch_size(model) -> int:
    return model.config.vision_config.patch_size


__all__ = ["Attribution", "ZeroAttributionError", "answer_logprob", "check_nonzero", "patch_ablation",
           "patch_feature_mask", "pixel_attribution", "pixel_baseline", "visual_token_attribution",
           "word_attribution"]
