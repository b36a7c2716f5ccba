"""Will it fit? Peak GPU memory of an unlearning run, estimated before anything is loaded (issue 13).

The model is built on the ``meta`` device (shapes, no weights): LLaVA-1.5-7B/-13B from their published
configs (:func:`mlunlearn.models.configs.llava_1_5_config`), a local folder from its ``config.json``.
The estimate is the sum of

- **weights**: every parameter in the compute dtype (fp32 4 bytes, bf16/fp16 2); with ``4bit``, the
  language model's linear layers in NF4, 0.5 byte per weight plus one fp32 absmax per block of 64
  (bitsandbytes' default, no double quantisation: 0.5625 byte), and
  :data:`~mlunlearn.models.loading.FULL_PRECISION_MODULES` (vision tower, projector, ``lm_head``) and the
  embeddings and norms in the compute dtype;
- **trainable**, **grads**, **optimizer**: the tensors the method trains (LoRA r·(in+out) per target, a
  projector, SineProject's ΔW and biases, the visual linears, CAGUL's modules), each in the dtype it
  trains in (LoRA, projectors and sine terms in fp32; the visual linears and full weights in the model's
  dtype), a gradient of the same size and AdamW's two states (exp_avg, exp_avg_sq) like the parameter;
- **activations**: what autograd keeps for the backward pass, from the architecture, per token
  (:func:`decoder_layer_bytes`, :func:`vision_layer_bytes`, :func:`head_bytes`), times the tokens of
  every stream the loss runs with gradients (GA: the forget batch; GradDiff, KL, PO, CAGUL: forget and
  retain), plus the peak of the loss head; with gradient checkpointing only each decoder layer's input is
  kept and one layer is recomputed at a time;
- **reference**: a second copy of the weights only where the code makes one (NPO with
  ``reference=<folder>``); the default reference is the trained model with its adapters disabled and a
  snapshot of the other trainable tensors (:class:`mlunlearn.methods.base.Reference`), so it costs that
  snapshot and one no-grad forward's loss head;
- **extra**: what a method keeps besides (nullspace-cvf's projection matrices, MMUnlearner's masks and
  saliency, CAGUL's attention maps of its token-selection pass).

Nothing is fitted to a measurement: ``tests/test_memory.py`` checks the formula against the peak measured
on a 7B-shaped model (:mod:`mlunlearn.models.shaped`) on the CPU. Not counted: the CUDA context and
allocator fragmentation (the usable GiB of :data:`GPUS` leave room for them), and kernels' workspaces.

    mlunlearn memory --model llava-1.5-7b --method ga --batch-size 4 --max-length 640 --dtype bf16
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
# Usable memory per GPU in GiB, after the CUDA context and the allocator's reserve: the T4's "≈ 15 GB
# usable" of /work/shared/research/gpu-notes.md (16 GB card); the same ~1–2 GiB margin below the L4's 24 GB
# and the A100's 40 / 80 GB (gpu-notes.md's GPU table).
GPUS = {"t4": 15, "l4": 22, "a100-40": 39, "a100-80": 79}
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZATIONS = (None, "4bit")
NF4_BYTES = 0.5 + 4 / 64  # 4 bits + one fp32 absmax per 64 weights (bnb_4bit_use_double_quant=False)
IMAGE_TOKENS = 576  # LLaVA-1.5: (336/14)^2 patches per image
PRESETS = {"llava-1.5-7b": "7b", "llava-1.5-13b": "13b"}


class MemoryEstimateError(ValueError):
    """An estimate that cannot be made as asked; the message names the problem and the fix."""


@dataclass
class MemoryEstimate:
    """Peak memory of one training step (or of evaluation), by part, in GiB."""

    model: str
    method: str
    dtype: str
    quantization: str | None
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    weights: float
    trainable: float
    grads: float
    optimizer: float
    activations: float
    reference: float
    extra: float = 0.0
    trainable_parameters: int = 0
    parameters: int = 0
    notes: list = field(default_factory=list)

    PARTS = ("weights", "trainable", "grads", "optimizer", "activations", "reference", "extra")

    @property
    def total(self) -> float:
        return sum(getattr(self, p) for p in self.PARTS)

    def fits(self, gpu: str) -> bool:
        """Whether the total fits ``gpu``'s usable memory (:data:`GPUS`)."""
        return self.total <= _usable(gpu)

    def advice(self, gpu: str) -> str:
        """One line: ``fits`` with the margin, or the first changes that make it fit (checkpointing, 4-bit,
        a smaller batch, a shorter max length, in that order), or that nothing short of a larger GPU does."""
        usable = _usable(gpu)
        t4_bf16 = " (T4: no bf16, use fp16: same memory)" if gpu == "t4" and self.dtype == "bf16" else ""
        if self.fits(gpu):
            return f"{gpu}: fits ({self.total:.1f} of {usable} GiB){t4_bf16}"
        if self.method == "eval":
            return f"{gpu}: does not fit ({self.total:.1f} of {usable} GiB)" + _first_fit(self, gpu, eval_=True)
        return f"{gpu}: does not fit ({self.total:.1f} of {usable} GiB)" + _first_fit(self, gpu) + t4_bf16

    def rows(self) -> list:
        return [(p, getattr(self, p)) for p in self.PARTS] + [("total", self.total)]

    def table(self) -> str:
        """The parts, one per line, in GiB."""
        head = (f"{self.model}, {self.method}, {self.dtype}"
                + (f", {self.quantization}" if self.quantization else "")
                + f", batch {self.batch_size} x {self.max_length} tokens"
                + ("" if self.method == "eval" else
                   f", gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}")
                + f" ({_count(self.trainable_parameters)} trainable of {_count(self.parameters)})")
        lines = [head] + [f"  {name:<12}{value:8.2f} GiB" for name, value in self.rows()]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def _usable(gpu: str) -> int:
    if gpu not in GPUS:
        raise MemoryEstimateError(f"unknown gpu {gpu!r}; use one of {', '.join(GPUS)}")
    return GPUS[gpu]


def _first_fit(est: MemoryEstimate, gpu: str, eval_: bool = False) -> str:
    """``"; fix: …"`` naming the cumulative changes that first bring ``est`` under ``gpu``'s memory."""
    usable, steps, changes = _usable(gpu), [], {}
    if not eval_ and not est.gradient_checkpointing:
        steps.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if est.quantization is None:
        steps.append(("4-bit (--quantization 4bit)", {"quantization": "4bit"}))
    batch = est.batch_size
    while batch > 1:
        batch //= 2
        steps.append((f"batch size {batch}", {"batch_size": batch}))
    length = est.max_length
    while length > IMAGE_TOKENS + 64:
        length = max(IMAGE_TOKENS + 64, length - 128)
        steps.append((f"max length {length}", {"max_length": length}))
    said = []
    for text, change in steps:
        changes.update(change)
        said = [s for s in said if not s.split(" ")[0] == text.split(" ")[0]] + [text]
        again = _again(est, changes)
        if again.total <= usable:
            return f"; fix: {', '.join(said)} ({again.total:.1f} GiB)"
    return "; fix: a larger GPU (nothing above fits: " + ", ".join(said) + ")"


def _again(est: MemoryEstimate, changes: dict) -> MemoryEstimate:
    kw = dict(dtype=est.dtype, quantization=est.quantization, batch_size=est.batch_size,
              max_length=est.max_length)
    kw.update({k: v for k, v in changes.items() if k != "gradient_checkpointing"})
    if est.method == "eval":
        return estimate_eval(est.model, **kw)
    return estimate(est.model, est.method, gradient_checkpointing=changes.get(
        "gradient_checkpointing", est.gradient_checkpointing), **kw, **getattr(est, "_hparams", {}))


# -- the model ------------------------------------------------------------------------------------------------

def model_config(model: str):
    """The ``LlavaConfig`` of ``model``: ``"tiny"``, ``"llava-1.5-7b"``/``"llava-1.5-13b"``, a Hugging Face
    LLaVA-1.5 id (``llava-hf/llava-1.5-7b-hf``), or a local folder with a ``config.json``. No weights."""
    from transformers import LlavaConfig

    from mlunlearn.models.configs import llava_1_5_config

    name = str(model)
    if name in PRESETS:
        return llava_1_5_config(PRESETS[name])
    if name in ("tiny", "tiny-safety"):
        from mlunlearn.models.vanilla import ASSET_DIR

        return LlavaConfig.from_pretrained(str(ASSET_DIR))
    path = Path(name).expanduser()
    if path.is_dir():
        file = path / "model" / "config.json" if (path / "model" / "config.json").is_file() else path / "config.json"
        if not file.is_file():
            raise MemoryEstimateError(f"{path} has no config.json; give a model folder, tiny, llava-1.5-7b or "
                                      "llava-1.5-13b")
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise MemoryEstimateError(f"{file} is not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(data, dict) or data.get("model_type") != "llava":
            raise MemoryEstimateError(f"{path} holds no LLaVA config (model_type "
                                      f"{data.get('model_type') if isinstance(data, dict) else None!r})")
        return LlavaConfig.from_pretrained(str(file.parent))
    match = re.search(r"llava-1\.5-(7b|13b)", name.lower())
    if match:  # a hub id: the published config, without a download
        return llava_1_5_config(match.group(1))
    raise MemoryEstimateError(f"unknown model {name!r}; use tiny, llava-1.5-7b, llava-1.5-13b, a llava-hf "
                              "LLaVA-1.5 id or a local model folder")


_META: dict = {}


def _meta(config):
    """The model on the meta device, built once per configuration (the advice re-estimates several times)."""
    from mlunlearn.models.configs import meta_model

    key = config.to_json_string()
    if key not in _META:
        _META[key] = meta_model(config)
    return _META[key]


@dataclass(frozen=True)
class Shapes:
    """What the activation formulas need of a LLaVA config."""

    hidden: int  # h: the language model's width
    intermediate: int  # i: its MLP width
    heads: int  # a
    kv_hidden: int  # key/value width (h for Llama-2: no grouped-query attention)
    layers: int  # L
    vocab: int  # V
    vision_width: int
    vision_intermediate: int
    vision_heads: int
    vision_layers_used: int  # CLIP layers up to the feature layer (-2: all but the last)
    image_tokens: int  # visual tokens the language model reads per image
    vision_tokens: int  # tokens inside CLIP per image (patches + CLS)


def shapes(config) -> Shapes:
    t, v = config.text_config, config.vision_config
    n_layers_v = v.num_hidden_layers
    layer = config.vision_feature_layer
    layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
    used = n_layers_v + 1 + layer if layer < 0 else layer  # hidden_states[k] is the output of layer k
    patches = (v.image_size // v.patch_size) ** 2
    kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    head_dim = t.hidden_size // t.num_attention_heads
    return Shapes(t.hidden_size, t.intermediate_size, t.num_attention_heads, head_dim * kv,
                  t.num_hidden_layers, t.vocab_size, v.hidden_size, v.intermediate_size, v.num_attention_heads,
                  used, int(getattr(config, "image_seq_length", patches) or patches), patches + 1)


# -- activations, per token, from the architecture ------------------------------------------------------------

def decoder_layer_bytes(s: Shapes, e: int, lora_r: int | None) -> float:
    """Bytes one Llama decoder layer keeps for backward, per token, when the gradient flows through it.

    Each RMSNorm: its input in fp32 (4h: a cast copy in half precision, the residual itself in fp32) and
    1/rms (4). Attention (SDPA, flash / memory-efficient kernels): q, k, v after RoPE and the output
    (e·(2h + 2·kv)) and a logsumexp per head (4a); RoPE keeps only cos/sin, shared by every layer. MLP:
    gate, SiLU(gate) and up (3·e·i). A frozen linear keeps nothing per token (its weight is what the input
    gradient needs). LoRA (peft) on q, k, v, o, gate, up, down casts each input to fp32, and its dropout
    keeps the output and a float mask (8 bytes per input element: 8·(3h + h + 2h + i)); lora_A's output
    4r each. Checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on a 7B layer in
    fp32 and bf16 (``tests/test_memory.py``).
    """
    h, i = s.hidden, s.intermediate
    norms = 2 * (4 * h + 4)
    attention = e * (2 * h + 2 * s.kv_hidden) + 4 * s.heads
    out = norms + attention + 3 * e * i
    if lora_r:
        out += 8 * (6 * h + i) + 7 * 4 * lora_r
    return out


def layer_backward_bytes(s: Shapes, e: int, lora_r: int | None) -> float:
    """The largest gradient a decoder layer's backward makes while the layer's saved tensors are still
    alive, per token: the gradient at down_proj's input, the frozen path's (e·i) and LoRA's (4i) before
    they are summed."""
    return e * s.intermediate + (4 * s.intermediate if lora_r else 0)


def no_grad_layer_bytes(s: Shapes, e: int) -> float:
    """A no-grad forward's working set in one decoder layer, per token (the reference's): the hidden state
    and q, k, v, attention output (e·(3h + 2·kv)), then gate, up and their product (3·e·i)."""
    return e * (3 * s.hidden + 2 * s.kv_hidden) + 3 * e * s.intermediate


def vision_layer_bytes(s: Shapes, e: int) -> float:
    """Bytes one CLIP encoder layer keeps per token when its linear weights train (nullspace-cvf, params=all):
    two LayerNorms (input e·w each, stats), the normed input the q/k/v and fc1 weight gradients need
    (e·w each), SDPA's q, k, v, output (4e·w) and logsumexp, out_proj's input (e·w), quick-GELU's input,
    sigmoid and product (3·e·4w: the product is fc2's input)."""
    w, m = s.vision_width, s.vision_intermediate
    return e * (2 * w + 2 * w + 4 * w + w + 3 * m) + 2 * 8 + 4 * s.vision_heads


def head_bytes(s: Shapes, e: int) -> float:
    """Peak bytes of the loss head per token of a stream trained with gradients: the answer NLL reads
    fp32 log-softmax over the vocabulary (``mlunlearn.collate.nll_from_logits``). Forward: logits (e·V),
    their fp32 copy (4V, none in fp32) and the log-softmax output kept for backward (4V); backward: that
    output with the incoming and outgoing gradients (3·4V). The larger of the two."""
    V = s.vocab
    forward = e * V + (4 * V if e != 4 else 0) + 4 * V
    return max(forward, 12 * V)


def reference_head_bytes(s: Shapes, e: int) -> float:
    """A no-grad reference forward's head: logits (e·V), their fp32 copy and the log-softmax (4V each)."""
    return e * s.vocab + (4 * s.vocab if e != 4 else 0) + 4 * s.vocab


# -- what each method trains and runs ------------------------------------------------------------------------

@dataclass
class Profile:
    """What the estimate needs of a method: which parts train, the streams with gradients, the reference."""

    lora_r: int | None  # LoRA on the language model's linears (rank), or None
    projector: str | None  # "fp32" (trained in fp32), "sine" (ΔW + biases, W frozen), "model" (model dtype)
    llm: bool  # every LLM weight trains (params=llm/all)
    vision: bool  # vision weights train (nullspace-cvf: the linears' weights; params=all: everything)
    grad_through_llm: bool  # the loss's gradient flows through the language model
    streams: int  # batches per step run with gradients (forget; forget + retain; …)
    reference_forward: bool  # a no-grad forward of the reference on top
    separate_reference: bool  # a second copy of the weights (NPO reference=<folder>)
    cagul_hidden: int | None = None  # CAGUL's module width
    mmunlearner: bool = False
    nullspace: bool = False


def profile(method) -> Profile:
    """:class:`Profile` of a :class:`~mlunlearn.methods.Method` instance, read from its parametrisation and
    the streams its loss (and add-ons) run: see each method's ``loss``."""
    from mlunlearn.methods.cagul import CAGULParametrisation
    from mlunlearn.methods.nullspace import VisualLinears
    from mlunlearn.methods.params import Standard
    from mlunlearn.methods.sineproject import SineProjector

    para = method.parametrisation()
    objective = getattr(method, "_objective", method)  # SineProject trains with another method's loss
    name = objective.name
    streams = {"ga": 1, "npo": 1, "graddiff": 2, "kl": 2, "po": 2, "mmunlearner": 1, "cagul": 2,
               "nullspace-cvf": 0}[name]
    if name == "npo" and objective.retain_weight:
        streams = 2
    if getattr(method, "pd", 0) > 0:
        streams += 1  # Prompt Decouple: a third batch with gradients
    separate = method.uses_reference() and getattr(objective, "reference", "vanilla") != "vanilla"
    if isinstance(para, CAGULParametrisation):
        return Profile(None, None, False, False, True, streams, True, separate, cagul_hidden=para.hidden)
    if isinstance(para, VisualLinears):
        return Profile(None, "model", False, True, False, 0, False, False, nullspace=method.nullspace)
    if not isinstance(para, Standard):
        raise MemoryEstimateError(f"no memory profile for {method.name}'s parametrisation {type(para).__name__}")
    params = para.params
    projector = "sine" if isinstance(para, SineProjector) else (
        "fp32" if "projector" in params else ("model" if params == "all" else None))
    return Profile(para.lora_r if "lora" in params else None, projector, params in ("llm", "all"),
                   params == "all", True, streams, method.uses_reference(), separate,
                   mmunlearner=name == "mmunlearner")


# -- the estimate -------------------------------------------------------------------------------------------

def _check(dtype, quantization, batch_size, max_length, image_tokens, positions=None):
    if dtype not in DTYPES:
        raise MemoryEstimateError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise MemoryEstimateError(f"unknown quantization {quantization!r}; use 4bit or leave it out")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise MemoryEstimateError(f"batch size {batch_size!r} must be a whole number >= 1")
    if not (isinstance(max_length, int) and max_length > image_tokens):
        raise MemoryEstimateError(f"max length {max_length!r} must be more than the {image_tokens} image tokens "
                                  "of one image (e.g. 640)")
    if positions and max_length > positions:
        raise MemoryEstimateError(f"max length {max_length} is more than the model's {positions} positions; "
                                  f"use at most {positions}")


def _weights(meta, e: int, quantization) -> tuple[float, int]:
    """Bytes of the frozen weights and the parameter count (:data:`NF4_BYTES` for 4-bit linears)."""
    import torch

    from mlunlearn.models.loading import FULL_PRECISION_MODULES

    total, quantized = 0.0, set()
    if quantization == "4bit":
        for name, module in meta.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.startswith(FULL_PRECISION_MODULES):
                quantized.add(id(module.weight))
    n = 0
    for p in meta.parameters():
        n += p.numel()
        total += p.numel() * (NF4_BYTES if id(p) in quantized else e)
    return total, n


def _lora_parameters(meta, r: int) -> int:
    """r·(in + out) for every linear layer peft's LoRA targets (:data:`mlunlearn.methods.params.LLM_LINEAR`)."""
    import torch

    from mlunlearn.methods.params import LLM_LINEAR

    target = re.compile(LLM_LINEAR)
    return sum(r * (m.in_features + m.out_features) for n, m in meta.named_modules()
               if isinstance(m, torch.nn.Linear) and target.fullmatch(n))


def _family_checkpointing(config) -> bool:
    """The engine's gradient-checkpointing default for a model of this config's family."""
    from mlunlearn.engine import FAMILY_SETTINGS

    family = "llava-1.5" if config.text_config.hidden_size >= 4096 else "tiny"  # as engine.model_family
    return FAMILY_SETTINGS[family]["gradient_checkpointing"]


def estimate(model: str = "llava-1.5-7b", method="ga", dtype: str = "bf16", quantization: str | None = None,
             batch_size: int = 4, max_length: int = 640, gradient_checkpointing: bool | None = None,
             **hparams) -> MemoryEstimate:
    """The peak memory of one unlearning step of ``method`` (a name and its ``hparams``, or a Method) on
    ``model`` with ``batch_size`` sequences of ``max_length`` tokens (one image: 576 of them) per stream.
    ``gradient_checkpointing=None``: what the engine does for the model's family (on for LLaVA-1.5, off for
    the tiny model; :data:`mlunlearn.engine.FAMILY_SETTINGS`)."""
    from mlunlearn.methods import Method, get_method

    config = model_config(model)
    if gradient_checkpointing is None:
        gradient_checkpointing = _family_checkpointing(config)
    s = shapes(config)
    _check(dtype, quantization, batch_size, max_length, s.image_tokens, config.text_config.max_position_embeddings)
    m = method if isinstance(method, Method) else get_method(method, **hparams)
    prof = profile(m)
    e = DTYPES[dtype]
    meta = _meta(config)
    weights, n_params = _weights(meta, e, quantization)
    inner = meta.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    notes = []

    # what trains, in the dtype it trains in
    trained: list = []  # (elements, bytes per element, frees that many weight bytes)
    if prof.lora_r:
        trained.append((_lora_parameters(meta, prof.lora_r), 4, 0))
    proj = count(inner.multi_modal_projector)
    if prof.projector == "sine":  # ΔW1, ΔW2 (fp32) and the biases (fp32); W stays frozen
        biases = sum(p.numel() for n, p in inner.multi_modal_projector.named_parameters() if n.endswith("bias"))
        trained.append((proj, 4, biases * e))
    elif prof.projector == "fp32":  # train_in_fp32: the projector itself becomes fp32 (in a half model)
        trained.append((proj, 4, proj * e))
    elif prof.projector == "model" and not prof.vision:
        trained.append((proj, e, proj * e))
    if prof.llm:
        llm = count(inner.language_model) + count(meta.lm_head)
        if quantization:
            raise MemoryEstimateError(f"{m.name} with params={m.params} trains the 4-bit weights themselves; "
                                      "use params=lora, or no quantization")
        trained.append((llm, e, llm * e))
    if prof.vision and m.name == "nullspace-cvf":
        from mlunlearn.methods.nullspace import visual_linears

        lin = sum(mod.weight.numel() for mod in visual_linears(meta).values())
        trained.append((lin, e, lin * e))
    elif prof.vision:
        vis = count(inner.vision_tower)
        trained.append((vis, e, vis * e))
    if prof.cagul_hidden:
        h, k = s.hidden, prof.cagul_hidden
        trained.append((h * k + k + k + 1 + h * k + k + k * h + h, 4, 0))
    n_train = int(sum(n for n, _, _ in trained))
    trainable = sum(n * b for n, b, _ in trained)
    weights -= sum(freed for _, _, freed in trained)
    grads = trainable
    optimizer = 2 * trainable

    # activations of the streams trained with gradients
    tokens = batch_size * max_length
    image_tokens = batch_size * s.image_tokens
    activations = 0.0
    layer = decoder_layer_bytes(s, e, prof.lora_r)
    if prof.grad_through_llm:
        # per stream: every layer's saved tensors (or only its input, checkpointed) and the final norm's;
        # the streams computed before the last keep their logits and log-softmax ((e + 4)·V) until the
        # backward; the last stream adds the head's peak, or, checkpointed, the larger of the head's peak
        # and one recomputed layer (the recompute comes after the head's backward has freed it)
        stored = (e * s.hidden if gradient_checkpointing else layer) * s.layers * tokens
        backward = layer_backward_bytes(s, e, prof.lora_r) + (layer if gradient_checkpointing else 0)
        peak = max(head_bytes(s, e), backward)
        if prof.reference_forward:  # the reference's no-grad forward, while the trained stream's logits and
            # log-softmax are kept: its layers' working set, then its head
            peak = max(peak, (e + 4) * s.vocab + max(no_grad_layer_bytes(s, e), reference_head_bytes(s, e)))
        activations = prof.streams * stored + (prof.streams - 1) * (e + 4) * s.vocab * tokens + peak * tokens
        activations += prof.streams * (4 * s.hidden + 4) * tokens  # the final RMSNorm
        if prof.projector:  # the projector's input, GELU input and output, per visual token
            pe = 4 if prof.projector in ("fp32", "sine") else e
            activations += prof.streams * pe * (s.vision_width + 2 * s.hidden) * image_tokens
    if prof.vision:
        vis_tokens = (2 if m.name == "nullspace-cvf" else max(prof.streams, 1)) * batch_size * s.vision_tokens
        vl = vision_layer_bytes(s, e)
        if gradient_checkpointing:
            activations += s.vision_layers_used * e * s.vision_width * vis_tokens + vl * vis_tokens
        else:
            activations += s.vision_layers_used * vl * vis_tokens
        if m.name == "nullspace-cvf":  # the projector's activations (its weights train too)
            activations += 2 * e * (s.vision_width + 2 * s.hidden) * batch_size * s.image_tokens
    # reference: a second copy of the weights, or a snapshot of the non-LoRA trained tensors
    reference = 0.0
    if prof.separate_reference:
        # the engine loads it as the trained model was loaded (loading.load_settings): 4-bit beside a 4-bit model
        reference = _weights(meta, e, quantization)[0]
        notes.append("the reference folder is a second model, loaded as the trained one (4-bit if it is)")
    elif prof.reference_forward and not prof.cagul_hidden:
        reference = sum(n * b for n, b, _ in trained[1 if prof.lora_r else 0:])
    # what a method keeps besides
    extra = 0.0
    if prof.nullspace:
        from mlunlearn.methods.nullspace import visual_linears

        extra += sum(4 * mod.in_features ** 2 for mod in visual_linears(meta).values())
        notes.append("nullspace-cvf keeps one in x in fp32 projection per visual linear layer")
    if prof.mmunlearner:  # saliency ratio (fp32), bool mask, float mask in the trained dtype, per trained element
        extra += sum(n * (4 + 1 + b) for n, b, _ in trained)
    if prof.cagul_hidden:  # the selection pass's attention maps, every layer at once (eager, no grad)
        extra += s.layers * s.heads * max_length ** 2 * e * batch_size
    est = MemoryEstimate(str(model), m.name, dtype, quantization, batch_size, max_length, bool(gradient_checkpointing),
                         weights / GIB, trainable / GIB, grads / GIB, optimizer / GIB, activations / GIB,
                         reference / GIB, extra / GIB, n_train, n_params, notes)
    est._hparams = dict(hparams)
    return est


def estimate_eval(model: str = "llava-1.5-7b", dtype: str = "bf16", quantization: str | None = None,
                  batch_size: int = 8, max_length: int = 640, max_new_tokens: int = 50) -> MemoryEstimate:
    """Evaluation (greedy generation) at ``batch_size``: the weights, the KV cache of ``max_length`` +
    ``max_new_tokens`` positions (2·L·kv per token, in the compute dtype), and the prefill's largest
    transient (one decoder layer's q, k, v, attention output and MLP, and the last position's logits)."""
    config = model_config(model)
    s = shapes(config)
    _check(dtype, quantization, batch_size, max_length + max_new_tokens, s.image_tokens,
           config.text_config.max_position_embeddings)
    e = DTYPES[dtype]
    weights, n_params = _weights(_meta(config), e, quantization)
    positions = max_length + max_new_tokens
    kv = 2 * s.layers * s.kv_hidden * e * batch_size * positions
    prefill = batch_size * max_length * e * (2 * s.hidden + 2 * s.kv_hidden + 3 * s.intermediate)
    logits = batch_size * s.vocab * 4 * 2
    return MemoryEstimate(str(model), "eval", dtype, quantization, batch_size, max_length, False,
                          weights / GIB, 0.0, 0.0, 0.0, (prefill + logits) / GIB, 0.0, kv / GIB, 0, n_params,
                          ["extra = the KV cache"])


# -- the command line -----------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """Register ``mlunlearn memory``."""
    p = subparsers.add_parser(
        "memory", help="estimate a run's peak GPU memory without loading weights, and whether it fits a GPU",
        description="Estimate the peak GPU memory of an unlearning step (or of eval) from the model's config on "
                    "the meta device: weights, trainable tensors, gradients, AdamW states, activations, "
                    "reference; then one line per GPU: fits, or what to change. Default: the tiny model and "
                    "LLaVA-1.5-7B, GA.")
    p.add_argument("--model", action="append", default=None,
                   help="tiny, llava-1.5-7b, llava-1.5-13b, a llava-hf id or a model folder; repeat for several "
                        "(default: tiny and llava-1.5-7b)")
    p.add_argument("--method", default="ga", help="a registered method, or 'eval' for evaluation (default: ga)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per stream and step (default: 4)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence, the image tokens included (default: 640, or the model's positions "
                        "when fewer: 256 on the tiny model)")
    p.add_argument("--dtype", default="bf16", help="fp32, bf16 or fp16 (default: bf16)")
    p.add_argument("--quantization", default=None, help="4bit, or leave out")
    p.add_argument("--gradient-checkpointing", default=None,
                   help="on or off (default: the engine's for the model's family: on for LLaVA-1.5, off for tiny)")
    p.add_argument("--gpu", default=None, help=f"one of {', '.join(GPUS)} (default: all)")
    p.add_argument("--grid", action="store_true",
                   help="print README's table instead: 7B and 13B (or --model) x ga, npo, sineproject x bf16 / "
                        "4-bit x checkpointing off / on, fit per GPU")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter, e.g. --set lora_r=8 or --set params=lora+projector")
    p.set_defaults(run=main)


def main(args) -> int:
    """``mlunlearn memory``: the table of parts and one fit line per GPU; bad input is a one-line error."""
    import sys

    from mlunlearn.methods import MethodError

    try:
        lines = report(args)
    except (MemoryEstimateError, MethodError) as err:
        print(f"mlunlearn memory: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def report(args) -> list:
    """The lines ``mlunlearn memory`` prints for parsed ``args``."""
    from mlunlearn.cli import parse_settings

    checkpointing = {"on": True, "off": False, "none": None}.get(str(args.gradient_checkpointing).lower(), "bad")
    if checkpointing == "bad":
        raise MemoryEstimateError(f"--gradient-checkpointing {args.gradient_checkpointing!r}: use on or off")
    quantization = None if args.quantization in (None, "none") else args.quantization
    gpus = [args.gpu] if args.gpu else list(GPUS)
    for gpu in gpus:
        _usable(gpu)
    settings = parse_settings(args.settings)
    if args.grid:
        models = args.model or ["llava-1.5-7b", "llava-1.5-13b"]
        return [grid_table(grid(models, batch_size=args.batch_size, max_length=args.max_length or 640))]
    lines = []
    for model in args.model or ["tiny", "llava-1.5-7b"]:
        length = args.max_length
        if length is None:
            positions = model_config(model).text_config.max_position_embeddings
            length = min(640, positions - (50 if args.method == "eval" else 0))
        if args.method == "eval":
            est = estimate_eval(model, args.dtype, quantization, args.batch_size, length)
        else:
            est = estimate(model, args.method, args.dtype, quantization, args.batch_size, length,
                           checkpointing, **settings)
        lines += [est.table()] + [f"  {est.advice(gpu)}" for gpu in gpus]
    return lines


def grid(models=("llava-1.5-7b", "llava-1.5-13b"), methods=("ga", "npo", "sineproject"), batch_size: int = 4,
         max_length: int = 640) -> list:
    """``[(model, method, setting, estimate)]`` for README's "Will it fit?" table: bf16 and 4-bit, each with
    gradient checkpointing off and on ("ckpt")."""
    out = []
    for model in models:
        for method in methods:
            for label, ckpt, quant in (("bf16", False, None), ("bf16 + ckpt", True, None), ("4-bit", False, "4bit"),
                                       ("4-bit + ckpt", True, "4bit")):
                out.append((model, method, label, estimate(model, method, "bf16", quant, batch_size, max_length, ckpt)))
    return out


def grid_table(rows=None) -> str:
    """The "Will it fit?" table as Markdown: total GiB and fit per GPU."""
    rows = rows if rows is not None else grid()
    head = "| model | method | setting | total GiB | " + " | ".join(GPUS) + " |"
    lines = [head, "|" + "---|" * (4 + len(GPUS))]
    for model, method, label, est in rows:
        fits = " | ".join("fits" if est.fits(g) else "no" for g in GPUS)
        lines.append(f"| {model} | {method} | {label} | {est.total:.1f} | {fits} |")
    first = rows[0][3] if rows else None
    if first is not None:
        lines.append(f"\nbatch {first.batch_size} x {first.max_length} tokens (576 image tokens), LoRA r=16 on the "
                     f"LLM; usable GiB: {', '.join(f'{g} {v}' for g, v in GPUS.items())}")
    return "\n".join(lines)


__all__ = ["GPUS", "MemoryEstimate", "MemoryEstimateError", "estimate", "estimate_eval", "grid", "grid_table",
           "model_config"]
