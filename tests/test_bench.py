"""``mlunlearn bench``: a grid of runs, each evaluated, written per cell, resumable after a kill, its spec
guarded, and every bad input a one-line error before anything is created. Small on purpose: one method,
``max_steps=1``, ``--limit 1`` (a few seconds per cell)."""

import json
import shutil

import pandas as pd
import pytest
import torch

from conftest import assert_one_line_error, needs_vanilla
from mlunlearn import bench as mb
from mlunlearn.cli import main
from test_safety import write_safeeraser

torch.set_num_threads(1)

QUICK = ("--limit", "1", "--set", "max_steps=1", "--no-progress")


def _cli(capsys, *args):
    code = main(["bench", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


_one_line_error = assert_one_line_error  # tests/conftest.py


def _snapshot(folder):
    """{relative path: (bytes, mtime)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


class _Counter:
    """Wraps ``mlunlearn.engine.unlearn``: the seeds of the unlearning runs (``calls``) and of the relearning
    attacks' fine-tunes (``relearns``, which go through the same engine)."""

    def __init__(self, monkeypatch):
        import mlunlearn.engine
        from mlunlearn.relearn import Relearn

        self.calls, self.relearns, real = [], [], mlunlearn.engine.unlearn

        def counted(*args, **kwargs):
            (self.relearns if isinstance(args[3], Relearn) else self.calls).append(args[4].seed)
            return real(*args, **kwargs)

        monkeypatch.setattr(mlunlearn.engine, "unlearn", counted)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A finished 2-cell grid (ga, seeds 0 and 1, plus vanilla) and the CLI arguments that made it."""
    out = tmp_path_factory.mktemp("bench") / "grid"
    args = ["--methods", "ga", "--seeds", "0,1", *QUICK, "--output", str(out)]
    assert main(["bench", *args]) == 0
    return out, args


@needs_vanilla
def test_a_grid_writes_each_cell_the_leaderboards_and_the_figure(grid, capsys):
    out, _ = grid
    cells = ["runs/vanilla/forget5", "runs/ga/forget5_seed0", "runs/ga/forget5_seed1"]
    for cell in cells:
        result = json.loads((out / cell / "result.json").read_text())
        assert list(result) == ["Forget Set Results", "Test Set Results", "Retain Set (shared dataset) Results",
                                "Retain Set (real person) Results"]  # the official key names, as eval writes
        run = json.loads((out / cell / "run.json").read_text())
        assert run["bench"]["cell"] == cell
    run = json.loads((out / "runs/ga/forget5_seed1/run.json").read_text())
    assert run["method"] == "ga" and run["seed"] == 1 and run["steps"] == 1 and run["saved"] is None
    assert not list(out.rglob("*.safetensors"))  # no weights without --keep-models
    spec = json.loads((out / "bench.json").read_text())
    assert spec == {"model": "tiny", "data": "toyworld", "methods": ["ga"], "forget": [5], "seeds": [0, 1],
                    "settings": {"max_steps": "1"}, "mia": True, "relearn": {"steps": 10, "fraction": 0.2},
                    "benign": {"limit": 40}, "eval": {"limit": 1, "batch_size": 8, "max_new_tokens": 50, "seed": 0}}

    board = pd.read_csv(out / "leaderboard.csv")
    assert board[["method", "forget"]].values.tolist() == [["vanilla", 5], ["ga", 5], ["ga", 5]]
    assert board["seed"].tolist()[1:] == [0, 1] and pd.isna(board["seed"][0])
    for mode in ("forget", "test", "retain", "celebrity"):
        for col in ("cls_img", "cls_text", "cloze_img", "cloze_text", "rougeL_img", "rougeL_text"):
            assert f"{mode}_{col}" in board.columns
    means = pd.read_csv(out / "leaderboard_mean.csv")
    assert means[["method", "forget", "seeds"]].values.tolist() == [["vanilla", 5, 1], ["ga", 5, 2]]
    assert {"forget_cls_img_mean", "forget_cls_img_std", "val_ASR_mean"} & set(means.columns) == \
        {"forget_cls_img_mean", "forget_cls_img_std"}
    ga = board[board["method"] == "ga"]
    assert means.loc[1, "retain_cls_img_mean"] == pytest.approx(ga["retain_cls_img"].mean())
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "benign.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_vanilla
def test_each_cell_has_membership_inference_relearning_and_benign_columns(grid):
    out, _ = grid
    board = pd.read_csv(out / "leaderboard.csv")
    for attack in ("loss", "zlib", "min_k", "min_k_pp"):
        assert board[f"mia_{attack}_auc"].between(0, 1).all()
    vanilla = board.iloc[0]
    assert vanilla["mia_loss_auc"] > 0.9 and vanilla["privleak"] < -90  # the vanilla gives its people away
    mia = json.loads((out / "runs/ga/forget5_seed1/mia.json").read_text())
    assert (mia["members"], mia["nonmembers"], mia["k"]) == (15, 90, 0.2)
    assert board.loc[2, "mia_min_k_pp_auc"] == mia["auc"]["min_k_pp"]
    relearn = json.loads((out / "runs/ga/forget5_seed1/relearn.json").read_text())
    assert len(relearn["slice"]) == 1 and len(relearn["rest"]) == 4 and relearn["steps"] == 10
    assert relearn["seed"] == 1 and relearn["lr"] == 1e-3  # the cell's seed and GA's learning rate
    assert relearn["slice"] != json.loads((out / "runs/ga/forget5_seed0/relearn.json").read_text())["slice"]
    for prefix in ("heldback_forget", "relearned_forget"):
        assert {f"{prefix}_cls_img", f"{prefix}_rougeL_text"} <= set(board.columns)
    assert board.loc[2, "relearned_nll"] == relearn["rest_nll"]["after"]
    benign = json.loads((out / "runs/vanilla/forget5/benign.json").read_text())
    assert benign["by_forget_set"]["forget"]["n"] == 40  # --benign-limit's 40 per group and forget membership
    parts = benign["by_part"]
    assert parts["forget"]["n"] == 40 and parts["other"]["n"] + parts["idk"]["n"] == benign["by_forget_set"][
        "not_forget"]["n"]
    assert vanilla["benign_forget_accuracy"] == parts["forget"]["accuracy"] > 80
    assert vanilla["benign_idk_refusal"] > 80 > vanilla["benign_other_refusal"]  # it refuses where it should
    for part in ("forget", "other", "idk"):
        assert board[f"benign_{part}_refusal"].between(0, 100).all()
    means = pd.read_csv(out / "leaderboard_mean.csv")
    assert {"mia_loss_auc_mean", "relearned_forget_cls_img_mean", "benign_other_refusal_std"} <= set(means.columns)


def test_a_benign_json_from_before_the_parts_gives_the_forget_columns_only(tmp_path):
    old = {"overall": {}, "by_group": {}, "by_forget_set": {"forget": {"accuracy": 52.5, "refusal_rate": 0.0, "n": 40},
                                                          "not_forget": {"accuracy": 70.0, "refusal_rate": 20.0}}}
    (tmp_path / "benign.json").write_text(json.dumps(old))
    assert mb.extras_headline(tmp_path) == {"benign_forget_accuracy": 52.5, "benign_forget_refusal": 0.0}


def test_the_extra_evaluations_are_on_where_they_apply_and_recorded_in_the_spec():
    spec = mb.GridSpec(methods="ga")
    assert (spec.mia, spec.relearn, spec.benign) == (True, True, True)
    assert spec.to_json()["relearn"] == {"steps": 10, "fraction": 0.2} and spec.to_json()["benign"] == {"limit": 40}
    hub = mb.GridSpec(methods="ga", data="mllmu-bench")  # no held-out people: no MIA, the rest as usual
    assert (hub.mia, hub.relearn, hub.benign) == (False, True, True)
    safety = mb.GridSpec(methods="po", data="toyworld-safety")
    assert (safety.mia, safety.relearn, safety.benign) == (False, False, False)
    off = mb.GridSpec(methods="ga", mia=False, relearn=False, benign=False, relearn_steps=3)
    assert (off.to_json()["mia"], off.to_json()["relearn"], off.to_json()["benign"]) == (False, False, False)
    assert mb.GridSpec(methods="ga", relearn_steps=3).to_json()["relearn"]["steps"] == 3
    with pytest.raises(mb.GridError, match="--relearn-steps 0"):
        mb.GridSpec(methods="ga", relearn_steps=0)


@needs_vanilla
def test_the_leaderboard_columns_are_the_eval_summary_flattened(vanilla):
    from mlunlearn.eval import evaluate

    model, processor = vanilla
    result = evaluate(model, processor, "toyworld", 5, limit=1)
    assert mb.mllmu_headline(result.to_official()) == pytest.approx(mb.summary_headline(result.summary()))
    assert len(mb.summary_headline(result.summary())) == 24


@needs_vanilla
def test_a_finished_grid_reruns_nothing(grid, capsys, monkeypatch):
    out, args = grid
    before = _snapshot(out / "runs")
    counter = _Counter(monkeypatch)
    import mlunlearn.models

    monkeypatch.setattr(mlunlearn.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, stdout, err = _cli(capsys, *args)
    assert code == 0, err
    assert counter.calls == []
    assert _snapshot(out / "runs") == before
    assert "ga" in stdout and "leaderboard.csv" in stdout


@needs_vanilla
def test_a_killed_grid_resumes_with_only_the_missing_cell_and_the_same_bytes(grid, tmp_path, capsys, monkeypatch):
    src, args = grid
    out = tmp_path / "grid"
    shutil.copytree(src, out, copy_function=shutil.copy2)
    args = [*args[:-1], str(out)]
    done, killed = out / "runs/ga/forget5_seed0", out / "runs/ga/forget5_seed1"
    finished = _snapshot(done)
    extras = ("mia.json", "benign.json", "relearn.json")
    expected = {name: (killed / name).read_bytes() for name in ("result.json", *extras)}
    board = (out / "leaderboard.csv").read_bytes()
    # What a kill in the middle of the cell leaves: its run.json and MIA, a temporary file, no result.json.
    (killed / "result.json").unlink()
    (killed / "relearn.json").unlink()
    (killed / ".result.json.abc.tmp").write_text("{")
    counter = _Counter(monkeypatch)
    code, _, err = _cli(capsys, *args)
    assert code == 0, err
    assert counter.calls == [1] and counter.relearns == [1]  # only the cell without a result, relearning included
    assert _snapshot(done) == finished  # untouched: same bytes, same mtime
    for name, data in expected.items():  # deterministic: the same cell, the same bytes
        assert (killed / name).read_bytes() == data, name
    assert (out / "leaderboard.csv").read_bytes() == board
    assert sorted(p.name for p in killed.iterdir()) == ["benign.json", "mia.json", "relearn.json", "result.json",
                                                        "run.json"]
    assert len(pd.read_csv(out / "leaderboard.csv")) == 3


@needs_vanilla
def test_another_spec_in_the_folder_is_refused_and_overwrite_replaces(grid, tmp_path, capsys):
    src, args = grid
    out = tmp_path / "grid"
    shutil.copytree(src, out)
    before = _snapshot(out)
    code, _, err = _cli(capsys, "--methods", "ga", "--seeds", "0", *QUICK, "--output", str(out))
    _one_line_error(code, err, "another grid", "seeds", "--overwrite")
    assert _snapshot(out) == before
    code, _, err = _cli(capsys, "--methods", "ga", "--seeds", "0", *QUICK, "--output", str(out), "--overwrite")
    assert code == 0, err
    assert not (out / "runs/ga/forget5_seed1").exists()  # the old grid's runs are gone
    assert json.loads((out / "bench.json").read_text())["seeds"] == [0]
    assert len(pd.read_csv(out / "leaderboard.csv")) == 2


def test_a_folder_that_is_not_a_bench_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, *QUICK, "--output", str(out))
    _one_line_error(code, err, "notes.txt", "not a bench folder")


BAD = {
    "unknown method": (["--methods", "ga,nope"], ["unknown method 'nope'", "registered:", "npo"]),
    "duplicate method": (["--methods", "ga,npo,ga"], ["ga twice"]),
    "empty methods": (["--methods", ""], ["empty item"]),
    "empty item": (["--methods", "ga,"], ["empty item"]),
    "vanilla as a method": (["--methods", "vanilla"], ["not a method"]),
    "unknown setting": (["--set", "betta=0.1"], ["unknown setting 'betta'"]),
    "setting for a method not in the grid": (["--methods", "ga", "--set", "npo.beta=0.2"], ["'npo' is not in --methods"]),
    "setting for an unregistered method": (["--set", "nop.beta=0.2"], ["not a registered method"]),
    "unknown prefixed setting": (["--set", "npo.betta=0.2"], ["unknown setting 'betta' for npo"]),
    "bare key not every method takes": (["--methods", "ga,npo", "--set", "beta=0.2"], ["npo.beta=0.2"]),
    "bad engine value": (["--set", "lr=fast"], ["lr='fast'"]),
    "bad engine range": (["--set", "max_steps=0"], ["max_steps=0"]),
    "bad method value": (["--set", "npo.beta=high"], ["npo", "beta='high'"]),
    "bad pd": (["--methods", "po", "--set", "po.pd=maybe"], ["pd='maybe'"]),
    "seed as a setting": (["--set", "seed=3"], ["--seeds"]),
    "resume as a setting": (["--set", "resume=true"], ["resumes by itself"]),
    "malformed set": (["--set", "lr"], ["not KEY=VALUE"]),
    "bad forget size": (["--forget", "5,7"], ["7 is not a forget percentage", "5, 10 or 15"]),
    "forget not a number": (["--forget", "five"], ["'five' is not an integer"]),
    "duplicate forget": (["--forget", "5,5"], ["twice"]),
    "bad seed list": (["--seeds", "0,x"], ["'x' is not an integer"]),
    "empty seeds": (["--seeds", ""], ["empty item"]),
    "negative seed": (["--seeds", "-1"], ["-1 is not a seed"]),
    "bad device": (["--device", "bogus"], ["unknown device 'bogus'"]),
    "missing data folder": (["--data", "/nowhere/at/all"], ["nowhere"]),
    "mia on safety data": (["--data", "toyworld-safety", "--mia"], ["--mia does not apply", "toyworld-safety"]),
    "relearn on safety data": (["--data", "toyworld-safety", "--relearn"], ["--relearn does not apply"]),
    "mia without held-out people": (["--data", "mllmu-bench", "--mia"],
                                    ["--mia needs people the model never saw", "Holdout_Data", "--no-mia"]),
    "relearn fraction out of range": (["--relearn-fraction", "1.5"], ["--relearn-fraction 1.5", "between 0 and 1"]),
    "relearn fraction that holds nobody back": (["--relearn-fraction", "0.95"],
                                                ["--forget 5", "of 5 forget people leaves none to evaluate"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_grid_inputs_are_one_line_errors_and_create_nothing(case, tmp_path, capsys, monkeypatch):
    import mlunlearn.models

    monkeypatch.setattr(mlunlearn.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    args, needles = BAD[case]
    out = tmp_path / "grid"
    code, _, err = _cli(capsys, *args, "--no-progress", "--output", str(out))
    _one_line_error(code, err, *needles)
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "grid.json"
    out.write_text("{}")
    code, _, err = _cli(capsys, *QUICK, "--output", str(out))
    _one_line_error(code, err, "is a file, not a folder")
    assert out.read_text() == "{}"


def test_settings_apply_to_every_method_or_to_the_prefixed_one():
    spec = mb.GridSpec(methods="ga,npo,po", settings={"max_steps": "2", "npo.beta": "0.2", "po.pd": "on",
                                                      "lora_r": "4", "npo.lr": "5e-4"})
    assert spec.resolved["ga"] == ({"lora_r": "4"}, {"max_steps": 2})
    assert spec.resolved["npo"] == ({"lora_r": "4", "beta": "0.2"}, {"max_steps": 2, "lr": 5e-4})
    assert spec.resolved["po"] == ({"lora_r": "4", "pd": "on"}, {"max_steps": 2})
    assert spec.forget == (5,) and spec.seeds == (0,)
    assert [str(c) for c in spec.cells()] == ["vanilla forget5", "ga forget5_seed0", "npo forget5_seed0",
                                              "po forget5_seed0"]


@needs_vanilla
def test_a_safety_grid_writes_asr_rr_sarr_rouge_and_refuses_forget(tmp_path, capsys):
    folder, _ = write_safeeraser(tmp_path / "se")
    data = f"safeeraser:{folder}"
    out = tmp_path / "grid"
    code, _, err = _cli(capsys, "--data", data, "--forget", "5", "--methods", "po", *QUICK, "--output", str(out))
    _one_line_error(code, err, "--forget does not apply", "safeeraser")
    assert not out.exists()

    code, stdout, err = _cli(capsys, "--data", data, "--methods", "po", "--set", "po.pd=on", *QUICK,
                             "--output", str(out))
    assert code == 0, err
    result = json.loads((out / "runs/po/train_seed0/result.json").read_text())
    assert set(result) == {"all_train.json", "all_val.json", "settings"}
    assert set(result["all_val.json"]) >= {"ASR", "RR", "SARR", "ROUGE-L"}
    assert result["settings"]["judge"] == "rule"
    run = json.loads((out / "runs/po/train_seed0/run.json").read_text())
    assert run["forget"] == "train" and run["hyperparameters"]["pd"] == 1.0  # pd=on: PO's weight
    board = pd.read_csv(out / "leaderboard.csv")
    assert board["method"].tolist() == ["vanilla", "po"]
    assert {"val_ASR", "val_RR", "val_SARR", "val_rougeL", "train_ASR"} <= set(board.columns)
    assert board.loc[1, "val_SARR"] == result["all_val.json"]["SARR"]
    assert (out / "tradeoff.png").is_file() and "val_SARR" in stdout


def test_quantization_is_passed_to_every_load_and_recorded_only_when_set(tmp_path, capsys, monkeypatch):
    """--quantization 4bit: on the CPU a one-line error before any folder exists; the base and each fresh
    model load with it; bench.json names it only when set, so the grids run before it existed keep their spec."""
    out = tmp_path / "grid"
    code = main(["bench", "--model", "tiny", "--methods", "ga", "--quantization", "4bit", "--device", "cpu",
                 "--output", str(out), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "quantization='4bit' needs a CUDA GPU")
    assert not out.exists()
    assert "quantization" not in mb.GridSpec(methods="ga").to_json()
    assert mb.GridSpec(methods="ga", quantization="4bit").to_json()["quantization"] == "4bit"
    with pytest.raises(mb.GridError, match="--quantization '8bit': use 4bit"):
        mb.GridSpec(methods="ga", quantization="8bit")
    import mlunlearn.models

    calls = []
    monkeypatch.setattr(mlunlearn.models, "load_model", lambda name, **kw: calls.append((name, kw)) or ("m", "p"))
    models = mb._Models("mllmu-vanilla-7b", "cuda:0", "4bit")
    models.base(), models.fresh()
    assert calls == [("mllmu-vanilla-7b", {"device": "cuda:0", "quantization": "4bit"})] * 2
    assert models._base is None  # a 7B cell's copy replaces the vanilla one: one model on the GPU at a time
    models.base()
    assert len(calls) == 3  # a later vanilla cell reloads it
