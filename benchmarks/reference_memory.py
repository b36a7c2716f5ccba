"""Peak memory of KL and NPO (which need the frozen reference model) against GA (which does not).

Each method runs in a fresh process on a randomly initialised LLaVA large enough (by default ~150 M
parameters, 0.6 GB in fp32) that a second copy of the weights would stand out; peak resident memory is
read from the OS (``ru_maxrss``) on CPU or ``torch.cuda.max_memory_allocated`` on a GPU. Ratios against GA
measured in the same run are what to compare; the absolute numbers depend on the machine.

    python benchmarks/reference_memory.py            # writes benchmarks/results/reference_memory.json
    python benchmarks/reference_memory.py --quick    # a smaller model, for a smoke test

"copy" rows make the reference a deep copy (what a naive implementation does), to show what is saved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(method: str, params: str, width: int, layers: int, copy_reference: bool) -> dict:
    import copy
    import resource

    import torch

    torch.set_num_threads(1)
    from mlunlearn.data import open_benchmark
    from mlunlearn.engine import UnlearnConfig, unlearn
    from mlunlearn.models import TinySizes, build_processor, build_tiny_llava
    from mlunlearn.models.loading import load_model

    _, tiny_processor = load_model("tiny", device="cpu")
    sizes = TinySizes(text_width=width, text_layers=layers, text_heads=8, text_mlp=4 * width)
    tokenizer = tiny_processor.tokenizer
    model = build_tiny_llava(tokenizer, sizes, seed=0)
    processor = build_processor(tokenizer, sizes)
    bench = open_benchmark("toyworld")
    if copy_reference:  # a naive reference: a full second model
        from mlunlearn.methods.params import Parametrisation

        original = Parametrisation.reference

        def copying(self, trained, separate=None):
            return original(self, trained, copy.deepcopy(trained).eval())

        Parametrisation.reference = copying
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
    cfg = UnlearnConfig(lr=1e-4, max_steps=6, batch_size=4, progress=False)
    unlearn(model, bench, 5, method, cfg, processor=processor, params=params)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(p.numel() for p in model.parameters())
    return {"method": method, "params": params, "copy_reference": copy_reference, "parameters": n,
            "peak_bytes": peak, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    ap = timing.OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--output", help="default: results/reference_memory.json; --quick: none")
    args = ap.parse_args()
    if args.child:
        m, p, w, l, c = args.child
        print(json.dumps(child(m, p, int(w), int(l), c == "1")))
        return
    width, layers = (256, 2) if args.quick else (1024, 12)
    runs = [("ga", "lora", 0), ("kl", "lora", 0), ("npo", "lora", 0), ("npo", "lora", 1),
            ("ga", "llm", 0), ("npo", "llm", 0), ("npo", "llm", 1)]
    rows = []
    for m, p, c in runs:
        out = subprocess.run([sys.executable, __file__, "--child", m, p, str(width), str(layers), str(c)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    for r in rows:
        base = next(x for x in rows if x["method"] == "ga" and x["params"] == r["params"])
        r["ratio_vs_ga"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
    import timing  # benchmarks/timing.py (the script's folder is on sys.path)

    output = args.output or (None if args.quick else HERE / "results" / "reference_memory.json")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"width": width, "layers": layers, "runs": rows, **timing.provenance()},
                                           indent=1))
    print(f"{'method':8} {'params':6} {'reference':10} {'peak MB':>9} {'vs GA':>6}")
    for r in rows:
        ref = "deep copy" if r["copy_reference"] else "shared"
        print(f"{r['method']:8} {r['params']:6} {ref:10} {r['peak_bytes'] / 2**20:9.0f} {r['ratio_vs_ga']:6.2f}")


if __name__ == "__main__":
    main()
