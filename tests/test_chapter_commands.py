"""The LLaVA-1.5 commands the chapters show (their ```bash blocks), checked so a reader can paste them.

In CI: every command parses with the real CLI parser, names a registered method, and its ``--set`` settings
are ones that method and the engine accept (a typo in a chapter fails here, not on a reader's GPU).

With ``MLUNLEARN_SLOW=1``: every ``unlearn``/``eval`` command also runs, at reduced size, on the 7B-shaped
model (llava-hf/llava-1.5-7b-hf's exact shapes, one layer per tower; tests/test_llava15_shaped.py) and a small
published-layout folder: the model name is swapped for that folder, the data for a local copy, ``runs/`` for a
temporary folder, one training step (batch 1), one item per evaluated file, and ``--quantization 4bit``
dropped (bitsandbytes 4-bit needs a GPU; the 4-bit loading arguments are tested in tests/test_gpu_path.py).

    MLUNLEARN_SLOW=1 .venv/bin/pytest -q tests/test_chapter_commands.py   # about 10 CPU minutes
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from mlunlearn.cli import build_parser, main, parse_settings

ROOT = Path(__file__).resolve().parent.parent
slow = pytest.mark.skipif(os.environ.get("MLUNLEARN_SLOW") != "1",
                          reason="runs every chapter command at 7B shapes: run with MLUNLEARN_SLOW=1")
GPU_MODELS = ("mllmu-vanilla-7b", "llava-hf/llava-1.5-7b-hf")


def chapter_commands() -> list[tuple[str, list[str]]]:
    """``(chapter, argv after "mlunlearn")`` for every ``mlunlearn`` command in the chapters' bash blocks
    (``accelerate launch ... -m mlunlearn ...`` included), in book order."""
    commands = []
    for path in sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] != "markdown":
                continue
            for block in re.findall(r"```bash\n(.*?)```", "".join(cell["source"]), re.S):
                for line in block.replace("\\\n", " ").splitlines():
                    words = shlex.split(line.replace("<folder>", "FOLDER"))
                    if "mlunlearn" in words:
                        commands.append((path.name[:2], words[words.index("mlunlearn") + 1:]))
    return commands


def test_the_chapters_show_their_gpu_commands():
    found = chapter_commands()
    chapters = {c for c, _ in found}
    assert {"02", "04", "05", "06", "08", "09", "10"} <= chapters, chapters
    assert all(argv[0] in ("unlearn", "eval", "bench") for _, argv in found), found


@pytest.mark.parametrize("chapter,argv", chapter_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_a_chapter_command_parses_and_its_settings_are_accepted(chapter, argv):
    from mlunlearn.bench import GridSpec
    from mlunlearn.engine import split_settings
    from mlunlearn.methods import get_method

    args = build_parser().parse_args(argv)  # a misspelt option exits here
    if argv[0] == "unlearn":
        assert args.model in GPU_MODELS, f"chapter {chapter} unlearns {args.model!r}, not a LLaVA-1.5 7B"
        hparams, _ = split_settings(parse_settings(args.settings), args.method)
        get_method(args.method, **hparams)  # an unknown or misspelt setting raises
    elif argv[0] == "bench":
        GridSpec(model=args.model, data=args.data, methods=args.methods, forget=args.forget, seeds=args.seeds,
                 settings=parse_settings(args.settings), mia=False if args.data == "mllmu-bench" else None)
    else:
        assert args.model.startswith("runs/"), "eval reads the run the command before it wrote"


def _reduced(argv: list[str], shaped: Path, mllmu: Path, safety: Path, tmp: Path) -> list[str]:
    """The command at test size: see the module docstring."""
    out, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--quantization":
            skip = True
            continue
        if word in GPU_MODELS:
            word = str(shaped)
        elif word == "mllmu-bench":
            word = f"mllmu-bench:{mllmu}"
        elif word == "safeeraser:FOLDER":
            word = f"safeeraser:{safety}"
        elif word.startswith("runs/") or word.endswith(".json") and argv[i - 1] == "--output":
            word = str(tmp / word)
        out.append(word)
    if argv[0] == "unlearn":
        # --overwrite: chapter 2 shows the same run twice (one process, then under accelerate)
        out += ["--set", "max_steps=1", "--set", "batch_size=1", "--set", "grad_accum=1", "--no-progress",
                "--overwrite"]
    elif argv[0] == "eval":
        out += ["--limit", "1", "--no-progress"]
    return out


@slow
def test_every_chapter_unlearn_and_eval_command_runs_at_reduced_size(tmp_path_factory, capsys):
    from test_bad_input import _small_configs
    from test_safety import write_safeeraser

    from mlunlearn.data import write_benchmark
    from mlunlearn.models import build_llava_1_5_shaped

    base = tmp_path_factory.mktemp("commands")
    shaped = base / "shaped"
    build_llava_1_5_shaped(shaped, "7b", text_layers=1, vision_layers=1, seed=0)
    configs = _small_configs()
    keep = {configs["forget_5"][0]["ID"], configs["retain_95"][0]["ID"]}
    configs = {k: [r for r in rows if r["ID"] in keep] if k != "Retain_Set" else rows[:1]
               for k, rows in configs.items()}
    configs["Full_Set"] = configs["forget_5"] + configs["retain_95"]  # MMUnlearner's text-only preserve set
    mllmu = write_benchmark(configs, base / "mllmu")
    safety = base / "safeeraser"
    write_safeeraser(safety, n_train=1, n_val=1)
    ran = 0
    for chapter, argv in chapter_commands():
        if argv[0] == "bench":  # a grid of 27 runs: its parts are the commands above
            continue
        code = main(_reduced(argv, shaped, mllmu, safety, base / chapter))
        assert code == 0, (chapter, argv, capsys.readouterr().err)
        ran += 1
    assert ran >= 12
