"""Speed of our MLLMU-Bench evaluation against the official script's loop, on the tiny LLaVA and world.

The official ``eval.py`` asks one question at a time: for each question it runs the processor on that
one prompt (and image), ``model.generate(**inputs, max_new_tokens=50, do_sample=False)`` with batch 1,
decodes the whole output (``outputs[0][2:]``, special tokens skipped) and keeps the text after
``ASSISTANT:``. ``official_loop`` below does exactly that on the same prompts our protocol builds
(zero-shot: the prompts equal the official ones), and scores with the same rules. ``ours`` is
``mlunlearn.eval.protocol.evaluate`` at a given batch size (8, the CLI's default, and 64, the chapters'
and run records'). Runs are interleaved (official, ours-8, ours-64, official, ...), so that machine
noise hits them alike; each is reported by its median wall time and its median CPU time of this process
(one thread; the CPU time is what the shared machine's load does not inflate), and the ratios
official / ours. The replies and scores are compared too: ``replies_equal`` counts the questions where
our reply, after the scoring's own clean-up, is the official loop's, ``scores_equal`` those where every
score (accuracy, refusal, ROUGE, ...) is the same; a speed-up with different answers is no speed-up, so
any difference exits with status 1 and writes nothing.

    python benchmarks/eval_speed.py            # writes benchmarks/results/eval_speed.json
    python benchmarks/eval_speed.py --quick    # one mode, one repeat: a smoke run
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import timing  # benchmarks/timing.py (the script's folder is on sys.path): provenance()

HERE = Path(__file__).resolve().parent


@torch.inference_mode()
def official_loop(model, processor, queries, max_new_tokens: int = 50) -> tuple[list[str], list[dict]]:
    """The official per-question loop (batch 1), its reply extraction and scoring included; the replies and
    their scores."""
    from mlunlearn.data import decode_image

    tokenizer = processor.tokenizer
    replies, scores, opened = [], [], {}
    for query in queries:
        if query.images:  # the official script opens a person's image once per task; here once per run
            pictures = [opened.setdefault(id(image), decode_image(image)) for image in query.images]
            inputs = processor(images=pictures, text=query.prompt, return_tensors="pt")
        else:
            inputs = tokenizer(query.prompt, return_tensors="pt")
        outputs = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(outputs[0][2:], skip_special_tokens=True)
        reply = text.split("ASSISTANT:")[1].strip() if "ASSISTANT:" in text else text.strip()
        scores.append(query.score(reply))  # the official script scores each reply as it goes (our rules)
        replies.append(reply)
    return replies, scores


def main() -> None:
    parser = timing.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="forget mode only, one repeat")
    parser.add_argument("--repeats", type=timing.at_least(1), default=3)
    parser.add_argument("--modes", default="forget,test,retain_celebrity",
                        help="modes timed (default: all but retain_shared, whose 95 people would make each "
                             "official run several minutes long)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "eval_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from mlunlearn.data import open_benchmark
    from mlunlearn.eval.protocol import build_queries, evaluate
    from mlunlearn.eval.scoring import clean_reply
    from mlunlearn.models import load_model

    modes = ("forget",) if args.quick else tuple(m.strip() for m in args.modes.split(","))
    known = ("forget", "test", "retain_shared", "retain_celebrity")
    unknown = [m for m in modes if m not in known]
    if unknown:
        parser.error(f"--modes: unknown mode {unknown[0]!r}; use a comma-separated list of {', '.join(known)}")
    repeats = 1 if args.quick else args.repeats
    bench = open_benchmark("toyworld")
    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    model.eval()
    queries = build_queries(bench, 5, modes=modes)
    outputs = {}

    def official():
        outputs["official"] = official_loop(model, processor, queries)

    def ours(batch_size):
        def run():
            records = evaluate(model, processor, bench, 5, modes=modes, batch_size=batch_size).records
            outputs[f"ours_batch{batch_size}"] = [r.reply for r in records], [r.scores for r in records]
        return run

    steps = {"official": official, "ours_batch8": ours(8), "ours_batch64": ours(64)}
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for k, f in steps.items():  # warm-up (first-call costs: imports, allocations)
        f() if k != "official" else official_loop(model, processor, queries[:8])
    for _ in range(repeats):
        for k, f in steps.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    (official_replies, official_scores), ours_keys = outputs["official"], [k for k in steps if k != "official"]
    equal = {k: sum(clean_reply(a) == clean_reply(b) for a, b in zip(official_replies, outputs[k][0]))
             for k in ours_keys}
    same_scores = {k: sum(a == b for a, b in zip(official_scores, outputs[k][1])) for k in ours_keys}
    result = {
        "threads": torch.get_num_threads(),
        "model": "tiny (16 visual tokens, 4 decoder layers), toyworld, forget 5, zero-shot, max_new_tokens 50",
        "modes": list(modes),
        "questions": len(queries),
        "repeats": repeats,
        "median_wall_s": med_wall,
        "median_cpu_s": med_cpu,
        "ratio_official_over_ours_wall": {k: med_wall["official"] / med_wall[k] for k in steps if k != "official"},
        "ratio_official_over_ours_cpu": {k: med_cpu["official"] / med_cpu[k] for k in steps if k != "official"},
        "replies_equal": {k: f"{n}/{len(queries)}" for k, n in equal.items()},
        "scores_equal": {k: f"{n}/{len(queries)}" for k, n in same_scores.items()},
        **timing.provenance(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    differ = [k for k in ours_keys if equal[k] != len(queries) or same_scores[k] != len(queries)]
    if differ:
        sys.exit(f"error: {', '.join(differ)} answered differently from the official loop (replies_equal, "
                 "scores_equal above): not a like-for-like speed-up, nothing written")
    print(f"replies and scores identical to the official loop on all {len(queries)} questions")
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
