"""Does unlearning make LLaVA's projector ill-conditioned? Three Jacobians and a drift (book chapter 3).

LLaVA-1.5's projector is a two-layer MLP applied to each vision token on its own,

    F(x) = W2 · gelu(W1 x + b1) + b2         x: one patch feature (1024 dims for LLaVA-1.5-7B, 48 tiny)

SineProject (arXiv 2511.18444) argues that unlearning degrades the projector's conditioning, without saying
which Jacobian. This module measures three, plus how far the projector's outputs move:

1. the **input Jacobian per token**, J(x) = ∂F/∂x = W2 · diag(gelu'(W1 x + b1)) · W1 (out × in):
   :func:`token_jacobians`, :func:`singular_values`, :func:`spectrum_summary`;
2. the **weights** themselves: :func:`weight_conditioning`;
3. the **loss Jacobian w.r.t. the projector's parameters**, one row of per-example answer-NLL gradients
   per example (the Jacobian the optimiser sees): :func:`parameter_jacobian_conditioning`;
4. the **extreme singular values of J(x) without a full SVD** (LLaVA-1.5-7B's J is 4096 × 1024):
   :func:`estimate_spectrum`, :func:`extreme_singular_values`, :func:`compare_with_exact`;
5. the **cross-modal embedding drift** against a snapshot: :func:`snapshot_projector`, :func:`embedding_drift`;

and :class:`ProjectorMonitor`, a ``transformers.TrainerCallback`` recording all of it during a run, and
:class:`ProjectorMeasure`, chapter 3's measure of a model before and after each run.

Everything reads the projector's *effective* weights through :func:`effective_weight` (a plain
``nn.Linear``, a module exposing ``effective_weight()`` such as SineProject's ``W + sin(ω·ΔW)/ω``, or a
peft LoRA layer) and computes Jacobians by calling the projector module itself (``torch.func``), so the
same code measures a vanilla, a fine-tuned and a sine-modulated projector. Jacobians are taken in float32
at least (bf16/fp16 projectors are evaluated with float32 copies of their tensors), singular values in
float64. Nothing here writes ``.grad`` on a parameter or draws from the global random generator.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

# -- finding the projector and its effective weights ------------------------------------------------------


def _base_model(model):
    """The ``LlavaForConditionalGeneration`` inside a (peft-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_projector(model) -> nn.Module:
    """``model.model.multi_modal_projector`` of a LLaVA model, unwrapping a peft ``PeftModel`` first."""
    return _base_model(model).model.multi_modal_projector


def _is_lora_layer(module) -> bool:
    return hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _is_linear_like(module) -> bool:
    return hasattr(module, "effective_weight") or isinstance(module, nn.Linear) or _is_lora_layer(module)


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The matrix a linear-like layer applies, shape ``(out_features, in_features)``.

    ``layer.effective_weight()`` when the layer has it (SineProject's ``W + sin(ω·ΔW)/ω``); for a peft LoRA
    layer, the base weight plus its active, unmerged adapters' ``B·A·scale``; else ``layer.weight``.
    """
    if hasattr(layer, "effective_weight"):
        return layer.effective_weight()
    if _is_lora_layer(layer):
        weight = layer.base_layer.weight
        if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
            return weight  # merged: the deltas are already in the base weight; disabled: not applied
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name).to(weight.dtype)
        return weight
    return layer.weight


def projector_layers(projector: nn.Module) -> dict:
    """The projector's linear-like layers by name (``linear_1``, ``linear_2`` for LLaVA), outermost only.

    A layer wrapping others (a LoRA layer holding ``base_layer``, ``lora_A``...) counts once, as itself.
    """
    found: dict = {}
    for name, module in projector.named_modules():
        if name and _is_linear_like(module) and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return found


def _compute_dtype(projector: nn.Module) -> torch.dtype:
    dtype = next(projector.parameters()).dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # why: half Jacobians are noise


def _as_function(projector: nn.Module, dtype: torch.dtype | None = None):
    """``x ↦ projector(x)`` evaluated in ``dtype`` (the projector's tensors cast when they differ)."""
    dtype = dtype or _compute_dtype(projector)
    tensors = {**dict(projector.named_parameters()), **dict(projector.named_buffers())}
    if all(t.dtype == dtype for t in tensors.values() if t.is_floating_point()):
        return projector
    cast = {k: (t.detach().to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    return lambda x: torch.func.functional_call(projector, cast, (x,))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _flat(features: torch.Tensor, projector: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Features ``(..., in)`` as ``(N, in)`` in ``dtype`` on the projector's device."""
    return features.detach().reshape(-1, features.shape[-1]).to(device=_device(projector), dtype=dtype)


# -- 1. the input Jacobian per token ----------------------------------------------------------------------


@torch.no_grad()
def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's patch features that LLaVA feeds its projector, ``(n_images, n_tokens, in)``.

    The hidden states of ``config.vision_feature_layer`` (concatenated when it is a list), the CLS token
    dropped under the ``default`` selection strategy: ``(n, 16, 48)`` tiny, ``(n, 576, 1024)`` LLaVA-1.5.
    """
    base = _base_model(model)
    tower, config = base.model.vision_tower, base.config
    pixel_values = pixel_values.to(device=_device(tower), dtype=next(tower.parameters()).dtype)
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    layer = config.vision_feature_layer
    feats = torch.cat([hidden[i] for i in layer], -1) if isinstance(layer, (list, tuple)) else hidden[layer]
    if getattr(config, "vision_feature_select_strategy", "default") == "default":
        feats = feats[:, 1:]  # LLaVA drops the CLS token before projecting
    return feats


def token_jacobians(projector: nn.Module, features: torch.Tensor, mode: str = "rev",
                    chunk_size: int | None = None) -> torch.Tensor:
    """J(x) = ∂projector(x)/∂x for every token feature, shape ``(N, out, in)``.

    ``features``: ``(N, in)`` or ``(n_images, n_tokens, in)`` (flattened to N = images × tokens). Each
    token's Jacobian is taken on its own (``vmap(jacrev)``): the projector acts token-wise, so the
    Jacobian of a whole image is block-diagonal and these are its blocks. ``mode="fwd"`` uses ``jacfwd``
    (fewer passes when in < out, as in LLaVA); ``chunk_size`` bounds memory (LLaVA-7B: 16 MB per J).
    """
    if mode not in ("rev", "fwd"):
        raise ValueError(f"mode={mode!r}: use 'rev' or 'fwd'")
    dtype = _compute_dtype(projector)
    f = _as_function(projector, dtype)
    x = _flat(features, projector, dtype)
    jac = torch.func.jacrev if mode == "rev" else torch.func.jacfwd
    with torch.no_grad(), warnings.catch_warnings():  # why no_grad: torch.func differentiates anyway
        # torch 2.13 scripts its forward-mode decompositions with the deprecated torch.jit.script on first use
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        return torch.func.vmap(jac(lambda t: f(t[None])[0]), chunk_size=chunk_size)(x)


def singular_values(jacobians: torch.Tensor) -> torch.Tensor:
    """Singular values of each matrix, descending, float64: ``(N, out, in)`` → ``(N, min(out, in))``."""
    return torch.linalg.svdvals(jacobians.detach().double())


def effective_rank(svals: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli's effective rank, exp of the entropy of the L1-normalised singular values.

    ``svals (..., r)`` → ``(...)``; between 1 (one direction) and r (all singular values equal).
    """
    s = svals.double().clamp_min(0)
    p = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # 0·log 0 = 0
    return entropy.exp()


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp_min(torch.finfo(b.dtype).tiny), torch.full_like(a, math.inf))


def spectrum_summary(svals: torch.Tensor, k: int = 10) -> dict:
    """Conditioning of a set of per-token Jacobians from their singular values ``(N, r)`` (descending).

    Returns floats: ``cond_median``, ``cond_mean``, ``cond_max`` (σ1/σmin), ``sigma1_over_sigma{k}_median``,
    ``effective_rank_median``, ``sigma_max_median``, ``sigma_min_median`` and ``n_tokens``.

    Why three measures: GELU units far in the negative region have gelu' ≈ 0, so diag(gelu'(h)) nearly
    removes rows of W1 and σmin of J(x) can be tiny for reasons unrelated to training; the plain condition
    number σ1/σmin then reads a saturation artefact. σ1/σk (k = 10 by default) and the effective rank
    describe the bulk of the spectrum and are robust to a few near-zero singular values.
    """
    s = svals.detach().double()
    if s.ndim == 1:
        s = s[None]
    k = min(k, s.shape[-1])
    cond = _ratio(s[:, 0], s[:, -1])
    return {
        "cond_median": cond.median().item(),
        "cond_mean": cond.mean().item(),
        "cond_max": cond.max().item(),
        f"sigma1_over_sigma{k}_median": _ratio(s[:, 0], s[:, k - 1]).median().item(),
        "effective_rank_median": effective_rank(s).median().item(),
        "sigma_max_median": s[:, 0].median().item(),
        "sigma_min_median": s[:, -1].median().item(),
        "n_tokens": s.shape[0],
    }


# -- 2. the weights ---------------------------------------------------------------------------------------


@torch.no_grad()
def weight_conditioning(projector: nn.Module) -> dict:
    """Per linear layer of the projector, the spectrum of its effective weight matrix (float64 svdvals).

    ``{"linear_1": {"condition", "sigma_max", "sigma_min", "effective_rank", "shape"}, "linear_2": ...}``;
    the condition number is σ1/σmin over the min(out, in) singular values.
    LLaVA-1.5-7B's 4096 × 4096 ``linear_2`` takes seconds on a CPU.
    """
    out = {}
    for name, layer in projector_layers(projector).items():
        w = effective_weight(layer).detach()
        s = torch.linalg.svdvals(w.double())
        out[name] = {"condition": _ratio(s[0], s[-1]).item(), "sigma_max": s[0].item(), "sigma_min": s[-1].item(),
                     "effective_rank": effective_rank(s).item(), "shape": tuple(w.shape)}
    return out


# -- 3. the loss Jacobian w.r.t. the projector's parameters -----------------------------------------------


def _slice_batch(model, batch: dict, rows: int) -> dict:
    """The first ``rows`` examples of a collated batch (with the images they use)."""
    n = batch["input_ids"].shape[0]
    if rows >= n:
        return batch
    out = {k: (v[:rows] if k != "pixel_values" else v) for k, v in batch.items()}
    if "pixel_values" in batch:
        config = _base_model(model).config
        token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        if token is None:
            raise ValueError("cannot tell which images the first rows use: the config has no image_token_id")
        n_images = int((batch["input_ids"][:rows] == token).any(1).sum())  # one image per example, in order
        out["pixel_values"] = batch["pixel_values"][:n_images]
    return out


def parameter_jacobian_conditioning(model, batch: dict, max_rows: int = 32) -> dict:
    """Conditioning of the per-example loss Jacobian w.r.t. the projector's effective parameters.

    Row i is ∇ NLL_i, the gradient of example i's mean answer-token NLL (``mlunlearn.collate.answer_nll``)
    w.r.t. every effective weight and bias of the projector's linear layers, trainable or not: a
    ``(n_examples × n_params)`` matrix (the first ``max_rows`` examples of ``batch``).

    How: a zero matrix Z (and zero bias) is added to each layer through a forward hook,
    ``y = layer(x) + x Zᵀ + z``; since the layer is linear in its effective weight, ∂NLL/∂Z = ∂NLL/∂W_eff,
    whatever parametrises W_eff (plain, sine-modulated, LoRA). One forward, one backward per example;
    no parameter's ``requires_grad`` or ``.grad`` is touched; the model runs in eval mode (restored).

    Returns ``n_examples``, ``n_params``, ``singular_values`` (list, descending), ``condition`` (σ1/σmin),
    ``sigma_max``, ``sigma_min``, ``effective_rank`` and ``row_norms``. Singular values come from a float64
    SVD of the rows, or of their Gram matrix when the rows are large (LLaVA-7B: 21 M columns; then
    σ below ~1e-8·σ1 is not resolved).
    """
    from mlunlearn.collate import answer_nll

    projector = get_projector(model)
    layers = projector_layers(projector)
    batch = _slice_batch(model, batch, max_rows)
    device = _device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    zeros, hooks = [], []
    for layer in layers.values():
        w = effective_weight(layer)
        zw = torch.zeros(w.shape, device=w.device, dtype=torch.float32, requires_grad=True)
        has_bias = getattr(layer, "bias", None) is not None
        zb = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32, requires_grad=True) if has_bias else None
        zeros += [zw] + ([zb] if has_bias else [])

        def hook(module, args, output, zw=zw, zb=zb):
            x = args[0]
            extra = nn.functional.linear(x, zw.to(x.dtype), None if zb is None else zb.to(x.dtype))
            return output + extra.to(output.dtype)

        hooks.append(layer.register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    model.eval()  # why: dropout would make each row a different function
    try:
        with torch.enable_grad():
            nll = answer_nll(model, batch)
            rows = []
            for i in range(nll.shape[0]):
                grads = torch.autograd.grad(nll[i], zeros, retain_graph=i < nll.shape[0] - 1, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(z)).detach().flatten()
                                       for g, z in zip(grads, zeros)]))
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    jac = torch.stack(rows)  # (n_examples, n_params), float32
    if jac.numel() <= 2 ** 25:
        s = torch.linalg.svdvals(jac.double())
    else:  # why: a float64 copy of 32 × 21 M would be 5 GB; the Gram matrix is n × n
        gram = torch.zeros(jac.shape[0], jac.shape[0], dtype=torch.float64, device=jac.device)
        for c in range(0, jac.shape[1], 2 ** 20):
            block = jac[:, c:c + 2 ** 20].double()
            gram += block @ block.T
        s = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()
    return {"n_examples": jac.shape[0], "n_params": jac.shape[1], "singular_values": s.tolist(),
            "condition": _ratio(s[0], s[-1]).item(), "sigma_max": s[0].item(), "sigma_min": s[-1].item(),
            "effective_rank": effective_rank(s).item(), "row_norms": jac.double().norm(dim=1).tolist()}


# -- 4. extreme singular values without a full SVD --------------------------------------------------------


def _linear_maps(f, x: torch.Tensor):
    """Matrix-free ``v ↦ J v`` and ``u ↦ Jᵀ u`` of ``f`` at the rows of ``x`` (per row: f is token-wise).

    Jᵀu is ``torch.func.vjp`` of the projector at x. J v is the vjp of that vjp: u ↦ Jᵀu is linear, so its
    own vjp with cotangent v is (Jᵀ)ᵀ v = J v, exactly. Both reuse one recorded linearisation (one
    forward pass), so each product costs about one forward pass; ``torch.func.jvp`` recomputes the primal
    and was ~6× slower on LLaVA-7B's projector.
    """
    y, vjp_fn = torch.func.vjp(f, x)
    _, jvp_fn = torch.func.vjp(lambda u: torch.func.vjp(f, x)[1](u)[0], torch.zeros_like(y))
    return (lambda v: jvp_fn(v)[0]), (lambda u: vjp_fn(u)[0]), y.shape[-1]


def _reorthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w (N, d) minus its projection on the orthonormal rows of basis (N, j, d).

    Classical Gram-Schmidt, repeated once when a pass removed more than half of some w's norm ("twice is
    enough", Kahan–Parlett): one pass then cannot be trusted in float32, two can.
    """
    if basis.shape[1] == 0:
        return w
    for _ in range(2):
        before = w.norm(dim=1)
        w = w - torch.bmm(basis.transpose(1, 2), torch.bmm(basis, w[:, :, None]))[:, :, 0]
        if bool((w.norm(dim=1) > 0.5 * before).all()):
            break
    return w


def _ritz(alpha: torch.Tensor, beta: torch.Tensor):
    """Extreme Ritz singular values of the k × k upper-bidiagonal B and their residual bounds, (N, 2) each."""
    k = alpha.shape[1]
    b = torch.diag_embed(alpha) + (torch.diag_embed(beta[:, :k - 1], offset=1) if k > 1 else 0)
    x, s, _ = torch.linalg.svd(b)
    est = torch.stack([s[:, 0], s[:, -1]], 1)
    # why: for the Ritz triplet (σ, U_k x, V_k y), ‖Jᵀ U_k x − σ V_k y‖ = β_k |x_k|: a bound on |σ − σ_j(J)|
    res = beta[:, k - 1, None].abs() * torch.stack([x[:, -1, 0], x[:, -1, -1]], 1).abs()
    return est, res


def _golub_kahan(mv, rmv, x: torch.Tensor, m: int, iters: int, tol: float, seed: int):
    """Golub–Kahan–Lanczos bidiagonalisation of each token's J, batched over tokens; returns (est, info)."""
    n_tok, n = x.shape
    if m < n:  # why: run on Jᵀ so the Krylov side is the smaller dimension (σmin = the min(out,in)-th σ)
        mv, rmv, m, n = rmv, mv, n, m
    k_max = max(1, min(iters, n))
    gen = torch.Generator(device=x.device).manual_seed(seed)  # why: never touch the global RNG stream
    v = torch.randn(n_tok, n, generator=gen, device=x.device, dtype=x.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    basis = torch.zeros(n_tok, k_max, n, dtype=x.dtype, device=x.device)
    alpha = torch.zeros(n_tok, k_max, dtype=torch.float64, device=x.device)
    beta = torch.zeros_like(alpha)
    u_prev, prev, est, res, k, next_check = None, None, None, None, 0, 10
    for j in range(k_max):
        basis[:, j] = v
        u = mv(v)
        if j:
            u = u - beta[:, j - 1, None].to(u.dtype) * u_prev
        a = u.norm(dim=1)
        u = u / a.clamp_min(torch.finfo(u.dtype).tiny)[:, None]
        alpha[:, j] = a
        # why one-sided: re-orthogonalising the shorter V basis keeps both bases orthogonal enough
        # (Simon & Zha 2000) at a fraction of the cost of also storing and re-orthogonalising U
        w = _reorthogonalise(rmv(u) - a[:, None].to(u.dtype) * v, basis[:, :j + 1])
        b = w.norm(dim=1)
        beta[:, j] = b
        k = j + 1
        dead = b <= 1e-6 * alpha[:, :k].max(1).values.to(b.dtype)  # an invariant subspace: restart fresh
        if k < k_max and dead.any():
            fresh = torch.randn(n_tok, n, generator=gen, device=x.device, dtype=x.dtype)
            fresh = _reorthogonalise(fresh, basis[:, :k])
            w = torch.where(dead[:, None], fresh, w)
            beta[:, j] = torch.where(dead, torch.zeros_like(beta[:, j]), beta[:, j])
            b = torch.where(dead, w.norm(dim=1), b)
        v = w / b.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
        u_prev = u
        if k == k_max or k == next_check:
            next_check = k + max(10, k // 8)  # why: each check is an O(k³) SVD of B; keep their total O(k³)
            est, res = _ritz(alpha[:, :k], beta[:, :k])
            settled = prev is not None and bool(((est - prev).abs() <= tol * est).all())
            if settled and bool((res <= tol * est[:, :1]).all()):
                break
            prev = est
    return est, {"iterations": k, "residual": res}


def _gram_extremes(projector: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Exact σmax, σmin from eigvalsh of the min(out,in)-square Gram matrix in float64 (J formed, no SVD)."""
    out, n_out = [], _as_function(projector, x.dtype)(x[:1]).shape[-1]
    mode = "fwd" if x.shape[1] <= n_out else "rev"  # why: fewer passes along the smaller dimension
    for c in range(0, x.shape[0], chunk):
        jac = token_jacobians(projector, x[c:c + chunk], mode=mode).double()
        gram = jac.mT @ jac if jac.shape[-1] <= jac.shape[-2] else jac @ jac.mT
        lam = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        out.append(torch.stack([lam[:, -1], lam[:, 0]], 1))
    return torch.cat(out)


def estimate_spectrum(projector: nn.Module, features: torch.Tensor, iters: int = 300, tol: float = 1e-5,
                      method: str = "lanczos", seed: int = 0, return_info: bool = False):
    """σmax and σmin of each token's input Jacobian without a full SVD, ``(N, 2)`` float64.

    ``method="lanczos"`` (default, matrix-free): Golub–Kahan–Lanczos bidiagonalisation of J(x), started
    from a seeded random vector and batched over tokens, with J v and Jᵀ u from ``torch.func.vjp`` of the
    projector (J is never formed). Equivalent to Lanczos on JᵀJ (n = in_features) but without squaring
    the condition number. Each iteration costs two projector-sized matrix products per token (LLaVA-7B:
    ~2 × 21 M multiply-adds, matrix–matrix over the tokens of a batch); it stops after ``iters``
    iterations (at most min(out, in), where it is exact) or when both extremes moved less than ``tol``
    (relative) since the last check (every max(10, k/8) iterations) *and* their residual bounds are below
    ``tol``·σmax. The estimates are bounds from inside the spectrum: σmax from below, σmin from above.
    σmax converges in a few tens of iterations. σmin converges slowly when the bottom of the spectrum is a
    continuum (a random projector's soft edge: ~200-300 iterations on LLaVA-7B's size) and can stall near
    σ_{n-1} for a while, so a loose ``tol`` can stop early: check with :func:`compare_with_exact`.
    An isolated small singular value, the ill-conditioning this is meant to detect, converges fast.

    ``method="gram"``: exact, forms J(x) (``jacfwd``) and takes ``eigvalsh`` of the min(out,in)-square
    float64 Gram matrix instead of an SVD of J (rank J ≤ in_features); relative error ~1e-16·κ² on σmin.

    ``features``: ``(N, in)`` or ``(images, tokens, in)``. With ``return_info``, also
    ``{"iterations", "residual" (N, 2)}``.
    """
    dtype = _compute_dtype(projector)
    f = _as_function(projector, dtype)
    x = _flat(features, projector, dtype)
    with torch.no_grad():
        if method == "gram":
            est, info = _gram_extremes(projector, x, chunk=8), {"iterations": 0, "residual": None}
        elif method == "lanczos":
            mv, rmv, m = _linear_maps(f, x)
            est, info = _golub_kahan(mv, rmv, x, m, iters, tol, seed)
        else:
            raise ValueError(f"method={method!r}: use 'lanczos' or 'gram'")
    est = est.double()
    return (est, info) if return_info else est


def extreme_singular_values(projector: nn.Module, x: torch.Tensor, iters: int = 300, tol: float = 1e-5,
                            method: str = "lanczos") -> tuple:
    """(σmax, σmin) of J(x) for one token feature ``x`` of shape ``(in,)``; see :func:`estimate_spectrum`."""
    est = estimate_spectrum(projector, x.reshape(1, -1), iters=iters, tol=tol, method=method)[0]
    return est[0].item(), est[1].item()


def compare_with_exact(projector: nn.Module, features: torch.Tensor, iters: int = 300, tol: float = 1e-5,
                       method: str = "lanczos") -> dict:
    """Relative errors of :func:`estimate_spectrum` against ``svdvals`` of the exact Jacobians.

    Returns ``estimate`` and ``exact`` ``(N, 2)`` (σmax, σmin), ``rel_error`` ``(N, 2)`` = |est − exact| /
    exact, their maxima ``sigma_max_rel_error`` and ``sigma_min_rel_error`` (floats) and ``iterations``.
    Use a subset of tokens: the exact path costs a full Jacobian and SVD per token.
    """
    est, info = estimate_spectrum(projector, features, iters=iters, tol=tol, method=method, return_info=True)
    s = singular_values(token_jacobians(projector, features))
    exact = torch.stack([s[:, 0], s[:, -1]], 1)
    rel = (est - exact).abs() / exact
    return {"estimate": est, "exact": exact, "rel_error": rel, "sigma_max_rel_error": rel[:, 0].max().item(),
            "sigma_min_rel_error": rel[:, 1].max().item(), "iterations": info["iterations"]}


# -- 5. cross-modal embedding drift -----------------------------------------------------------------------


def snapshot_projector(model) -> nn.Module:
    """A frozen deep copy (eval mode, no grad, no ``.grad``) of a LLaVA model's projector, or of a projector."""
    inner = getattr(_base_model(model), "model", None)
    projector = inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else model
    snap = copy.deepcopy(projector).eval().requires_grad_(False)
    for p in snap.parameters():
        p.grad = None
    return snap


@torch.no_grad()
def embedding_drift(reference_projector: nn.Module, projector: nn.Module, features: torch.Tensor) -> dict:
    """How far the projector's token embeddings moved from a reference's, on the same features.

    Returns floats: ``cosine`` (mean over tokens of cos(F(x), F0(x))), ``cosine_min``, and ``rel_change``
    (mean of ‖F(x) − F0(x)‖ / ‖F0(x)‖). Computed in float64 as cos = 1 − ½‖F/‖F‖ − F0/‖F0‖‖², which is
    exactly 1 for identical outputs and keeps 1 − cos accurate when the drift is small.
    """
    ref = _as_function(reference_projector)(_flat(features, reference_projector, _compute_dtype(reference_projector)))
    new = _as_function(projector)(_flat(features, projector, _compute_dtype(projector)))
    ref, new = ref.double(), new.to(ref.device).double()
    a = ref / ref.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    b = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = 1 - 0.5 * (a - b).pow(2).sum(-1)
    rel = (new - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
    return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(), "rel_change": rel.mean().item()}


# -- 6. a Trainer callback --------------------------------------------------------------------------------


class ProjectorMonitor(TrainerCallback):
    """Records the projector's conditioning and drift during a ``transformers.Trainer`` run.

    At train begin (after snapshotting the projector as the drift reference), every ``every`` optimiser
    steps and at train end (unless that step was just recorded), appends to ``self.history`` a flat dict:
    ``step``, ``event`` (begin / step / end), for ``g`` in retain, forget the :func:`spectrum_summary` of
    the input Jacobians of those images' tokens as ``{g}_{key}`` and the drift as ``{g}_drift_cosine``,
    ``{g}_drift_cosine_min``, ``{g}_drift_rel_change``; and :func:`weight_conditioning` as
    ``{layer}_{condition|sigma_max|sigma_min|effective_rank}``. :meth:`frame` gives a DataFrame.

    ``images_retain``, ``images_forget``: lists of PIL images (preprocessed once here). ``max_tokens``:
    measure that many evenly spaced tokens per image (LLaVA-7B: a 4096 × 1024 SVD per token); None = all.
    Measurements run without gradients, with the model in eval mode (every module's mode restored), and
    draw no random numbers, so the training run is unchanged by the monitor.
    """

    def __init__(self, images_retain, images_forget, processor, every: int = 10, k: int = 10,
                 max_tokens: int | None = None, chunk_size: int | None = None):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.pixel_values = {}
        for group, images in (("retain", list(images_retain)), ("forget", list(images_forget))):
            if images:
                self.pixel_values[group] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        self.every, self.k, self.max_tokens, self.chunk_size = every, k, max_tokens, chunk_size
        self.history: list = []
        self.reference: nn.Module | None = None

    # -- Trainer hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.reference = snapshot_projector(get_projector(model))
        self.record(model, state.global_step, "begin")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.record(model, state.global_step, "step")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.record(model, state.global_step, "end")

    # -- measuring -------------------------------------------------------------------------------------
    def record(self, model, step: int, event: str = "step") -> dict:
        """Measure ``model`` now and append the row (also returned)."""
        row = {"step": int(step), "event": event, **self.measure(model)}
        self.history.append(row)
        return row

    def measure(self, model) -> dict:
        """The flat dict of measurements for ``model`` (a LLaVA model, possibly peft-wrapped)."""
        base = _base_model(model)
        projector = get_projector(base)
        flags = {m: m.training for m in base.modules()}
        device = _device(projector)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        row: dict = {}
        base.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                for group, pixels in self.pixel_values.items():
                    feats = patch_features(base, pixels)
                    if self.max_tokens is not None and feats.shape[1] > self.max_tokens:
                        keep = torch.linspace(0, feats.shape[1] - 1, self.max_tokens).round().long().unique()
                        feats = feats[:, keep.to(feats.device)]
                    svals = singular_values(token_jacobians(projector, feats, chunk_size=self.chunk_size))
                    row.update({f"{group}_{k}": v for k, v in spectrum_summary(svals, self.k).items()})
                    if self.reference is not None:
                        drift = embedding_drift(self.reference, projector, feats)
                        row.update({f"{group}_drift_{k}": v for k, v in drift.items()})
                for layer, stats in weight_conditioning(projector).items():
                    row.update({f"{layer}_{k}": v for k, v in stats.items() if k != "shape"})
        finally:
            for m, flag in flags.items():
                m.training = flag
        return row

    def frame(self):
        """``self.history`` as a pandas DataFrame, one row per measurement."""
        import pandas as pd

        return pd.DataFrame(self.history)


# -- 7. before and after a run (chapter 3's compare measure) ----------------------------------------------


def median_spectrum(model, processor, images):
    """The median over the tokens of ``images`` of the projector's input-Jacobian singular values
    (descending, a float64 numpy array of ``min(out, in)`` values)."""
    import numpy as np

    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    feats = patch_features(model, pixels.to(model.device))
    svals = singular_values(token_jacobians(get_projector(model), feats))
    return np.median(svals.cpu().numpy(), 0)


class ProjectorMeasure:
    """A ``measure`` for :func:`mlunlearn.experiments.compare` (book chapter 3): called on the vanilla
    model, then on each unlearned one, it appends :func:`median_spectrum` of ``images`` to
    ``self.spectra`` and returns the loss Jacobian's condition number and effective rank
    (:func:`parameter_jacobian_conditioning` on ``collate(processor, examples)``) as the row's
    ``loss-J cond`` and ``loss-J eff. rank``. A ``compare`` run record with a ``measure`` spec
    (:func:`mlunlearn.records.compare_key`) computes it and keeps the spectra."""

    def __init__(self, processor, images, examples):
        self.processor, self.images, self.examples = processor, list(images), list(examples)
        self.spectra: list = []

    def __call__(self, model) -> dict:
        from mlunlearn.collate import collate

        self.spectra.append(median_spectrum(model, self.processor, self.images))
        loss_j = parameter_jacobian_conditioning(model, collate(self.processor, self.examples))
        return {"loss-J cond": loss_j["condition"], "loss-J eff. rank": loss_j["effective_rank"]}
