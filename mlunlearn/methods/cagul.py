"""CAGUL: cross-modal attention guided unlearning (Bhaila et al., arXiv 2510.07567), book chapter 8.

Every weight of the VLM stays frozen. Two small external modules sit on the projector's output, the
visual tokens V = (v_1 … v_n) the language model reads:

    p(x)   = σ( D( LN( mean_j v_j ) ) )                    discriminator: is this a forget target?
    S(x,q) = the k visual tokens the question q attends to *least* (frozen model, text → visual attention)
    v_j'   = v_j + g · E( LN(v_j) )   for j ∈ S(x,q),   v_j' = v_j otherwise           (encoder E)

with the gate g = p(x) while training (soft, so every loss term reaches the discriminator too) and
g = 1[p(x) > ``threshold``] at inference (hard: an image the discriminator lets through is bit-identical
to the base model's). The objective, on each step's forget and retain examples:

    L = w_f · NLL(target | forget question)  +  w_r · NLL(retain)  +  w_kl · KL(p_ref ‖ p_θ)|retain
        + w_d · BCE(p, 1 on forget images, 0 on retain images)

the target being a refusal (``forget_target="refusal"``) or an alternative answer (``"alternative"``: what
the frozen model answers to the same question about another, retained person's face). The reference is
the same model with the modules switched off: no second copy of anything.

Choices the paper leaves open, and ours (chapter 8 says why):
- losses: the forget / retain CE / retain KL triple of the first author's SPUL (weights 1, 0.5, 0.5) plus
  a BCE for the discriminator; the discriminator reads the mean visual token (layer-normalised, so the
  same module fits the tiny model and LLaVA-1.5's much larger activations);
- the encoder is a residual MLP whose last layer starts at zero: before training the modules change
  nothing (E = 0), whatever the gate says;
- selection: attention averaged over every decoder layer and head, from the question's tokens (after the
  image, up to and including the ``ASSISTANT:`` marker; never the answer) to each visual token, computed
  by a no-grad pass of the frozen model under eager attention; the k *lowest* (the paper's choice;
  ``tokens="highest"`` is the control, the choice of an unofficial re-implementation). That pass runs
  the vision tower in eager mode too, so its image features may differ from the main pass's in the last
  float bits: the ranking is read from them, the transform applied to the main pass's features;
- ``k`` is a count of visual tokens (16 per image on the tiny model, 576 on LLaVA-1.5).

Image features asked for outside a model forward (``get_image_features`` called directly) have no
question, hence no selection: they are returned untransformed.

Cost: every forward with an image runs the frozen model once more, under eager attention, to select the
tokens (``benchmarks/cagul_overhead.py`` measures it). Under ``generate`` this happens only in the first
pass (later passes read the image tokens from the KV cache, already transformed).

Saving: the modules cannot be folded into the weights (they are a function of the input, not a weight
change), so a run is always saved unmerged, whatever ``merge`` says: ``trainable.safetensors`` holds the
modules and the question marker, ``run.json`` names the base model; ``load_model(run_dir)`` rebuilds both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from mlunlearn.analysis.attention import eager_attention, lowest_k, rank_visual_tokens, visual_attention_scores

from .base import Method, MethodError, Reference
from .params import Parametrisation, llava_parts
from .registry import register
from .terms import nll

ATTRIBUTE = "cagul"  # the modules' name on the LlavaForConditionalGeneration (parameter names cagul.*)
MARKER = "cagul.marker"  # trainable-state key of the question marker's token ids
FORGET_TARGETS = ("refusal", "alternative")
TOKENS = ("lowest", "highest")  # which visual tokens: the least attended (the paper) or the most (control)


def reply_marker(tokenizer) -> list:
    """Token ids of ``ASSISTANT:`` as they follow a newline in a prompt (where the question ends)."""
    head = tokenizer("USER: hello\n", add_special_tokens=False).input_ids
    full = tokenizer("USER: hello\nASSISTANT:", add_special_tokens=False).input_ids
    common = 0
    while common < min(len(head), len(full)) and head[common] == full[common]:
        common += 1
    return full[common:]


class CAGULModules(nn.Module):
    """The discriminator and the encoder, and the two hooks that put them in the model's forward.

    ``width``: the projector's output width (the LLM's hidden size); ``hidden``: both MLPs' hidden width;
    ``n_visual``: visual tokens per image; ``k``: tokens transformed; ``threshold``: the inference gate.
    """

    def __init__(self, width: int, hidden: int, n_visual: int, k: int, threshold: float, image_token_id: int,
                 tokens: str = "lowest"):
        super().__init__()
        self.width, self.n_visual, self.k, self.tokens = width, n_visual, k, tokens
        self.threshold, self.image_token_id = float(threshold), int(image_token_id)
        self.discriminator = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.encoder = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.encoder[2].weight)  # E = 0 at the start: the modules change nothing yet
        nn.init.zeros_(self.encoder[2].bias)
        self.register_buffer("marker", torch.zeros(0, dtype=torch.long))
        self.enabled = True
        self._busy = False  # inside the selection pass: the hooks stand aside
        self.selection = None  # (n_images, k) for the next projector call
        self.last_logits = None  # (n_images,) discriminator logits of the last forward with images
        self.handles = []

    # -- switching ------------------------------------------------------------------------------------
    def attach(self, model) -> None:
        """Hook into ``model``: selection before the inner LlavaModel runs, transform after the projector."""
        inner = llava_parts(model)
        self.handles = [inner.register_forward_pre_hook(self._select_hook, with_kwargs=True),
                        inner.multi_modal_projector.register_forward_hook(self._transform_hook)]

    @contextlib.contextmanager
    def off(self):
        """The base model inside the block (the reference; the frozen selection pass)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def set_marker(self, ids) -> None:
        self.marker = torch.as_tensor(list(ids), dtype=torch.long, device=self.marker.device)

    # -- the selection ----------------------------------------------------------------------------------
    def query_mask(self, input_ids, attention_mask) -> torch.Tensor:
        """``(B, T)``: the question's positions — attended text tokens after the last image token, up to
        and including the last ``ASSISTANT:`` marker (all of them when the row has no marker)."""
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        is_image = input_ids == self.image_token_id
        after_image = pos > torch.where(is_image, pos, torch.full_like(pos, -1)).max(1, keepdim=True).values
        end = torch.full((B, 1), T - 1, device=input_ids.device)
        m = len(self.marker)
        if m and T >= m:
            windows = input_ids.unfold(1, m, 1)  # (B, T - m + 1, m)
            hit = (windows == self.marker.to(input_ids.device)).all(-1)
            last = torch.where(hit, pos[:, :hit.shape[1]], torch.full_like(hit, -1, dtype=pos.dtype)).max(1).values
            end = torch.where(last >= 0, last + m - 1, torch.full_like(last, T - 1)).unsqueeze(1)
        keep = after_image & (pos <= end) & ~is_image
        if attention_mask is not None:
            keep &= attention_mask.bool()
        return keep

    @torch.no_grad()
    def select(self, inner, input_ids, attention_mask, pixel_values, **encoded) -> torch.Tensor:
        """``(n_images, k)``: per image, the k visual tokens its question attends to least (frozen model,
        attention averaged over layers and heads), images in the order LLaVA fills them. The images come as
        ``pixel_values`` or already encoded (``mm_encoder_outputs=``, as ``generate`` passes them)."""
        image_mask = input_ids == self.image_token_id
        query = self.query_mask(input_ids, attention_mask)
        was_busy, self._busy = self._busy, True
        try:
            with eager_attention(inner):
                out = inner(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            output_attentions=True, use_cache=False, **encoded)
        finally:
            self._busy = was_busy
        return self.pick(out.attentions, image_mask, query)

    def pick(self, attentions, image_mask, query) -> torch.Tensor:
        """``(n_images, k)`` from attention maps (one ``(B, H, T, T)`` per layer), the image positions and
        the query positions ``(B, T)``: per image, the k ``tokens`` (lowest or highest) by the mean
        attention from the query positions, over layers and heads."""
        counts = image_mask.sum(1)
        rows = range(len(image_mask)) if counts.min() != counts.max() else [slice(None)]
        picked = []
        for r in rows:  # one batched call, or one per example when examples hold different numbers of images
            sl = r if isinstance(r, slice) else slice(r, r + 1)
            if not image_mask[sl].any():
                continue
            scores = visual_attention_scores([a[sl] for a in attentions], image_mask[sl], query[sl])
            b, L, H, n = scores.shape
            per_image = scores.reshape(b, L, H, n // self.n_visual, self.n_visual)
            per_image = per_image.permute(0, 3, 1, 2, 4).reshape(-1, L, H, self.n_visual)
            if self.tokens == "lowest":
                picked.append(lowest_k(per_image, self.k))
            else:  # the control: the k most attended
                picked.append(rank_visual_tokens(per_image)[:, -self.k:])
        return torch.cat(picked)

    def _select_hook(self, inner, args, kwargs):
        if not self.enabled or self._busy:
            return None
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is None and encoded is None:  # text only, or a later generation step (KV cache)
            self.selection = None
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise MethodError("cagul needs input_ids with the image tokens (not inputs_embeds) to find the "
                              "question's attention to the visual tokens")
        if pixel_values is not None:  # the projector runs inside this forward: its hook transforms
            self.selection = self.select(inner, input_ids, kwargs.get("attention_mask"), pixel_values)
            return None
        # generate() encodes the images before the first forward, without the question (so untransformed)
        # and passes them as mm_encoder_outputs: select with them, and transform them here.
        selection = self.select(inner, input_ids, kwargs.get("attention_mask"), None,
                                mm_encoder_outputs=kwargs["mm_encoder_outputs"])
        tokens = torch.stack(list(encoded.pooler_output))
        moved = self.transform(tokens, selection)
        outputs = dict(kwargs["mm_encoder_outputs"], image=type(encoded)(**{**encoded, "pooler_output": list(moved)}))
        return args, {**kwargs, "mm_encoder_outputs": outputs}

    # -- the transform ----------------------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Discriminator logits ``(n_images,)`` of projected visual tokens ``(n_images, n_visual, width)``."""
        x = nn.functional.layer_norm(tokens.float().mean(1), (self.width,))
        return self.discriminator(x).squeeze(-1)

    def transform(self, tokens: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        """``tokens`` with the selected ones moved by the gated encoder; the rest unchanged."""
        logits = self.logits(tokens)
        self.last_logits = logits
        p = torch.sigmoid(logits)
        gate = p if self.training else (p > self.threshold).float()
        index = selection.unsqueeze(-1).expand(-1, -1, self.width)
        chosen = tokens.float().gather(1, index)  # (n_images, k, width)
        delta = gate.view(-1, 1, 1) * self.encoder(nn.functional.layer_norm(chosen, (self.width,)))
        moved = tokens.scatter_add(1, index, delta.to(tokens.dtype))
        if self.training:
            return moved
        return torch.where(gate.view(-1, 1, 1) > 0, moved, tokens)  # gate closed: bit for bit the input

    def _transform_hook(self, projector, args, output):
        if not self.enabled or self._busy:
            return None
        selection, self.selection = self.selection, None
        if selection is None:  # features asked for outside a model forward: no question, nothing to select
            self.last_logits = self.logits(output)
            return None
        if selection.shape[0] != output.shape[0]:
            raise RuntimeError(f"cagul selected tokens for {selection.shape[0]} images, the projector got "
                               f"{output.shape[0]}")
        return self.transform(output, selection)

    def extra_repr(self) -> str:
        return f"k={self.k} {self.tokens} of {self.n_visual}, threshold={self.threshold:g}"


def cagul_modules(model) -> CAGULModules:
    """The :class:`CAGULModules` of a model prepared by CAGUL (a run, or ``load_model(run_dir)``)."""
    modules = getattr(model, ATTRIBUTE, None)
    if not isinstance(modules, CAGULModules):
        raise MethodError("this model has no CAGUL modules; train with method='cagul' or load a cagul run")
    return modules


class ModulesOff(Reference):
    """The reference: the trained model itself with the CAGUL modules switched off (nothing copied)."""

    def __init__(self, trained, modules: CAGULModules):
        self.trained, self.separate, self._peft, self._snapshot = trained, None, False, {}
        self.modules = modules

    @property
    def kind(self) -> str:
        return "the model with the CAGUL modules off"

    @torch.no_grad()
    def run(self, fn, batch):
        was_training = self.trained.training
        self.trained.eval()
        try:
            with self.modules.off():
                return fn(self.trained, batch)
        finally:
            self.trained.train(was_training)


@dataclass
class CAGULParametrisation(Parametrisation):
    """Everything of the VLM frozen; :class:`CAGULModules` added as ``model.cagul`` and hooked in.

    Not mergeable: ``can_merge`` is False, so the engine saves ``trainable.safetensors`` (the modules and
    the marker) even with ``merge=true``, and ``load_model(run_dir)`` re-applies this parametrisation."""

    k: int = 4
    hidden: int = 64
    threshold: float = 0.5
    tokens: str = "lowest"

    name = "cagul modules on a frozen VLM (not mergeable: saved as trainable.safetensors)"

    def apply(self, model):
        if hasattr(model, ATTRIBUTE):
            raise MethodError("this model already has CAGUL modules")
        config = model.config
        n_visual = int(config.image_seq_length)
        if self.k > n_visual:
            raise MethodError(f"k={self.k}: an image has only {n_visual} visual tokens; use 1 <= k <= {n_visual}")
        model.requires_grad_(False)
        device = next(model.parameters()).device
        modules = CAGULModules(config.text_config.hidden_size, self.hidden, n_visual, self.k, self.threshold,
                               config.image_token_id, self.tokens).to(device)
        model.add_module(ATTRIBUTE, modules)
        modules.attach(model)
        return model

    def trainable_state(self, model) -> dict:
        state = super().trainable_state(model)
        state[MARKER] = cagul_modules(model).marker.detach()
        return state

    def load_trainable_state(self, model, state: dict, source: str = "the saved state") -> None:
        state = dict(state)
        if MARKER not in state:
            from .params import TrainableStateError

            raise TrainableStateError(f"{source} has no {MARKER}; it was not written by cagul")
        cagul_modules(model).set_marker(state.pop(MARKER).tolist())
        super().load_trainable_state(model, state, source)

    def can_merge(self, model) -> bool:
        return False

    def merge(self, model):
        raise MethodError("cagul's modules act on each input's visual tokens; they cannot be merged into "
                          "weights (runs are saved as trainable.safetensors)")

    def reference(self, model, separate=None):
        if separate is not None:
            return Reference(model, separate)
        return ModulesOff(model, cagul_modules(model))


@register
@dataclass
class CAGUL(Method):
    name = "cagul"
    summary = ("cross-modal attention guided unlearning: VLM frozen; a discriminator gates an encoder on "
               "the k least-attended visual tokens")
    needs_refusals = True
    unused = ("params", "lora_r", "lora_alpha", "lora_dropout")
    # tiny: chapter 8 (randomly initialised modules need a higher rate and more epochs than weight edits);
    # llava-1.5: SPUL's (the first author's text method) lr 1e-4, untested on GPU.
    defaults = {"tiny": {"lr": 1e-2, "epochs": 30.0}, "llava-1.5": {"lr": 1e-4}}

    kl_weight: float = 0.5  # the engine's retain KL to the reference (modules off): SPUL's 0.5
    k: int = 4
    hidden: int = 64
    threshold: float = 0.5
    tokens: str = "lowest"  # "highest": the control (an unofficial re-implementation's choice)
    forget_target: str = "refusal"
    forget_weight: float = 1.0
    retain_weight: float = 0.5
    disc_weight: float = 1.0

    def __post_init__(self):
        if self.params != "lora":
            raise MethodError(f"cagul takes no params={self.params!r}: every VLM weight stays frozen and only "
                              "its own modules train")
        super().__post_init__()
        if self.k < 1:
            raise MethodError(f"k={self.k} must be >= 1 (the number of visual tokens the encoder transforms)")
        if self.hidden < 1:
            raise MethodError(f"hidden={self.hidden} must be >= 1 (the modules' hidden width)")
        if not 0 < self.threshold < 1:
            raise MethodError(f"threshold={self.threshold} must be in (0, 1) (the discriminator's probability "
                              "above which the encoder acts at inference)")
        if self.tokens not in TOKENS:
            raise MethodError(f"tokens={self.tokens!r}: use lowest (the paper's: the least-attended visual tokens) "
                              "or highest (the control)")
        if self.forget_target not in FORGET_TARGETS:
            raise MethodError(f"forget_target={self.forget_target!r}: use one of {', '.join(FORGET_TARGETS)}")
        if not self.forget_weight > 0:
            raise MethodError(f"forget_weight={self.forget_weight} must be > 0 (without it nothing is forgotten)")
        for key in ("retain_weight", "disc_weight"):
            if getattr(self, key) < 0:
                raise MethodError(f"{key}={getattr(self, key)} must be >= 0")
        self._parametrisation = None

    def parametrisation(self):
        if self._parametrisation is None:
            self._parametrisation = CAGULParametrisation(self.k, self.hidden, self.threshold, self.tokens)
        return self._parametrisation

    def setup(self, model, data, processor) -> None:
        """The question marker from the tokenizer; for ``forget_target="alternative"``, the targets."""
        modules = cagul_modules(model)
        modules.set_marker(reply_marker(processor.tokenizer))
        if self.forget_target == "alternative":
            from mlunlearn.collate import Example
            from mlunlearn.data.unlearning import UnlearningData, add_prompt_decouple

            probe = UnlearningData(data.forget, data.retain, data.forget_ids, data.retain_ids)
            with modules.off():
                add_prompt_decouple(probe, model, processor)
            # the frozen model's answer about someone else, asked with the forget face (the stream PO uses)
            data.forget_refusal = [Example(f.prompt, other.answer, f.image) for f, other in zip(data.forget, probe.pd)]

    def loss(self, model, batch, reference):
        modules = cagul_modules(model)
        forget_nll = nll(model, batch, "forget_refusal").mean()
        d_forget = modules.last_logits
        retain_nll = nll(model, batch, "retain").mean()
        d_retain = modules.last_logits
        logits = torch.cat([d_forget, d_retain])
        labels = torch.cat([torch.ones_like(d_forget), torch.zeros_like(d_retain)])
        disc = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        terms = {"target_nll": forget_nll, "retain_nll": retain_nll, "disc_bce": disc,
                 "disc_acc": ((logits > 0) == labels.bool()).float().mean().detach()}
        terms["loss"] = self.forget_weight * forget_nll + self.retain_weight * retain_nll + self.disc_weight * disc
        return terms


@torch.no_grad()
def forget_probability(model, processor, images, batch_size: int = 32) -> torch.Tensor:
    """The discriminator's p(forget) ``(n,)`` for each PIL image (no question needed)."""
    modules = cagul_modules(model)
    inner = llava_parts(model)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        with modules.off():
            feats = inner.get_image_features(pixel_values=pixels.to(device, model.dtype))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        tokens = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        out.append(torch.sigmoid(modules.logits(tokens)).cpu())
    return torch.cat(out)


@torch.no_grad()
def selected_tokens(model, batch: dict) -> torch.Tensor:
    """``(n_images, k)``: the visual tokens CAGUL transforms for a collated batch (its question's lowest-k)."""
    modules = cagul_modules(model)
    inner = llava_parts(model)
    device = next(model.parameters()).device
    return modules.select(inner, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                          batch["pixel_values"].to(device, model.dtype))
