"""Null-space constrained contrastive visual forgetting (arXiv 2605.05909), book chapter 6.

The language model stays frozen; the visual module (vision tower and projector) is edited, and only in
directions that retained inputs cannot see:

    L = L_cvf + w_r · L_keep

    L_cvf  = mean_i −log  Σ_j e^{s(z_i, r_j)/T}  /  ( Σ_j e^{s(z_i, r_j)/T} + e^{s(z_i, r_i)/T} )
    L_keep = mean_j ( 1 − s(z_j, r_j) )

    ΔW ← ΔW · U Uᵀ   for every trained linear layer, after every optimiser step

z = the model's visual representation of an image (mean over its visual tokens, L2-normalised), r = the
frozen starting model's, s = cosine, i over the forget images of the step, j over its retain images,
T = ``temperature``. L_cvf treats a forget image's own original representation as the negative and the
original representations of other (retained) people as the positives: the forget face is moved out of
its own region and into the region of faces the model knows as somebody else, while L_keep holds the
retained faces where they were. U spans the eigenvectors of the uncentred covariance C = XᵀX/n of the
layer's inputs on retained images whose eigenvalue is at most ``threshold`` × the largest (Adam-NSCL's
relative rule): ΔW·x ≈ 0 for every retained input x, so the layer's outputs on retained data do not move.

Choices the paper leaves open, and ours (chapter 6 says why): the loss above; representations at the
projector output (``layers="projector"``: the visual tokens the language model reads) or at vision-tower
layers (``"vision:-2"``, a comma list for several); the reference features computed once before training
(the frozen model is not needed during training); only the linear layers' weights train (biases, norms,
embeddings and the patch convolution stay frozen, so that everything that moves is constrained).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from mlunlearn.collate import collate

from .base import Method, MethodError
from .params import Parametrisation, llava_parts
from .registry import register


def visual_linears(model) -> dict:
    """``{module name: nn.Linear}`` of the vision tower and the projector, in ``named_modules`` order."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ("vision_tower" in name or "multi_modal_projector" in name):
            out[name] = module
    return out


class VisualLinears(Parametrisation):
    """Only the weights of the vision tower's and projector's linear layers train; the LLM is frozen."""

    name = "visual-linear-weights"

    def apply(self, model):
        model.requires_grad_(False)
        for module in visual_linears(model).values():
            module.weight.requires_grad_(True)
        return model

    def merge(self, model):
        return model  # plain weights: nothing to fold


def parse_layers(layers: str) -> list:
    """``"projector"`` / ``"vision:-2"`` / a comma list → ``[("projector", None), ("vision", -2), ...]``."""
    out = []
    for part in str(layers).split(","):
        part = part.strip()
        if part == "projector":
            out.append(("projector", None))
            continue
        kind, _, index = part.partition(":")
        try:
            if kind != "vision":
                raise ValueError(part)
            out.append(("vision", int(index)))
        except ValueError:
            raise MethodError(f"layers={layers!r}: each entry is 'projector' or 'vision:<hidden-state index>' "
                              "(e.g. 'vision:-2', LLaVA's feature layer), separated by commas") from None
    if not out:
        raise MethodError("layers='' names no representation; use e.g. layers=projector")
    return out


def visual_representation(model, pixel_values: torch.Tensor, layers) -> torch.Tensor:
    """``(B, d)``: per image, the mean over visual tokens of each chosen layer, L2-normalised, concatenated."""
    inner = llava_parts(model)
    config = model.config
    out = inner.vision_tower(pixel_values.to(next(inner.vision_tower.parameters()).dtype),
                             output_hidden_states=True, return_dict=True)
    feature_layer = config.vision_feature_layer
    crop = 1 if config.vision_feature_select_strategy == "default" else 0
    parts = []
    for kind, index in layers:
        if kind == "projector":
            hidden = inner.multi_modal_projector(out.hidden_states[feature_layer][:, crop:])
        else:
            if not -len(out.hidden_states) <= index < len(out.hidden_states):
                raise MethodError(f"layers: vision:{index} is out of range; the vision tower has "
                                  f"{len(out.hidden_states)} hidden states (use -1 … -{len(out.hidden_states)})")
            hidden = out.hidden_states[index][:, crop:]
        parts.append(nn.functional.normalize(hidden.float().mean(1), dim=-1))
    return torch.cat(parts, -1) / len(parts) ** 0.5


def image_key(pixels: torch.Tensor) -> str:
    """A stable key for one image's pixel tensor (the same image always collates to the same tensor)."""
    return hashlib.sha1(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _distinct_images(examples) -> list:
    seen, out = set(), []
    for e in examples:
        if e.image is not None and id(e.image) not in seen:
            seen.add(id(e.image))
            out.append(e)
    return out


def cvf_loss(z_forget, r_forget, r_retain, temperature: float) -> torch.Tensor:
    """Contrastive visual forgetting: own original representation = negative, others' = positives."""
    positives = z_forget @ r_retain.T / temperature  # (F, R)
    negative = (z_forget * r_forget).sum(-1, keepdim=True) / temperature  # (F, 1)
    return (torch.logsumexp(torch.cat([positives, negative], 1), 1) - torch.logsumexp(positives, 1)).mean()


@torch.no_grad()
def input_covariances(model, processor, examples, batch_size: int = 16, modules=None) -> dict:
    """``{module name: (C, n)}``: the uncentred covariance XᵀX/n of each visual linear layer's inputs on the
    images of ``examples`` (every visual token of every image), and the number of input rows n."""
    modules = modules or visual_linears(model)
    sums = {name: None for name in modules}
    counts = dict.fromkeys(modules, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            counts[name] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        images = _distinct_images(examples)
        device = next(model.parameters()).device
        for i in range(0, len(images), batch_size):
            batch = collate(processor, images[i:i + batch_size])
            visual_representation(model, batch["pixel_values"].to(device), [("projector", None)])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / max(counts[n], 1), counts[n]) for n in modules if sums[n] is not None}


def null_space(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """The projector U Uᵀ onto the eigenvectors of ``covariance`` with eigenvalue ≤ threshold · the largest."""
    values, vectors = torch.linalg.eigh(covariance.double())
    keep = values <= threshold * values.max().clamp_min(1e-30)
    u = vectors[:, keep]
    return (u @ u.T).float()


@register
@dataclass
class NullSpaceCVF(Method):
    name = "nullspace-cvf"
    summary = ("null-space constrained contrastive visual forgetting: LLM frozen, visual module edited "
               "only where retained inputs cannot see")
    unused = ("params", "pd", "kl_weight", "lora_r", "lora_alpha", "lora_dropout")
    defaults = {"tiny": {"lr": 1e-2}}  # chapter 6: forgets at 1e-2 under the constraint (1e-3 does not)

    temperature: float = 0.1
    layers: str = "projector"
    retain_weight: float = 1.0
    nullspace: bool = True
    threshold: float = 2e-3

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise MethodError(f"temperature={self.temperature} must be > 0 (the contrastive loss divides by it)")
        if self.retain_weight < 0:
            raise MethodError(f"retain_weight={self.retain_weight} must be >= 0")
        if not 0 < self.threshold < 1:
            raise MethodError(f"threshold={self.threshold} must be in (0, 1): eigenvalues up to threshold × the "
                              "largest count as null space (e.g. 2e-3; use nullspace=false for no constraint)")
        self._layers = parse_layers(self.layers)
        self.projections: dict = {}
        self.nullspace_dims: dict = {}
        self.protected_images = 0
        self._reference: dict = {}
        # set by the continual runner (mlunlearn.continual): more examples whose images the constraint
        # protects, e.g. earlier rounds' forgotten faces (not a hyper-parameter: data, not a setting)
        self.protect: list = []

    def parametrisation(self):
        return VisualLinears()

    # -- before training: the frozen model's features, and the null spaces ---------------------------------
    @torch.no_grad()
    def setup(self, model, data, processor) -> None:
        device = next(model.parameters()).device
        images = _distinct_images(data.forget + data.retain)
        was_training = model.training
        model.eval()
        for i in range(0, len(images), 16):
            batch = collate(processor, images[i:i + 16])
            pixels = batch["pixel_values"].to(device)
            for key, r in zip(map(image_key, pixels), visual_representation(model, pixels, self._layers)):
                self._reference[key] = r
        model.train(was_training)
        self.projections, self.nullspace_dims = {}, {}
        if self.nullspace:
            protected = data.retain + list(self.protect)
            self.protected_images = len(_distinct_images(protected))
            for name, (cov, n) in input_covariances(model, processor, protected).items():
                p = null_space(cov, self.threshold).to(device)
                self.projections[name + ".weight"] = p
                self.nullspace_dims[name] = (int(round(float(torch.trace(p)))), p.shape[0])

    def reference_features(self, pixel_values) -> torch.Tensor:
        try:
            return torch.stack([self._reference[image_key(p)] for p in pixel_values])
        except KeyError:
            raise MethodError("an image of this batch was not seen by setup(); nullspace-cvf computes its "
                              "reference features once, before training, from the run's own data") from None

    # -- the objective ---------------------------------------------------------------------------------
    def loss(self, model, batch, reference):
        f_pix, r_pix = batch["forget"]["pixel_values"], batch["retain"]["pixel_values"]
        z = visual_representation(model, torch.cat([f_pix, r_pix]), self._layers)
        z_f, z_r = z[:len(f_pix)], z[len(f_pix):]
        r_f, r_r = self.reference_features(f_pix), self.reference_features(r_pix)
        terms = {"cvf": cvf_loss(z_f, r_f, r_r, self.temperature),
                 "keep": (1 - (z_r * r_r).sum(-1)).mean(),
                 "forget_cos": (z_f * r_f).sum(-1).mean().detach()}
        terms["loss"] = terms["cvf"] + self.retain_weight * terms["keep"]
        return terms

    # -- the constraint ----------------------------------------------------------------------------------
    def update_hook(self):
        if not self.nullspace:
            return None

        def project(name, param, update):
            p = self.projections.get(name.removeprefix("base_model.model."))
            return update if p is None else update @ p.to(update.dtype)
        return project


@torch.no_grad()
def retained_output_change(before, after, processor, examples) -> dict:
    """``{layer: ‖W_after·x − W_before·x‖ / ‖W_before·x‖}`` per visual linear layer, over the inputs x that
    layer receives in ``before`` on the images of ``examples``: how much each layer's own edit changes what it
    outputs on those (e.g. retained) inputs, apart from what earlier layers changed."""
    inputs = {}

    def keep(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
        return hook

    layers_before, layers_after = visual_linears(before), visual_linears(after)
    handles = [m.register_forward_hook(keep(n)) for n, m in layers_before.items()]
    try:
        pixels = collate(processor, _distinct_images(examples))["pixel_values"]
        visual_representation(before, pixels.to(next(before.parameters()).device), [("projector", None)])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, x in inputs.items():
        y = layers_before[name](x)
        out[name] = ((layers_after[name](x) - y).norm() / y.norm()).item()
    return out
