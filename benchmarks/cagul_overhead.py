"""Inference overhead of CAGUL's modules against the bare model, on the tiny LLaVA.

CAGUL adds to every forward that carries an image: one more forward of the frozen model under eager
attention (to find the visual tokens the question attends to least), the discriminator on the mean
visual token and the encoder on k tokens. Under ``generate`` only the first pass carries the image (the
later ones read it from the KV cache), so the overhead shrinks with the reply's length. This measures,
interleaved (bare, CAGUL, bare, CAGUL, ...) so that machine noise hits both alike, median times and their
ratio for

- ``forward``: one teacher-forced forward of 8 image questions with their answers (what the probes and
  every training step's forward pay);
- ``generate``: greedy generation of 8 image questions, 20 new tokens, KV cache (what the evaluation pays).

The modules are untrained but their gate is forced open (discriminator bias +10), so the encoder runs on
every image as it does on a forget image; with the gate closed the selection pass is paid all the same.

    python benchmarks/cagul_overhead.py          # writes benchmarks/results/cagul_overhead.json
    python benchmarks/cagul_overhead.py --quick
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import timing  # benchmarks/timing.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent


def models_and_inputs(k: int):
    from mlunlearn.collate import collate
    from mlunlearn.data import open_benchmark
    from mlunlearn.data.unlearning import unlearning_data
    from mlunlearn.methods import get_method
    from mlunlearn.methods.cagul import cagul_modules, reply_marker
    from mlunlearn.models import load_model

    bare, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    cagul, _ = load_model("tiny", device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    cagul = get_method("cagul", k=k).prepare(cagul).eval()
    modules = cagul_modules(cagul)
    modules.set_marker(reply_marker(processor.tokenizer))
    with torch.no_grad():
        modules.discriminator[2].bias.fill_(10.0)  # gate open: the encoder runs on every image
        torch.nn.init.normal_(modules.encoder[2].weight, std=0.02)
    examples = unlearning_data(open_benchmark("toyworld"), 5).forget[:8]
    batch = {k: v for k, v in collate(processor, examples).items() if k != "labels"}
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = processor(text=[e.prompt for e in examples], images=[e.image for e in examples],
                        return_tensors="pt", padding=True)
    return {"bare": bare, "cagul": cagul}, batch, prompts, tokenizer.pad_token_id


def main() -> None:
    ap = timing.OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=timing.at_least(1), default=4, help="visual tokens transformed (default: 4 of 16)")
    ap.add_argument("--output", help="default: results/cagul_overhead.json; --quick: none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps = 5 if args.quick else 40
    from mlunlearn.methods import MethodError

    try:
        models, batch, prompts, pad = models_and_inputs(args.k)
    except MethodError as error:  # e.g. --k 17: more visual tokens than the tiny image has
        ap.error(f"--k {args.k}: {error}")

    def forward(model):
        @torch.no_grad()
        def run():
            model(**batch)
        return run

    def generate(model):
        @torch.no_grad()
        def run():
            model.generate(**prompts, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=pad)
        return run

    out = {"threads": 1, "k": args.k, "model": "tiny (16 visual tokens, 4 decoder layers)",
           "forward, 8 image questions with answers": timing.interleaved({k: forward(m) for k, m in models.items()},
                                                                         reps),
           "generate, 8 image questions, 20 new tokens": timing.interleaved({k: generate(m) for k, m in models.items()},
                                                                      max(3, reps // 4)),
           **timing.provenance()}
    output = args.output or (None if args.quick else HERE / "results" / "cagul_overhead.json")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(out, indent=1))
    for name, r in out.items():
        if isinstance(r, dict) and "median_s" in r:
            print(f"{name:45s} bare {r['median_s']['bare'] * 1e3:8.1f} ms  "
                  f"cagul {r['median_s']['cagul'] * 1e3:8.1f} ms  ratio {r['ratio_cagul_over_bare']:.2f}")


if __name__ == "__main__":
    main()
