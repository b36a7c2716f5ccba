"""Step-time overhead of SineProject's sine-modulated projector against a plain additive ΔW.

The SineProject paper reports an overhead under 1%. What that ratio means depends on what the step
contains, so this measures two steps, each for the sine (W + sin(ω·ΔW)/ω) and the additive control
(W + ΔW), interleaved (A, B, A, B, ...) so that machine noise hits both alike, reporting median times
and their ratio:

- ``projector``: forward + backward + Adam step of the projector alone, at LLaVA-1.5-7B's size
  (1024 → 4096 → 4096) on one image's 576 tokens: the worst case, where the sine is a large share;
- ``tiny model``: one full unlearning step of the tiny LLaVA through the engine's loss (PO, LoRA on the
  LLM + the projector variant), batch 4: the sine's share of a real step.

    python benchmarks/sine_overhead.py          # writes benchmarks/results/sine_overhead.json
    python benchmarks/sine_overhead.py --quick
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import timing  # benchmarks/timing.py (the script's folder is on sys.path)
from torch import nn

HERE = Path(__file__).resolve().parent


def projector_step_fn(additive: bool, tokens: int = 576):
    from mlunlearn.methods.sineproject import SineLinear

    torch.manual_seed(0)
    layers = nn.ModuleDict({"linear_1": SineLinear(nn.Linear(1024, 4096), omega=30.0, additive=additive),
                            "linear_2": SineLinear(nn.Linear(4096, 4096), omega=30.0, additive=additive)})
    opt = torch.optim.Adam([p for p in layers.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(tokens, 1024)

    def step():
        y = layers["linear_2"](nn.functional.gelu(layers["linear_1"](x)))
        loss = y.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def tiny_step_fn(additive: bool):
    from mlunlearn.collate import collate
    from mlunlearn.data import open_benchmark
    from mlunlearn.data.unlearning import add_refusals, unlearning_data
    from mlunlearn.methods import get_method
    from mlunlearn.models import load_model

    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    method = get_method("sineproject", objective="po", additive=additive, omega=30.0)
    model = method.prepare(model).train()
    data = add_refusals(unlearning_data(open_benchmark("toyworld"), 5))
    batch = {"forget_refusal": collate(processor, data.forget_refusal[:4]),
             "retain": collate(processor, data.retain[:4])}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = method.loss(model, batch, None)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved(make, repeats: int, warmup: int = 3) -> dict:
    return timing.interleaved({"additive": make(True), "sine": make(False)}, repeats, warmup)


def main() -> None:
    ap = timing.OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", help="default: results/sine_overhead.json; --quick: none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps = 5 if args.quick else 30
    out = {"threads": 1, "projector (LLaVA-7B size, 576 tokens)": interleaved(projector_step_fn, reps),
           "tiny model step (PO + LoRA)": interleaved(tiny_step_fn, 4 * reps), **timing.provenance()}
    output = args.output or (None if args.quick else HERE / "results" / "sine_overhead.json")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(out, indent=1))
    for name, r in out.items():
        if isinstance(r, dict) and "median_s" in r:
            print(f"{name:40s} additive {r['median_s']['additive'] * 1e3:8.1f} ms  "
                  f"sine {r['median_s']['sine'] * 1e3:8.1f} ms  ratio {r['ratio_sine_over_additive']:.3f}")


if __name__ == "__main__":
    main()
