"""MMUnlearner (Huo et al., ACL 2025 Findings, arXiv 2502.11051): forget the visual link, keep the text.

Saliency, once before training, per trained tensor θ of each module group (book chapter 5):

    F_f = mean over forget batches of (∂(−NLL_f)/∂θ)²,   F_p = the same on the group's preserve set,
    m   = 1[ (F_f + 1e-15) / (F_p + 1e-15) ≥ τ ]                                             (τ = 1)

- vision group (``vision_tower``, ``multi_modal_projector``): preserve = the retain image-QA;
- language group (``language_model``, ``lm_head``): preserve = the text-only QA of *all* profiles,
  forget people included, plus the retain image-QA. What the forget person's text questions need is
  protected, so the forget steps may only cut the link from their image.

Then an epoch alternates, for each forget batch, one masked forget step and r unmasked retain steps
(r = ⌊#retain batches / #forget batches⌋ by default):

    forget step: g = clip(∇(−α·NLL_f)),  g ← g ⊙ m,  AdamW, update ⊙ m      (α = ``forget_weight``)
    retain step: g = clip(∇ NLL_r),                   AdamW                   (unmasked)

Three pitfalls of the public code we avoid (the chapter shows each):
- its masks are keyed by the base weights' names while, under LoRA, peft's ``lora_A``/``lora_B`` tensors
  are what trains: the masks silently apply to nothing (its issue #8). Here the masks are computed for,
  keyed by and applied to the tensors that train, and a mismatch is an error;
- its learning-rate scheduler steps once per epoch; here the Trainer steps it every optimiser step;
- its ``Mask_grad`` variant returns a random mask of the salient size; ours is the saliency itself,
  computed deterministically (dropout off).

And one it does not name: under Adam a zeroed gradient still moves a weight by the momentum its retain
steps built up. The mask therefore acts twice on forget steps: on the clipped gradient (what Adam's
moments see) and on the update itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mlunlearn.collate import collate

from .base import Method, MethodError
from .registry import register
from .terms import nll

EPS = 1e-15  # the public code's ε in the saliency ratio
GROUPS = ("vision", "language")


def group_of(name: str) -> str | None:
    """``"vision"`` (vision tower, projector), ``"language"`` (LLM, lm_head) or ``None`` for a trained name."""
    if "vision_tower" in name or "multi_modal_projector" in name:
        return "vision"
    if "language_model" in name or "lm_head" in name:
        return "language"
    return None


def squared_gradients(model, processor, examples: list, names: list, batch_size: int) -> tuple[dict, int]:
    """``({name: Σ over batches of (∂ mean NLL / ∂θ)²}, number of batches)`` for the trained ``names``,
    with dropout off (deterministic). Batches are consecutive slices of ``examples``."""
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in zip(names, tensors)}
    device = tensors[0].device
    batches = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(processor, examples[start:start + batch_size]).items()}
            loss = nll(model, {"x": batch}, "x").mean()
            batches += 1
            if not loss.requires_grad:  # no trained tensor on this batch's path (e.g. text-only, projector)
                continue
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    total[n] += g.detach().float() ** 2
    finally:
        model.train(was_training)
    return total, batches


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def describe_tensor(name: str) -> tuple[int | None, str]:
    """``(layer, module)`` of a trained tensor's name, e.g. ``(2, "self_attn.q_proj.lora_A")``,
    ``(None, "projector.linear_1")``; a bias keeps ``.bias``, a weight drops ``.weight``."""
    plain = name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
    for part in ("model.", "vision_tower.", "language_model.", "vision_model."):
        plain = plain.removeprefix(part)
    plain = plain.replace("multi_modal_projector.", "projector.")
    match = _LAYER.search("." + plain)
    if match:
        return int(match.group(1)), ("." + plain)[match.end():]
    return None, plain.removeprefix("encoder.")


@register
@dataclass
class MMUnlearner(Method):
    name = "mmunlearner"
    summary = "saliency-masked forget steps (vision vs language preserve sets) alternating with retain steps"
    needs_knowledge = True  # the language group's preserve set: text-only QA of every profile
    # tiny: chapter 5's sweep with the paper's schedule (18 retain steps per forget step there, 304
    # steps); llava-1.5: the paper's (lr 1e-5, batch 4, 1 epoch).
    defaults = {"tiny": {"lr": 3e-4, "epochs": 4.0}, "llava-1.5": {"lr": 1e-5, "epochs": 1.0}}

    params: str = "all"  # the paper's per-weight saliency over the whole model
    tau: float = 1.0  # saliency threshold on F_f / F_p
    forget_weight: float = 1.0  # α
    retain_steps: int | None = None  # r retain steps per forget step; None = the paper's ⌊#retain / #forget⌋
    mask: bool = True  # False: the same alternation unmasked (the control)
    saliency_batch: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise MethodError(f"tau={self.tau} must be > 0 (the threshold on F_forget / F_preserve; 1 = the paper's)")
        if not (self.forget_weight >= 0 and math.isfinite(self.forget_weight)):
            raise MethodError(f"forget_weight={self.forget_weight} must be >= 0 (alpha, the forget step's weight)")
        if self.retain_steps is not None:
            if self.retain_steps < 0 or self.retain_steps != int(self.retain_steps):
                raise MethodError(f"retain_steps={self.retain_steps:g} must be a whole number >= 0 "
                                  "(retain steps after each forget step), or None for the paper's ratio")
            self.retain_steps = int(self.retain_steps)
        if self.saliency_batch < 1 or self.saliency_batch != int(self.saliency_batch):
            raise MethodError(f"saliency_batch={self.saliency_batch} must be a whole number >= 1")
        self.masks: dict = {}
        self.saliency: dict = {}
        self._phase = None
        self._float_masks: dict = {}

    # -- saliency -------------------------------------------------------------------------------------
    def setup(self, model, data, processor) -> None:
        """Compute ``self.masks`` {trained name: bool tensor}: m = 1[(F_f + ε)/(F_p + ε) ≥ τ]."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        orphans = [n for n in names if group_of(n) is None]
        if orphans:
            raise MethodError(f"mmunlearner: trained tensor {orphans[0]} is in no module group (vision tower/"
                              "projector or language model/lm_head); its mask would be undefined")
        if not data.knowledge:
            raise MethodError("mmunlearner needs data.knowledge (the text-only questions of every profile): "
                              "see mlunlearn.data.unlearning.add_knowledge")
        b = self.saliency_batch
        language = [n for n in names if group_of(n) == "language"]
        forget, nf = squared_gradients(model, processor, data.forget, names, b)
        retain, nr = squared_gradients(model, processor, data.retain, names, b)
        text, nk = squared_gradients(model, processor, data.knowledge, language, b) if language else ({}, 0)
        self.saliency, self.masks = {}, {}
        for n in names:
            f = forget[n] / nf
            if group_of(n) == "vision":  # preserve: retain image-QA
                p = retain[n] / nr
            else:  # preserve: text-only QA of all profiles + retain image-QA
                p = (text[n] + retain[n]) / (nk + nr)
            ratio = (f + EPS) / (p + EPS)
            self.saliency[n] = ratio
            self.masks[n] = ratio >= self.tau
        self.preserve_batches = {"vision": nr, "language": nk + nr, "forget": nf}
        self.check_masks(model)

    def check_masks(self, model) -> None:
        """A one-line error unless the masks are keyed by exactly the names of the tensors that train,
        with their shapes (the public code's masks, keyed by base-weight names under LoRA, silently
        applied to nothing)."""
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing, unknown = sorted(set(trained) - set(self.masks)), sorted(set(self.masks) - set(trained))
        if missing or unknown:
            raise MethodError(f"mmunlearner: the masks do not key the trained tensors ({len(missing)} trained "
                              f"tensors without a mask, e.g. {missing[:1]}; {len(unknown)} masks of tensors that "
                              f"do not train, e.g. {unknown[:1]})")
        for n, p in trained.items():
            if tuple(self.masks[n].shape) != tuple(p.shape):
                raise MethodError(f"mmunlearner: the mask of {n} has shape {tuple(self.masks[n].shape)}, "
                                  f"the tensor {tuple(p.shape)}")
        self._float_masks = {n: m.to(device=trained[n].device, dtype=trained[n].dtype)
                             for n, m in self.masks.items()}

    def mask_sparsity(self):
        """Per trained tensor: group, layer, module, its elements and how many the mask selects (exact
        integer counts: a float32 mean times the size would round a count off by one or two)."""
        import pandas as pd

        rows = []
        for n, m in self.masks.items():
            layer, module = describe_tensor(n)
            rows.append({"group": group_of(n), "layer": layer, "module": module, "tensor": n,
                         "elements": m.numel(), "selected": int(m.sum())})
        return pd.DataFrame(rows)

    # -- the alternation ------------------------------------------------------------------------------
    def phases(self, forget_batches: int, retain_batches: int) -> list:
        r = self.retain_steps if self.retain_steps is not None else retain_batches // max(forget_batches, 1)
        return (["forget"] + ["retain"] * r) * forget_batches

    def loss(self, model, batch, reference):
        self._phase = batch["phase"]
        if self._phase == "forget":
            forget_nll = nll(model, batch, "forget").mean()
            return {"forget_nll": forget_nll, "loss": -self.forget_weight * forget_nll}
        retain_nll = nll(model, batch, "retain").mean()
        return {"retain_nll": retain_nll, "loss": retain_nll}

    def _masked(self, name, value):
        if self._phase != "forget":
            return value
        mask = self._float_masks.get(name)
        if mask is None:
            raise MethodError(f"mmunlearner: {name} trains but has no mask (call setup with this model)")
        return value * mask

    def gradient_hook(self):
        """g ⊙ m on forget steps, after clipping: Adam's moments never see a masked-out forget gradient."""
        return (lambda name, param, grad: self._masked(name, grad)) if self.mask else None

    def update_hook(self):
        """update ⊙ m on forget steps: a masked-out weight does not move by its retain-step momentum either."""
        return (lambda name, param, update: self._masked(name, update)) if self.mask else None
