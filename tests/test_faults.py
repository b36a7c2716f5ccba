"""The package under bad input and faults (issue 14): run folders that are partial, corrupt or moved (every
kind that saves ``trainable.safetensors``: CAGUL's modules-only folder, SineProject, MMUnlearner,
nullspace-cvf, an unmerged LoRA run), a bench cell damaged on disk, a bench grid killed by a real SIGKILL
and resumed, safety files the other tests do not cover, and a guard over every command's value options."""

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, needs_vanilla
from mlunlearn.cli import build_parser, main
from mlunlearn.data import BenchmarkError
from mlunlearn.engine import UnlearnConfig, unlearn
from mlunlearn.models import ASSET_DIR, ModelLoadError, load_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def _cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``mlunlearn *argv``, argparse's own exits included."""
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ run folders

KINDS = ("cagul", "sineproject", "mmunlearner", "nullspace-cvf", "ga")  # ga: LoRA saved unmerged


@pytest.fixture(scope="module")
def runs(vanilla, tmp_path_factory):
    """One finished one-step run per kind, saved unmerged (``trainable.safetensors`` + ``run.json``)."""
    model, processor = vanilla
    root = tmp_path_factory.mktemp("runs")
    config = UnlearnConfig(max_steps=1, merge=False, progress=False)
    out = {}
    for method in KINDS:
        unlearn(copy.deepcopy(model), "toyworld", 5, method, config, output=root / method, processor=processor)
        out[method] = root / method
    from mlunlearn.methods import get_method

    # k=8: more visual tokens than a 4-token base has
    unlearn(copy.deepcopy(model), "toyworld", 5, get_method("cagul", k=8), config, output=root / "cagul-k8",
            processor=processor)
    out["cagul-k8"] = root / "cagul-k8"
    return out


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    """Two bases the runs were not trained on, built like the tiny model: ``narrow`` (hidden size 64, not
    128) and ``coarse`` (patches of 24 pixels: 4 visual tokens per image, not 16)."""
    from transformers import AutoProcessor

    from mlunlearn.models.tiny import TinySizes, build_processor, build_tiny_llava

    tokenizer = AutoProcessor.from_pretrained(ASSET_DIR).tokenizer
    root = tmp_path_factory.mktemp("bases")
    for name, sizes in {"narrow": TinySizes(text_width=64, text_mlp=192), "coarse": TinySizes(patch_size=24)}.items():
        build_tiny_llava(tokenizer, sizes).save_pretrained(root / name)
        build_processor(tokenizer, sizes).save_pretrained(root / name)
    return root


def _copy(runs, kind, tmp_path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(runs[kind], folder)
    return folder


def _edit_run(folder, **changes) -> None:
    record = json.loads((folder / "run.json").read_text())
    record.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del record[key]
    (folder / "run.json").write_text(json.dumps(record))


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FAULTS = {  # what happens to a finished run folder, and the words of the one-line error
    "modules file missing": (lambda f: (f / "trainable.safetensors").unlink(),
                             ["has a run.json but neither model/ nor trainable.safetensors", "--overwrite"]),
    "modules file cut in half": (lambda f: _truncate(f / "trainable.safetensors"),
                                 ["trainable.safetensors is not a readable safetensors file", "overwrite"]),
    "modules file random bytes": (lambda f: (f / "trainable.safetensors").write_bytes(os.urandom(4096)),
                                  ["trainable.safetensors is not a readable safetensors file"]),
    "run.json cut in half": (lambda f: _truncate(f / "run.json"), ["run.json is unreadable", "--overwrite"]),
    "run.json not a run record": (lambda f: (f / "run.json").write_text("[1, 2]"),
                                  ["run.json is not a run record", "'model'"]),
    "run.json without its base": (lambda f: _edit_run(f, model=None), ["is not a run record", "no 'model'"]),
    "run.json without hyper-parameters": (lambda f: _edit_run(f, hyperparameters=None), ["no 'hyperparameters'"]),
    "base model moved away": (lambda f: _edit_run(f, model="/gone/away/tiny-vanilla"),
                              ["trained on the base model /gone/away/tiny-vanilla", "not there any more",
                               "run.json", '"tiny"']),
    "run.json lost": (lambda f: (f / "run.json").unlink(),
                      ["holds trainable.safetensors but no run.json", "names the base model"]),
}


@needs_vanilla
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_partial_or_corrupt_run_folder_is_a_one_line_load_error(runs, tmp_path, kind, fault):
    damage, needles = FAULTS[fault]
    folder = _copy(runs, kind, tmp_path)
    damage(folder)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), device="cpu", dtype=torch.float32)
    message = " ".join(str(err.value).split())
    for needle in needles:
        assert needle in message, message


@needs_vanilla
@pytest.mark.parametrize("fault", ["modules file cut in half", "base model moved away", "run.json not a run record"])
def test_eval_of_a_damaged_cagul_folder_is_a_one_line_error_before_any_evaluation(runs, tmp_path, capsys, fault):
    damage, needles = FAULTS[fault]
    folder = _copy(runs, "cagul", tmp_path)
    damage(folder)
    out = tmp_path / "result.json"
    code, _, err = _cli(capsys, "eval", "--no-progress", "--model", str(folder), "--limit", "1", "--output", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@needs_vanilla
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_loaded_on_a_base_of_another_hidden_size_names_the_base(runs, other_bases, tmp_path, kind):
    folder = _copy(runs, kind, tmp_path)
    _edit_run(folder, model=str(other_bases / "narrow"))
    with pytest.raises(ModelLoadError, match="another base model") as err:
        load_model(str(folder), device="cpu", dtype=torch.float32)
    assert "has shape" in str(err.value)


@needs_vanilla
def test_a_cagul_run_on_a_base_with_fewer_visual_tokens_than_its_k_is_refused(runs, other_bases, tmp_path, capsys):
    folder = _copy(runs, "cagul-k8", tmp_path)
    _edit_run(folder, model=str(other_bases / "coarse"))
    code, _, err = _cli(capsys, "eval", "--no-progress", "--model", str(folder), "--limit", "1",
                        "--output", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "cannot rebuild the run", "k=8: an image has only 4 visual tokens")


@needs_vanilla
def test_a_merged_run_without_its_run_json_points_at_its_model_folder(tmp_path, vanilla):
    model, processor = vanilla
    folder = tmp_path / "merged"
    unlearn(copy.deepcopy(model), "toyworld", 5, "ga", UnlearnConfig(max_steps=1, progress=False), output=folder,
            processor=processor)
    (folder / "run.json").unlink()
    with pytest.raises(ModelLoadError, match="holds a merged run's model/ but no run.json; fix: pass .*/model"):
        load_model(str(folder), device="cpu")
    loaded, _ = load_model(str(folder / "model"), device="cpu")  # the fix the message names works
    assert loaded is not None


# ------------------------------------------------------------------------------------------ bench cells

QUICK = ("--methods", "ga", "--seeds", "0", "--limit", "1", "--set", "max_steps=1", "--no-relearn", "--no-benign",
         "--no-progress")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A finished grid of two cells (vanilla, ga seed 0) with their MIA files."""
    out = tmp_path_factory.mktemp("bench") / "grid"
    assert main(["bench", *QUICK, "--output", str(out)]) == 0
    return out


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


DAMAGE = {  # a finished cell damaged on disk after the grid wrote it (its writes are atomic: a kill cannot)
    "result.json cut in half": ("result.json", lambda p: _truncate(p), "is unreadable"),
    "result.json emptied": ("result.json", lambda p: p.write_text(""), "is unreadable"),
    "result.json a JSON list": ("result.json", lambda p: p.write_text("[]"), "is not a JSON object"),
    "mia.json cut in half": ("mia.json", lambda p: _truncate(p), "is unreadable"),
    "run.json missing": ("run.json", lambda p: p.unlink(), "is missing"),
}


@needs_vanilla
@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_finished_cell_is_recomputed_not_reported_as_finished(grid, tmp_path, capsys, case):
    name, damage, reason = DAMAGE[case]
    out = tmp_path / "grid"
    shutil.copytree(grid, out, copy_function=shutil.copy2)
    cell, vanilla = out / "runs/ga/forget5_seed0", out / "runs/vanilla/forget5"
    expected = {n: (cell / n).read_bytes() for n in ("result.json", "mia.json")}
    untouched = _snapshot(vanilla)
    damage(cell / name)
    code, stdout, err = _cli(capsys, "bench", *QUICK, "--output", str(out))
    assert code == 0, err
    assert f"{cell / name} {reason}" in stdout and "computing it again" in stdout  # said, in one line
    for n, data in expected.items():
        assert (cell / n).read_bytes() == data, n
    assert json.loads((cell / "run.json").read_text())["method"] == "ga"
    assert _snapshot(vanilla) == untouched


@needs_vanilla
def test_bench_killed_by_sigkill_mid_grid_resumes_to_the_uninterrupted_bytes(grid, tmp_path, capsys):
    """A real ``kill -9`` of ``mlunlearn bench`` in a subprocess once its first cell is on disk, then the same
    command: the first cell is not rewritten (bytes and mtime), the second is complete and equals the
    uninterrupted grid's (``grid``) byte for byte (result and MIA; run.json holds wall-clock timings)."""
    out = tmp_path / "grid"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    first, second = out / "runs/vanilla/forget5", out / "runs/ga/forget5_seed0"
    proc = subprocess.Popen([sys.executable, "-m", "mlunlearn", "bench", *QUICK, "--output", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 45
        while not (first / "result.json").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the first cell did not finish in 45 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (second / "result.json").exists()  # killed mid-grid: the second cell is not finished
    assert not (out / "leaderboard.csv").exists()
    finished = _snapshot(first)
    code, stdout, err = _cli(capsys, "bench", *QUICK, "--output", str(out))
    assert code == 0, err
    assert _snapshot(first) == finished  # not recomputed, not rewritten
    for name in ("result.json", "mia.json"):
        assert (second / name).read_bytes() == (grid / "runs/ga/forget5_seed0" / name).read_bytes(), name
        assert (first / name).read_bytes() == (grid / "runs/vanilla/forget5" / name).read_bytes(), name
    assert sorted(p.name for p in second.iterdir()) == ["mia.json", "result.json", "run.json"]
    assert (out / "leaderboard.csv").read_bytes() == (grid / "leaderboard.csv").read_bytes()


@pytest.mark.parametrize("content", ["", '{"model": "tiny", "data": "toy', "[]"])
def test_a_bench_json_cut_short_is_refused_in_one_line_and_nothing_changes(tmp_path, capsys, content, monkeypatch):
    import mlunlearn.models

    monkeypatch.setattr(mlunlearn.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "grid"
    (out / "runs/vanilla/forget5").mkdir(parents=True)
    (out / "bench.json").write_text(content)
    before = _snapshot(out)
    code, _, err = _cli(capsys, "bench", *QUICK, "--output", str(out))
    assert_one_line_error(code, err, "bench.json", "--overwrite")
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------------------ MLLMU-Bench files

@pytest.mark.parametrize("config", ["forget_5", "Test_Set", "retain_95"])
@pytest.mark.parametrize("damage", ["cut in half", "random bytes", "empty"])
def test_a_published_layout_parquet_file_that_is_damaged_is_a_one_line_error(tmp_path, capsys, config, damage):
    from test_cli import _small_configs, _write

    folder = Path(_write(tmp_path, _small_configs()))
    (path,) = (folder / config).glob("*.parquet")
    data = path.read_bytes()
    path.write_bytes({"cut in half": data[: len(data) // 2], "random bytes": os.urandom(3000), "empty": b""}[damage])
    code, _, err = _cli(capsys, "eval", "--data", str(folder), "--model", "/no/model/here", "--no-progress",
                        "--output", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, f"cannot read {folder / config}", path.name)  # the data fails first
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------------ safety files

def _safeeraser(tmp_path, edit):
    from test_safety import write_safeeraser

    folder, data = write_safeeraser(tmp_path / "se")
    items = data["all_train.json"]
    edit(items, folder)
    (folder / "all_train.json").write_text(json.dumps(items))
    return folder


@pytest.mark.parametrize("case", ["empty file", "empty list", "image outside the folder", "VLGuard empty file"])
def test_more_malformed_safety_files_are_one_line_errors_before_the_model_loads(tmp_path, capsys, case):
    if case == "VLGuard empty file":
        from test_safety import write_vlguard

        folder, _ = write_vlguard(tmp_path / "vg")
        (folder / "train.json").write_text("")
        data, needles = f"vlguard:{folder}", ["train.json is not valid JSON", "truncated?"]
    else:
        folder = _safeeraser(tmp_path, lambda items, f: items[1].update(image_path="../../elsewhere/Violence/1.png"))
        if case == "empty file":
            (folder / "all_train.json").write_text("")
        elif case == "empty list":
            (folder / "all_train.json").write_text("[]")
        data = f"safeeraser:{folder}"
        needles = {"empty file": ["all_train.json is not valid JSON", "truncated?"],
                   "empty list": ["all_train.json holds no items"],
                   "image outside the folder": ["all_train.json item 1", "'image_path'",
                                                "no image file '../../elsewhere/Violence/1.png'"]}[case]
    code, _, err = _cli(capsys, "eval", "--data", data, "--model", "/no/model/here", "--output", str(tmp_path / "r"))
    assert_one_line_error(code, err, *needles)  # the data fails first: the model (a missing folder) is never read


def test_an_image_outside_the_folder_given_absolute_and_a_new_category_are_read_as_written(tmp_path):
    """SafeEraser's code opens ``image_path`` as written: an absolute path is used as is (even outside the
    folder), and a category (the image's parent folder) not among SafeEraser's six is kept as a label."""
    from mlunlearn.benchmarks import get_benchmark

    elsewhere = tmp_path / "elsewhere" / "Weapn" / "0.png"
    elsewhere.parent.mkdir(parents=True)

    def edit(items, folder):
        shutil.copy(folder / items[0]["image_path"], elsewhere)
        items[0]["image_path"] = str(elsewhere)

    folder = _safeeraser(tmp_path, edit)
    queries = get_benchmark(f"safeeraser:{folder}").queries("train")
    first = [q for q in queries if q.item == str(elsewhere)]
    assert first and {q.category for q in first} == {"Weapn"}
    assert all(q.image is not None for q in first)
    with pytest.raises(BenchmarkError):  # and the file must exist
        elsewhere.unlink()
        get_benchmark(f"safeeraser:{folder}").queries("train")


# ------------------------------------------------------------------------------------------ every option

# Options where any text is a valid value: a file or folder name (a nonsense name is a new file, and the
# command would start its whole run), and --judge/--reference/--gold, whose values are checked only where they
# apply (a safety benchmark, CLEAR; on the default toyworld they are refused whatever the value).
FREE = {"output", "records", "benign"}


def _value_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.nargs == 0 or action.dest in FREE:
                continue
            yield command, action.option_strings[-1]


@pytest.mark.parametrize("command, option", list(_value_options()))
def test_a_nonsense_value_of_any_option_is_one_line_and_exit_2(command, option, tmp_path, capsys, monkeypatch):
    import mlunlearn.models

    monkeypatch.setattr(mlunlearn.models.loading, "LlavaForConditionalGeneration", None)  # no weights are read
    value = "1.5" if option == "--relearn-fraction" else "@@nonsense"  # a float the type accepts, out of range
    out = tmp_path / "out"
    args = {"unlearn": ["--method", "ga", "--output", str(out), "--no-progress"],
            "bench": ["--output", str(out), "--no-progress"],
            "eval": ["--output", str(out / "r.json"), "--no-progress"]}.get(command, [])
    if option == "--method":
        args = args[2:]
    code, _, err = _cli(capsys, command, *args, option, value)
    assert_one_line_error(code, err)
    assert value in err or option in err or option.lstrip("-") in err, err  # it names what was wrong
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the tools

def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool, argv, needle", [
    ("recheck_records", ["--jobs", "0"], "--jobs 0: must be at least 1"),
    ("recheck_records", ["--folder", "/no/records/here"], "--folder /no/records/here: no such folder"),
    ("execute_notebooks", ["book/01_no_such_chapter.ipynb"], "no such notebook"),
    ("execute_notebooks", ["README.md"], "not a notebook (.ipynb)"),
])
def test_the_tools_refuse_a_typo_in_one_line_before_running_anything(tool, argv, needle, capsys):
    module = _tool(tool)
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    err = capsys.readouterr().err
    assert_one_line_error(stop.value.code, err, needle)


@pytest.mark.parametrize("setting, needle", [("max_steps=abc", "max_steps='abc': expected an int (a whole number)"),
                                             ("max_steps=1.5", "max_steps='1.5': expected an int")])
def test_a_whole_number_setting_given_otherwise_says_so_in_one_line(setting, needle, tmp_path, capsys):
    code, _, err = _cli(capsys, "unlearn", "--method", "ga", "--set", setting, "--output", str(tmp_path / "x"))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ checkpoints

def _train(vanilla, output=None, **config):
    model, processor = vanilla
    config = UnlearnConfig(**{"merge": False, "progress": False, **config})
    return unlearn(copy.deepcopy(model), "toyworld", 5, "ga", config, output=output, processor=processor)


@pytest.fixture(scope="module")
def killed_while_saving(vanilla, tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, as a kill leaves it (no run.json, no final state), and the
    trained tensors of the same run uninterrupted."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    full = _train(vanilla, folder, max_steps=4, save_steps=2)
    (folder / "run.json").unlink()
    (folder / "trainable.safetensors").unlink()
    return folder, {n: p.detach().clone() for n, p in full.model.named_parameters() if "lora" in n}


CHECKPOINT_DAMAGE = {"optimizer.pt cut short": ("optimizer.pt", _truncate),
                     "trainer_state.json cut short": ("trainer_state.json", _truncate),
                     "rng_state.pth cut short": ("rng_state.pth", _truncate),
                     "method.json cut short": ("method.json", _truncate),
                     "scheduler.pt never written": ("scheduler.pt", lambda p: p.unlink())}


@needs_vanilla
@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_a_checkpoint_damaged_by_a_kill_while_saving_is_skipped_and_the_run_resumes_exactly(
        vanilla, killed_while_saving, tmp_path, case):
    name, damage = CHECKPOINT_DAMAGE[case]
    source, expected = killed_while_saving
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    damage(folder / "checkpoints/checkpoint-4" / name)  # was: a traceback from torch.load / json / the Trainer
    with pytest.warns(UserWarning, match=f"skipped the damaged checkpoint-4 .*{name.split('.')[0]}.*resuming from"):
        resumed = _train(vanilla, folder, max_steps=4, save_steps=2, resume=True)
    assert resumed.run["resumed_from"] == "checkpoint-2" and resumed.run["steps"] == 4
    state = {n: p for n, p in resumed.model.named_parameters() if "lora" in n}
    assert state.keys() == expected.keys() and all(torch.equal(state[n], expected[n]) for n in state)


@needs_vanilla
def test_resume_with_every_checkpoint_damaged_is_a_one_line_error(killed_while_saving, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(killed_while_saving[0], folder)
    for step in (2, 4):
        _truncate(folder / f"checkpoints/checkpoint-{step}/optimizer.pt")
    code, _, err = _cli(capsys, "unlearn", "--method", "ga", "--set", "max_steps=4", "--set", "save_steps=2",
                        "--set", "merge=false", "--set", "resume=true", "--no-progress", "--output", str(folder))
    assert_one_line_error(code, err, "no checkpoint in", "is complete", "checkpoint-4 (optimizer.pt is cut short)",
                          "--overwrite")


@pytest.mark.parametrize("value, needle", [("", "e.g. --forget 5,10"), ("five", "e.g. --forget 5,10")])
def test_a_bad_forget_list_gives_an_example_of_forget_percentages(value, needle, tmp_path, capsys):
    code, _, err = _cli(capsys, "bench", "--forget", value, "--no-progress", "--output", str(tmp_path / "grid"))
    assert_one_line_error(code, err, needle)  # was: "e.g. --forget 0,1", which is itself refused
    assert not (tmp_path / "grid").exists()
