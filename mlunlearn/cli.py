"""The ``mlunlearn`` command line.

    mlunlearn eval --model tiny --data toyworld --forget 5 --output results.json
    mlunlearn eval --model tiny-safety --data toyworld-safety --output safety.json
    mlunlearn methods
    mlunlearn unlearn --model tiny --data toyworld --forget 5 --method npo --set lr=1e-3 --output runs/npo
    mlunlearn bench --model tiny --data toyworld --methods ga,npo --forget 5,10 --seeds 0,1 --output bench/ga-npo

Subcommands are registered in :func:`build_parser`; each has a ``run(args)`` function. Errors a user can
fix (a bad model path, a missing config or column, an unreadable image) print one line on stderr and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse with the package's error format: one line on stderr, exit status 2 (argparse prints the whole
    usage first, ten lines for ``bench``, which buries the error); the line says where the full usage is.
    The scripts in ``benchmarks/`` use it too."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def _add_model_and_data(p) -> None:
    """``--model``, ``--data`` and ``--forget``, as ``eval`` and ``unlearn`` take them."""
    p.add_argument("--model", default="tiny",
                   help="'tiny', 'tiny-safety', a Hugging Face id, or a local model folder (default: tiny)")
    p.add_argument("--data", default="toyworld",
                   help="toyworld | mllmu-bench | mllmu-bench:<folder> | <folder>, a safety benchmark: "
                        "toyworld-safety | safeeraser:<folder> | vlguard:<folder>, or CLEAR: clear | "
                        "clear:<folder> (default: toyworld)")
    p.add_argument("--forget", type=int, default=None, choices=(5, 10, 15),
                   help="forget percentage (MLLMU-Bench; default: 5). The safety benchmarks have none: they forget "
                        "every harmful item of their train file")


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on MLLMU-Bench's four modes (forget, test, retain, celebrity) or a safety benchmark",
        description="Run MLLMU-Bench's official evaluation protocol and write its result JSON; on a safety "
                    "benchmark, write ASR, RR, SARR (%) and ROUGE-L precision for each of its files.",
    )
    _add_model_and_data(p)
    p.add_argument("--output", default="results.json", help="result JSON, official format (default: results.json)")
    p.add_argument("--records", default=None, help="also write every question and reply to this JSON-lines file")
    p.add_argument("--batch-size", type=_positive, default=8, help="prompts per generate() call (default: 8)")
    p.add_argument("--max-new-tokens", type=_positive, default=50, help="reply length cap in tokens (default: 50)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="keep the first N questions of each mode, task and modality (quick runs; safety "
                        "benchmarks: the first N items of each file)")
    p.add_argument("--few-shot", action="store_true",
                   help="prepend the official few-shot examples: every question of 1 sampled person (classification) "
                        "or 2 (cloze), those people left out of the scores")
    p.add_argument("--benign", default=None, metavar="PATH",
                   help="also measure benign-question accuracy and refusal rate; write them to PATH")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed for the test-view and one-shot choices, and for sampled safety replies (default: 0)")
    clear = p.add_argument_group("CLEAR (clear, clear:<folder>; --forget 5 or 10 reads forget05 or forget10)")
    clear.add_argument("--gold", default=None, metavar="RESULT",
                       help="the CLEAR result JSON of a model trained on the retain set only; with it, forget "
                            "quality (KS p-value, 1 - JS) is computed")
    safety = p.add_argument_group("safety benchmarks (toyworld-safety, safeeraser:, vlguard:)")
    safety.add_argument("--samples", type=_positive, default=None,
                        help="replies per harmful question: 1 = greedy (default), 3 = SafeEraser's seeded sampling")
    safety.add_argument("--judge", default=None,
                        help="'rule' (default: the offline rule-based judge) or a Hugging Face chat model id or "
                             "folder to judge replies with (GPU)")
    safety.add_argument("--reference", default=None, metavar="MODEL",
                        help="score ROUGE-L precision against this model's greedy replies (default: the "
                             "dataset's own answers, as SafeEraser's script does)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.add_argument("--quantization", default=None, choices=("4bit",),
                   help="load the model (and a --reference model) in 4 bits (GPU; bitsandbytes)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads for torch (default: 1, the fastest for the tiny model; raise it for a "
                        "large model on a many-core CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run_eval)


def _add_methods(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list the registered unlearning methods",
                              description="List the registered unlearning methods, one line each.")
    p.add_argument("--verbose", action="store_true", help="also list each method's hyper-parameters and defaults")
    p.set_defaults(run=run_methods)


def _defaults_table() -> str:
    """Each method's engine defaults per model family, for --help and `methods --verbose`."""
    from mlunlearn.methods import METHODS
    from mlunlearn.methods.base import FAMILY_DEFAULTS

    lines = ["engine defaults (used for each setting you do not --set; recorded in run.json):"]
    for name in sorted(METHODS):
        parts = [f"{family}: " + ", ".join(f"{k}={v:g}" for k, v in METHODS[name].engine_defaults(family).items())
                 for family in FAMILY_DEFAULTS]
        lines.append(f"  {name:<12} " + "; ".join(parts))
    return "\n".join(lines)


def _add_unlearn(subparsers) -> None:
    p = subparsers.add_parser(
        "unlearn", help="unlearn a forget set with a registered method and save the result",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Unlearn forget_N with a method; write the model and run.json (config, seed, steps, "
                    "timings, loss curves) to --output.\nSettings are method hyper-parameters (see "
                    "`mlunlearn methods --verbose`) or engine settings (lr, epochs, max_steps, batch_size,\n"
                    "grad_accum, seed, precision, gradient_checkpointing, save_steps, resume, ...).\nThe tiny model "
                    "and LLaVA-1.5 have their own defaults:",
        epilog=_defaults_table() + "\n\ntiny: the rates and epochs tuned in the book's chapters 2 and 4; "
               "llava-1.5: MLLMU-Bench's published LLaVA-1.5-7B settings.")
    _add_model_and_data(p)
    p.add_argument("--method", required=True, help="a registered method (see `mlunlearn methods`)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter or engine setting; repeatable, e.g. --set lr=1e-3 --set beta=0.1; "
                        "--set pd=on adds SafeEraser's Prompt Decouple term at its weight for the method")
    p.add_argument("--output", required=True, help="folder for the model, checkpoints and run.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run an --output folder already holds (without it such a folder is refused)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.add_argument("--quantization", default=None, choices=("4bit",), help="load the model in 4 bits (GPU)")
    p.add_argument("--threads", type=_positive, default=1, help="CPU threads for torch (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run_unlearn)


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run and evaluate a grid of unlearning runs (methods x forget sizes x seeds), resumably",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Unlearn each cell of methods x forget sizes x seeds from a fresh copy of the model, evaluate "
                    "it as `eval` does, and write\nOUTPUT/runs/<method>/forget<f>_seed<s>/{run.json,result.json}; "
                    "also one `vanilla` evaluation per forget size. Then OUTPUT/leaderboard.csv\n(one row per "
                    "cell), leaderboard_mean.csv (mean and std over seeds) and tradeoff.png (forget vs retain).\n"
                    "Resumable: a cell with a result.json is done, so after a crash or kill the same command "
                    "computes only the rest.",
        epilog="Settings: an engine setting (--set lr=1e-3, max_steps, epochs, batch_size, ...) applies to every "
               "method;\na method's hyper-parameter is METHOD.KEY (--set npo.beta=0.2, --set po.pd=on), or a bare "
               "KEY when every\nlisted method takes it. Unset ones take each method's defaults (see `mlunlearn "
               "unlearn --help`).\n\nTime: the defaults (tiny, toyworld, ga and npo, forget 5, seed 0: three "
               "complete evaluations and two runs\nof 40 steps) took 4 minutes on one CPU core (150 s of CPU time; "
               "vanilla 18 s, ga 71 s, npo 129 s: an\nunlearned model's replies run to the 50-token cap). "
               "--limit 1 --set max_steps=1 is a smoke test of seconds per cell.\nMembership inference, relearning "
               "and benign questions (each on by default) add 4 s (vanilla), 13 s (ga) and\n15 s (npo) of CPU per "
               "cell on the tiny model; --no-mia --no-relearn --no-benign leave them out.")
    p.add_argument("--model", default="tiny",
                   help="'tiny', 'tiny-safety', a Hugging Face id, or a local model folder (default: tiny)")
    p.add_argument("--data", default="toyworld",
                   help="toyworld | mllmu-bench | mllmu-bench:<folder> | <folder>, or a safety benchmark: "
                        "toyworld-safety | safeeraser:<folder> | vlguard:<folder> (default: toyworld)")
    p.add_argument("--methods", default="ga,npo", help="comma-separated registered methods (default: ga,npo)")
    p.add_argument("--forget", default=None, metavar="LIST",
                   help="comma-separated forget percentages, of 5, 10, 15 (MLLMU-Bench; default: 5). The safety "
                        "benchmarks have none: they forget every harmful item of their train file")
    p.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated unlearning seeds (default: 0)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting for every method (max_steps=1), or METHOD.KEY=VALUE for one method "
                        "(npo.beta=0.2, po.pd=on); repeatable")
    p.add_argument("--output", required=True, help="folder for the grid (rerun the same command into it to resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the runs of another grid held by --output and start over")
    p.add_argument("--keep-models", action="store_true",
                   help="also save each unlearned model into its cell's folder (default: weights are not saved)")
    p.add_argument("--batch-size", type=_positive, default=8, help="prompts per generate() call (default: 8)")
    p.add_argument("--max-new-tokens", type=_positive, default=50, help="reply length cap in tokens (default: 50)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="evaluate the first N questions of each mode, task and modality (quick runs; safety "
                        "benchmarks: the first N items of each file)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.add_argument("--threads", type=_positive, default=1, help="CPU threads for torch (default: 1)")
    p.add_argument("--quantization", default=None, choices=("4bit",),
                   help="load every cell's model in 4 bits (GPU; a 7B grid on a T4)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    extra = p.add_argument_group("does it stay forgotten? (MLLMU-Bench-style data; each on where it applies)")
    extra.add_argument("--mia", action=argparse.BooleanOptionalAction, default=None,
                       help="membership-inference AUCs, forget vs held-out people (LOSS, zlib, Min-k%%, Min-k%%++; "
                            "default: on where the data has held-out people, e.g. toyworld)")
    extra.add_argument("--relearn", action=argparse.BooleanOptionalAction, default=None,
                       help="relearning attack: fine-tune on a slice of the forget people, evaluate the others "
                            "(default: on)")
    extra.add_argument("--relearn-steps", type=_positive, default=10, help="relearning steps (default: 10)")
    extra.add_argument("--relearn-fraction", type=float, default=0.2,
                       help="fraction of the forget people relearned on, at least one (default: 0.2)")
    extra.add_argument("--benign", action=argparse.BooleanOptionalAction, default=None,
                       help="benign visual questions: accuracy and refusal rate, and benign.png (default: on)")
    extra.add_argument("--benign-limit", type=_positive, default=40,
                       help="benign questions per image group and forget membership (default: 40)")
    p.set_defaults(run=run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mlunlearn", description="Machine unlearning for LLaVA-1.5.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_eval(subparsers)
    _add_methods(subparsers)
    _add_unlearn(subparsers)
    _add_bench(subparsers)
    from mlunlearn.memory import add_parser as _add_memory

    _add_memory(subparsers)
    return parser


def run_methods(args) -> int:
    """Print ``name  summary`` for each registered method."""
    from mlunlearn.methods import METHODS, describe

    width = max(len(n) for n, _ in describe())
    for name, summary in describe():
        print(f"{name:<{width}}  {summary}")
        if args.verbose:
            settings = ", ".join(f"{k}={v}" for k, v in METHODS[name].hyperparameters().items())
            print(f"{'':<{width}}  settings: {settings}")
    if args.verbose:
        print()
        print(_defaults_table())
    return 0


def parse_settings(pairs: list) -> dict:
    """``["lr=1e-3", "beta=0.1"]`` → ``{"lr": "1e-3", "beta": "0.1"}``; a malformed pair is a user error."""
    from mlunlearn.methods import MethodError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"--set {pair!r} is not KEY=VALUE (e.g. --set lr=1e-3)")
        out[key.strip()] = value.strip()
    return out


def run_unlearn(args) -> int:
    """Unlearn, save, and print where the run went."""
    from mlunlearn.benchmarks import get_benchmark
    from mlunlearn.benchmarks.safety import is_safety_source
    from mlunlearn.data import open_benchmark
    from mlunlearn.engine import UnlearnConfig, check_output, split_settings, unlearn
    from mlunlearn.methods import get_method
    from mlunlearn.models import load_model
    from mlunlearn.utils import is_main_process, set_seed

    method_kw, engine_kw = split_settings(parse_settings(args.settings), args.method)
    method = get_method(args.method, **method_kw)  # bad values fail before anything loads
    config = UnlearnConfig(**{**engine_kw, "progress": not args.no_progress and engine_kw.get("progress", True)})
    check_output(args.output, args.overwrite, config.resume)  # a folder that cannot take the run fails now
    _check_options(args)
    set_seed(config.seed, threads=args.threads)
    if is_safety_source(args.data):  # one forget request: every harmful item of the train file
        bench, forget = get_benchmark(args.data), "train"
        bench.unlearning_data(forget)  # a malformed file or a missing image fails before the model loads
    else:
        bench, forget = open_benchmark(args.data), 5 if args.forget is None else args.forget
    model, processor = load_model(args.model, device=args.device, quantization=args.quantization)
    result = unlearn(model, bench, forget, method, config, output=args.output, processor=processor,
                     overwrite=args.overwrite)
    if not is_main_process():  # a distributed launch: the first process wrote the folder and reports it
        return 0
    run = result.run
    applied = ", ".join(f"{k}={v:g}" for k, v in run["defaults"]["applied"].items())
    print(f"{run['method']}: {run['steps']} steps in {run['seconds']['total']} s, "
          f"{run['trainable_parameters']:,} trainable parameters"
          + (f" ({run['defaults']['family']} defaults: {applied})" if applied else "")
          + f"; wrote {args.output}/run.json and {args.output}/{run['saved']}")
    return 0


def run_eval(args) -> int:
    """Load the model, evaluate, write the JSON, print a summary table."""
    import pandas as pd

    from mlunlearn.benchmarks.safety import is_safety_source
    from mlunlearn.data import open_benchmark
    from mlunlearn.eval import evaluate, evaluate_benign
    from mlunlearn.eval.protocol import build_benign_queries, build_queries, check_images
    from mlunlearn.models import load_model
    from mlunlearn.utils import set_seed

    # Why first of all: an output that cannot be written must fail now, not after the whole evaluation.
    _check_outputs(args)
    _check_options(args)
    from mlunlearn.benchmarks.clear import is_clear_source, run_clear_eval

    if is_clear_source(args.data):
        return run_clear_eval(args)
    if args.gold:
        from mlunlearn.data import BenchmarkError

        raise BenchmarkError(f"--gold applies to CLEAR only (--data clear or clear:<folder>); drop it for "
                             f"--data {args.data}")
    if is_safety_source(args.data):
        return run_safety_eval(args)
    args.forget = 5 if args.forget is None else args.forget
    # Why one thread by default: with two, a tiny model's step times jump from ms to seconds.
    set_seed(args.seed, threads=args.threads)
    # Why first: a bad config, column or image should fail in a second, before the model loads.
    bench = open_benchmark(args.data)
    check_images(build_queries(bench, args.forget, limit=args.limit, few_shot=args.few_shot, seed=args.seed))
    if args.benign:
        check_images(build_benign_queries(bench, args.forget, limit=args.limit, seed=args.seed))
    model, processor = load_model(args.model, device=args.device, quantization=args.quantization)
    options = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                   seed=args.seed, progress=not args.no_progress)
    result = evaluate(model, processor, bench, args.forget, few_shot=args.few_shot, **options)
    path = result.save_json(args.output)
    if args.records:
        result.save_records(args.records)

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"MLLMU-Bench, {args.data}, forget {args.forget}%, model {args.model} "
              f"({len(result)} questions); accuracies in %, ROUGE-L as a fraction:")
        print(result.summary().round(3).to_string())
        if args.benign:
            benign = evaluate_benign(model, processor, bench, args.forget, **options)
            benign.save_json(args.benign)
            print("\nBenign questions (% of questions):")
            print(benign.summary().round(1).to_string())
            print(f"wrote {args.benign}")
    print(f"wrote {path}")
    return 0


def run_bench(args) -> int:
    """Run the grid (checked whole before any model loads), print the seed means and where files went."""
    from mlunlearn.bench import GridError
    from mlunlearn.utils import launched_processes

    if launched_processes() > 1:  # why: every process of the launch would run the whole grid into one folder
        raise GridError(f"bench runs its cells one after another in one process, and under a distributed launch "
                        f"({launched_processes()} processes) each would run the whole grid into the same --output; "
                        "fix: start one bench per GPU without accelerate (CUDA_VISIBLE_DEVICES=<i> mlunlearn bench "
                        "...), with disjoint --methods or --seeds, each into its own --output")
    import pandas as pd

    from mlunlearn.bench import GridSpec, printed_columns, run_grid, tradeoff_axes
    from mlunlearn.models.loading import check_device

    if args.device:
        check_device(args.device)  # a bad device fails now, before the grid starts
    spec = GridSpec(model=args.model, data=args.data, methods=args.methods, forget=args.forget, seeds=args.seeds,
                    settings=parse_settings(args.settings), limit=args.limit, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, mia=args.mia, relearn=args.relearn, benign=args.benign,
                    relearn_steps=args.relearn_steps, relearn_fraction=args.relearn_fraction,
                    benign_limit=args.benign_limit, quantization=args.quantization)
    out = args.output
    board = run_grid(spec, out, overwrite=args.overwrite, keep_models=args.keep_models, device=args.device,
                     threads=args.threads, progress=not args.no_progress)
    means = board.groupby(["method", "forget"], sort=False).mean(numeric_only=True).drop(columns="seed")
    if not spec.safety:  # the image questions and a few extras (everything is in the CSV files)
        means = means[printed_columns(means.columns)]
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        x, y = tradeoff_axes(spec.safety)
        print(f"bench {args.data}, model {args.model}, seeds {','.join(map(str, spec.seeds))}: mean over seeds "
              f"({'ASR, RR, SARR in %, ROUGE-L as a fraction' if spec.safety else 'accuracies in %, ROUGE-L as a fraction'}):")
        print(means.round(3).to_string())
    print(f"wrote {out}/leaderboard.csv, {out}/leaderboard_mean.csv, {out}/tradeoff.png ({x} vs {y}) and "
          f"{len(board)} cells under {out}/runs/")
    return 0


def _check_options(args) -> None:
    """Options that do not apply to the ``--data`` given are a one-line error, not silently ignored."""
    from mlunlearn.benchmarks.safety import is_safety_source
    from mlunlearn.data import BenchmarkError

    if is_safety_source(args.data):
        given = [f"--{name.replace('_', '-')}" for name in ("forget", "few_shot", "benign")
                 if getattr(args, name, None) not in (None, False)]
        if given:
            raise BenchmarkError(f"{' and '.join(given)} do{'es' if len(given) == 1 else ''} not apply to --data "
                                 f"{args.data}: a safety benchmark has no forget percentages (a run forgets every "
                                 "harmful item of its train file) and no MLLMU-Bench tasks; drop "
                                 f"{'it' if len(given) == 1 else 'them'}")
    else:
        given = [f"--{name}" for name in ("samples", "judge", "reference") if getattr(args, name, None) is not None]
        if given:
            raise BenchmarkError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to the safety "
                                 "benchmarks only (--data toyworld-safety, safeeraser:<folder>, vlguard:<folder>); "
                                 f"drop {'it' if len(given) == 1 else 'them'} for --data {args.data}")


def run_safety_eval(args) -> int:
    """``eval`` on a safety benchmark: ASR, RR, SARR (%) and ROUGE-L precision per file, as JSON."""
    import pandas as pd

    from mlunlearn.benchmarks import get_benchmark
    from mlunlearn.eval.protocol import check_images
    from mlunlearn.eval.safety import ModelJudge, RuleJudge, evaluate_safety
    from mlunlearn.models import load_model
    from mlunlearn.utils import set_seed

    set_seed(args.seed, threads=args.threads)
    bench = get_benchmark(args.data)
    # Why first: a malformed file or an unreadable image should fail in a second, before the model loads.
    for split in bench.files:
        queries = bench.queries(split, limit=args.limit)
        check_images([_ImageQuery(q) for q in queries])
    judge = RuleJudge() if args.judge in (None, "rule") else ModelJudge.from_pretrained(args.judge, device=args.device)
    model, processor = load_model(args.model, device=args.device, quantization=args.quantization)
    reference = (load_model(args.reference, device=args.device, quantization=args.quantization)
                 if args.reference else None)
    result = evaluate_safety(model, processor, bench, judge=judge, reference=reference, samples=args.samples or 1,
                             seed=args.seed, limit=args.limit, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    result.meta["model"] = args.model
    path = result.save_json(args.output)
    if args.records:
        result.save_records(args.records)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"{bench.name}, {args.data}, model {args.model}; ASR, RR, SARR in %, ROUGE-L precision as a fraction "
              f"({result.meta['decoding']}, judge {result.meta['judge']}):")
        print(result.summary().to_string())
    print(f"wrote {path}")
    return 0


class _ImageQuery:
    """A safety query seen as :func:`~mlunlearn.eval.protocol.check_images` expects one."""

    def __init__(self, query):
        self.images, self.source = [query.image], query.source


def _check_outputs(args) -> None:
    """Every file ``eval`` will write can be written, and no two of them are the same file."""
    from mlunlearn.utils import OutputPathError, check_writable

    outputs = {"--output": args.output, "--records": args.records, "--benign": args.benign}
    seen = {}
    for option, path in outputs.items():
        if path is None:
            continue
        resolved = check_writable(path, kind="file", what=option).resolve()
        if resolved in seen:
            raise OutputPathError(f"{seen[resolved]} and {option} are the same file ({path}); the second "
                                  "would overwrite the first; fix: give each its own file name")
        seen[resolved] = option


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete, one-line explanation with a fix."""
    from mlunlearn.data import BenchmarkError
    from mlunlearn.data.unlearning import UnlearningDataError
    from mlunlearn.engine import NonFiniteLossError, OutputFolderError
    from mlunlearn.methods import MethodError
    from mlunlearn.methods.params import TrainableStateError
    from mlunlearn.models import ModelLoadError
    from mlunlearn.utils import OutputPathError

    return (BenchmarkError, ModelLoadError, MethodError, UnlearningDataError, NonFiniteLossError,
            OutputPathError, OutputFolderError, TrainableStateError)


def at_least(minimum: int):
    """argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive = at_least(1)


def _integer(text: str) -> int:
    """``int(text)``, or argparse's one-line error naming the text (not "invalid _positive value")."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _seed(text: str) -> int:
    """argparse type: a seed NumPy accepts, 0 to 2**32 - 1."""
    value = _integer(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mlunlearn`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except _user_errors() as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mlunlearn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mlunlearn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
