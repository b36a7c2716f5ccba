"""Extreme singular values of LLaVA-1.5-7B's per-token projector Jacobian: estimator vs exact SVD.

The projector is randomly initialised at LLaVA-1.5-7B's size (linear_1 1024→4096, GELU, linear_2
4096→4096, ``nn.Linear``'s default init) and fed random patch features, N(0, σ²) per coordinate
(``--feature-scale``; with σ = 1 the GELU pre-activations have std ≈ 0.6, inside GELU's curved region).
On the same tokens and in the same run it times, per token:

- ``exact_jacrev``: ``token_jacobians`` (``vmap(jacrev)``, the book's exact path) + float64 ``svdvals``;
- ``exact_jacfwd``: the same with ``jacfwd`` (in < out: 1024 forward passes instead of 4096 backward);
- ``gram``: J formed with ``jacfwd``, then ``eigvalsh`` of the 1024 × 1024 float64 Gram matrix (exact);
- ``lanczos``: the matrix-free Golub–Kahan–Lanczos estimator (J never formed), stopping at ``--tol``;
- ``lanczos@K``: the same with exactly K iterations (``--fixed-iters``);
- ``lanczos[B tok]``: the estimator run on a batch of B tokens at once (``--batch-tokens``; the first
  ``--tokens`` of them are the measured ones, its errors are on those): the estimator's products are
  matrix–matrix over tokens, so its cost per token falls with the batch, while the exact paths pay a
  full Jacobian and decomposition per token whatever the batch,

and reports each one's speed-up over the exact paths and its relative errors on σmax and σmin against
``exact_jacrev``. Absolute times depend on the machine; compare the ratios.

    python benchmarks/jacobian_estimator.py            # 8 (+64 batched) tokens, ~2 minutes, one thread
    python benchmarks/jacobian_estimator.py --quick    # 2 (+8 batched) tokens, < 1 minute
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

import timing  # benchmarks/timing.py (the script's folder is on sys.path): provenance()

HERE = Path(__file__).resolve().parent


class Projector(nn.Module):
    """LLaVA's ``LlavaMultiModalProjector`` shape: linear_1, GELU, linear_2."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    parser = timing.OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tokens: a smoke run (< 1 minute)")
    parser.add_argument("--tokens", type=timing.at_least(1), default=8, help="tokens measured by every path")
    parser.add_argument("--iters", type=timing.at_least(1), default=400, help="maximum Lanczos iterations")
    parser.add_argument("--tol", type=float, default=1e-5, help="Lanczos stopping tolerance (relative)")
    parser.add_argument("--batch-tokens", type=timing.at_least(1), default=64,
                        help="tokens in the batched estimator run")
    parser.add_argument("--fixed-iters", type=int, nargs="*", default=[50, 150], help="extra fixed-length runs")
    parser.add_argument("--feature-scale", type=float, default=1.0)
    parser.add_argument("--sizes", type=int, nargs=3, default=[1024, 4096, 4096], metavar=("IN", "HIDDEN", "OUT"))
    parser.add_argument("--threads", type=timing.at_least(1), default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="default: results/jacobian_estimator.json; --quick: none")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.fixed_iters, args.batch_tokens = 2, [50], 8
    output = args.output or (None if args.quick else HERE / "results" / "jacobian_estimator.json")

    torch.set_num_threads(args.threads)
    from mlunlearn.analysis import estimate_spectrum, singular_values, token_jacobians

    torch.manual_seed(args.seed)
    projector = Projector(*args.sizes).requires_grad_(False)
    x_batch = torch.randn(max(args.tokens, args.batch_tokens), args.sizes[0]) * args.feature_scale
    x = x_batch[:args.tokens]

    # exact paths, one token at a time (a 4096 × 1024 Jacobian is 16 MB; its jacrev intermediates 64 MB)
    exact, per_token = {}, {}
    for mode in ("rev", "fwd"):
        svals, total = [], 0.0
        for i in range(args.tokens):
            s, dt = timed(lambda: singular_values(token_jacobians(projector, x[i:i + 1], mode=mode)))
            svals.append(s[0])
            total += dt
        s = torch.stack(svals)
        exact[mode] = torch.stack([s[:, 0], s[:, -1]], 1)
        per_token[f"exact_jac{mode}"] = (exact[mode], total / args.tokens, None)
    reference = exact["rev"]

    est, dt = timed(lambda: estimate_spectrum(projector, x, method="gram"))
    per_token["gram"] = (est, dt / args.tokens, None)
    (est, info), dt = timed(lambda: estimate_spectrum(projector, x, iters=args.iters, tol=args.tol,
                                                      return_info=True))
    per_token["lanczos"] = (est, dt / args.tokens, info["iterations"])
    for k in args.fixed_iters:
        (est, info), dt = timed(lambda: estimate_spectrum(projector, x, iters=k, tol=0.0, return_info=True))
        per_token[f"lanczos@{k}"] = (est, dt / args.tokens, info["iterations"])
    if args.batch_tokens > args.tokens:
        (est, info), dt = timed(lambda: estimate_spectrum(projector, x_batch, iters=args.iters, tol=args.tol,
                                                          return_info=True))
        per_token[f"lanczos[{len(x_batch)} tok]"] = (est[:args.tokens], dt / len(x_batch), info["iterations"])

    rows = []
    base_rev, base_fwd = per_token["exact_jacrev"][1], per_token["exact_jacfwd"][1]
    for name, (est, seconds, iterations) in per_token.items():
        rel = ((est - reference).abs() / reference).max(0).values
        rows.append({"path": name, "seconds_per_token": round(seconds, 4), "iterations": iterations,
                     "speedup_vs_exact_jacrev": round(base_rev / seconds, 2),
                     "speedup_vs_exact_jacfwd": round(base_fwd / seconds, 2),
                     "sigma_max_rel_error": float(f"{rel[0].item():.3g}"),
                     "sigma_min_rel_error": float(f"{rel[1].item():.3g}")})
    result = {
        "what": "per-token input Jacobian of a random LLaVA-1.5-7B-size projector: extreme singular values",
        "sizes": {"in": args.sizes[0], "hidden": args.sizes[1], "out": args.sizes[2]},
        "tokens": args.tokens, "batch_tokens": len(x_batch), "feature_scale": args.feature_scale,
        "lanczos_max_iters": args.iters,
        "lanczos_tol": args.tol, "threads": args.threads, "quick": args.quick, "seed": args.seed,
        "exact_sigma": reference.tolist(),
        "exact_condition_median": (reference[:, 0] / reference[:, 1]).median().item(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "rows": rows, **timing.provenance(),
    }
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1))

    print(f"{args.tokens} tokens, J is {args.sizes[2]} x {args.sizes[0]}, median condition "
          f"{result['exact_condition_median']:.3g}, {args.threads} thread(s)")
    print(f"{'path':<17}{'s/token':>10}{'iters':>7}{'x jacrev':>10}{'x jacfwd':>10}{'err smax':>11}{'err smin':>11}")
    for r in rows:
        print(f"{r['path']:<17}{r['seconds_per_token']:>10.3f}{str(r['iterations'] or '-'):>7}"
              f"{r['speedup_vs_exact_jacrev']:>10.2f}{r['speedup_vs_exact_jacfwd']:>10.2f}"
              f"{r['sigma_max_rel_error']:>11.2e}{r['sigma_min_rel_error']:>11.2e}")
    print(f"wrote {output}" if output else "(--quick: nothing written)")
    return result


if __name__ == "__main__":
    main()
