"""Chapter 10 (the full benchmark): its GPU cells, run here up to the first download, and the committed grid.

The chapter's settings cell has one switch, ``GPU = None``; ``"a100"`` or ``"t4"`` turns its grid cell into
the LLaVA-1.5-7B run on MLLMU-Bench. Those cells cannot run here (no GPU, no network), so these tests run
the chapter's own cells with the switch set and the hub patched: the first download raises
:class:`DownloadStarted`, and each test asserts that this (or, for 4 bits on a CPU, the one-line device
error) is what stops them, with nothing written before it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import needs_vanilla

from mlunlearn.bench import GridError, GridSpec
from mlunlearn.board import (ENVIRONMENT_FILE, bench_command, check_environment, compare_folders, merged_board,
                             missing_cells, open_spec, ranks, run_board)
from mlunlearn.data.bench import BenchmarkError
from mlunlearn.models.loading import ModelLoadError

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "book" / "10_benchmark.ipynb"
RECORDS = sorted((ROOT / "book" / "records").glob("10_tiny_bench_*"))  # the committed grid: group x forget size
METHODS = ["ga", "graddiff", "kl", "npo", "po", "sineproject", "mmunlearner", "nullspace-cvf", "cagul"]
VANILLA_7B = "mllmu-vanilla-7b"  # load_model's name for MLLMU-Bench's vanilla LLaVA-1.5-7B
VANILLA_HUB = "MLLMMU/LLaVA_Vanilla"  # where its weights are


class DownloadStarted(Exception):
    """Raised by the patched hub at the first file a cell would download."""


def _cells(tag: str) -> str:
    nb = json.loads(CHAPTER.read_text())
    found = [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"the chapter has {len(found)} cells tagged {tag!r}, expected one"
    return "".join(found[0]["source"])


def _settings(gpu: str) -> str:
    source = _cells("settings")
    assert source.count("GPU = None") == 1, "the settings cell must hold the switch `GPU = None` once"
    return source.replace("GPU = None", f"GPU = {gpu!r}", 1)


@pytest.fixture
def hub(monkeypatch):
    """Every way the package reaches the hub (datasets: huggingface_hub.snapshot_download; models: the
    functions transformers imported from it) raises DownloadStarted and records what it was asked."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub

    calls = []

    def download(*args, **kwargs):
        repo = kwargs.get("repo_id", args[0] if args else None)
        calls.append({"repo_id": repo, "repo_type": kwargs.get("repo_type"),
                      "filename": kwargs.get("filename", args[1] if len(args) > 1 else None),
                      "allow_patterns": kwargs.get("allow_patterns")})
        raise DownloadStarted(repo)

    for module in (huggingface_hub, transformers_hub):
        monkeypatch.setattr(module, "hf_hub_download", download)
        monkeypatch.setattr(module, "snapshot_download", download)
    return calls


def _run(source: str, namespace: dict, cwd: Path) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(source, str(CHAPTER), "exec"), namespace)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("gpu", ["a100", "t4"])
def test_the_gpu_cells_stop_at_the_first_download_of_the_benchmark(gpu, hub, tmp_path):
    namespace = {}
    _run(_settings(gpu), namespace, tmp_path)
    assert namespace["MODEL"] == VANILLA_7B and namespace["DATA"] == "mllmu-bench"
    assert namespace["QUANTIZATION"] == ("4bit" if gpu == "t4" else None)
    assert not namespace["TINY"] and namespace["BATCH"] == 8
    with pytest.raises(BenchmarkError, match="cannot download MLLMMU/MLLMU-Bench/forget_5 \\(DownloadStarted\\)"):
        _run(_cells("grid"), namespace, tmp_path)
    # The first thing fetched is MLLMU-Bench's forget_5 config, before any model or folder.
    assert hub[0] == {"repo_id": "MLLMMU/MLLMU-Bench", "repo_type": "dataset", "filename": None,
                      "allow_patterns": ["forget_5/*"]}
    assert len(hub) == 1
    assert list(tmp_path.iterdir()) == []  # no bench folder was created


@pytest.fixture(scope="module")
def local_mllmu(tmp_path_factory):
    """The tiny world written in MLLMU-Bench's hub layout, so the cells get past the data to the model."""
    from mlunlearn.data.bench import write_benchmark
    from mlunlearn.data.world import build_world

    folder = tmp_path_factory.mktemp("mllmu")
    write_benchmark(build_world(0).configs, folder)
    return folder


def test_with_the_data_local_the_a100_cells_stop_at_the_download_of_the_7b_model(hub, tmp_path, local_mllmu):
    namespace = {}
    _run(_settings("a100"), namespace, tmp_path)
    namespace["DATA"] = f"mllmu-bench:{local_mllmu}"
    # transformers turns any failure to fetch the config into an OSError, and load_model that into its
    # one-line ModelLoadError; the DownloadStarted behind both is what stopped the cell.
    with pytest.raises(ModelLoadError, match=f"cannot load '{VANILLA_7B}'") as caught:
        _run(_cells("grid"), namespace, tmp_path)
    assert any(isinstance(e, DownloadStarted) and str(e) == VANILLA_HUB for e in _chain(caught.value))
    assert [(c["repo_id"], c["filename"]) for c in hub] == [(VANILLA_HUB, "config.json")]  # its first file
    assert list(tmp_path.iterdir()) == []


def _chain(exc):
    """The exception and every exception it was raised from or while handling."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_with_the_data_local_the_t4_cells_ask_for_4bit_and_stop_on_a_cpu_before_any_download(
        hub, tmp_path, local_mllmu, monkeypatch):
    import mlunlearn.models as models

    asked = []
    load_model = models.load_model

    def spy(name, *args, **kwargs):
        asked.append((name, kwargs.get("quantization")))
        return load_model(name, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", spy)
    namespace = {}
    _run(_settings("t4"), namespace, tmp_path)
    namespace["DATA"] = f"mllmu-bench:{local_mllmu}"
    with pytest.raises(ModelLoadError, match="quantization='4bit' needs a CUDA GPU"):
        _run(_cells("grid"), namespace, tmp_path)
    assert asked == [(VANILLA_7B, "4bit")]
    assert hub == []
    assert list(tmp_path.iterdir()) == []


def test_run_board_refuses_4bit_for_the_tiny_model(tmp_path):
    with pytest.raises(GridError, match="drop quantization"):
        run_board(GridSpec(methods=("ga",)), tmp_path / "grid", quantization="4bit")
    assert not (tmp_path / "grid").exists()


# ------------------------------------------------------------------------------------ the committed grid

needs_records = pytest.mark.skipif(not RECORDS, reason="chapter 10's grid is not committed")


@needs_records
def test_the_committed_grid_is_complete_and_merges_into_every_method_at_each_of_its_forget_sizes():
    for folder in RECORDS:
        assert missing_cells(folder) == [], f"{folder.name} is not finished: the chapter would run it"
        check_environment(folder)
        assert [p.name for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")] == []  # no weights
    board = merged_board(RECORDS)
    sizes = sorted(set(board["forget"]))
    assert set(sizes) <= {5, 10, 15} and 5 in sizes
    assert sorted(m for m in set(board["method"]) if m != "vanilla") == sorted(METHODS)
    assert (board.groupby("method").size() == len(sizes)).all()  # vanilla once per forget size, not per folder
    table = ranks(board, "forget_cls_img", lower_is_better=True)
    assert list(table.columns) == sizes and sorted(table.index) == sorted(METHODS)
    # the chapter's settings name exactly these folders
    namespace = {}
    exec(compile(_cells("settings"), str(CHAPTER), "exec"), namespace)
    assert sorted(f"10_tiny_bench_{g}_forget{f}" for g, f in namespace["FOLDERS"]) == [p.name for p in RECORDS]


@needs_records
def test_the_committed_grid_commands_are_the_bench_invocations():
    for folder in RECORDS:
        forget = folder.name.rsplit("forget", 1)[1]
        command = bench_command(open_spec(folder), f"book/records/{folder.name}")
        assert command.startswith("mlunlearn bench --model tiny --data toyworld --methods ")
        assert command.endswith(f"--forget {forget} --seeds 0 --batch-size 64 --output book/records/{folder.name}")


def test_merged_board_refuses_disagreeing_vanilla_rows_and_a_cell_in_two_folders(tmp_path):
    """Built from two small fake bench folders (result files in MLLMU-Bench's layout, no model run)."""
    from mlunlearn.bench import _write_json

    def folder(name, methods, vanilla_cls=100.0):
        out = tmp_path / name
        spec = GridSpec(methods=methods, forget=(5,))
        _write_json(out / "bench.json", spec.to_json())
        for cell in spec.cells():
            cls = vanilla_cls if cell.method == "vanilla" else 10.0
            result = {"Forget Set Results": {
                "classification": {"Image-Textual Question Accuracy": cls, "Pure Text Question Accuracy": cls},
                "fill_in_the_blank": {"image_textual_accuracy": cls, "pure_text_accuracy": cls},
                "generation": {"Average ROUGE-L (Image_Textual)": 0.5, "Average ROUGE-L (Pure_Text)": 0.5}}}
            _write_json(out / cell.folder / "result.json", result)
        return out

    a, b = folder("a", ("ga",)), folder("b", ("npo",))
    board = merged_board([a, b])
    assert list(board["method"]) == ["vanilla", "ga", "npo"]
    with pytest.raises(GridError, match="vanilla evaluations at forget 5 differ"):
        merged_board([a, folder("c", ("po",), vanilla_cls=90.0)])
    with pytest.raises(GridError, match="cell ga forget5_seed0 is in more than one folder"):
        merged_board([a, folder("d", ("ga",))])
    (b / "runs/npo/forget5_seed0/result.json").unlink()
    with pytest.raises(GridError, match="1 cell\\(s\\) not finished \\(npo forget5_seed0\\); finish them with: "
                                        "mlunlearn bench --model tiny"):
        merged_board([a, b])


def test_compare_folders_ignores_wall_clock_times_only(tmp_path):
    import mlunlearn.board as board_module

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seconds in ((a, 1.5), (b, 9.0)):
        (folder / "runs/ga/forget5_seed0").mkdir(parents=True)
        run = {"method": "ga", "steps": 40, "seconds": {"total": seconds, "train": seconds},
               "log": [{"loss": 1.0, "step": 40, "train_runtime": seconds, "train_steps_per_second": 1 / seconds}],
               "model": str(Path(board_module.__file__).parent / "assets/tiny-vanilla") if folder == a
               else "/elsewhere/mlunlearn/assets/tiny-vanilla",
               "bench": {"cell": "runs/ga/forget5_seed0", "eval_seconds": seconds, "mia_seconds": seconds}}
        (folder / "runs/ga/forget5_seed0/run.json").write_text(json.dumps(run))
        (folder / "leaderboard.csv").write_text("method\nga\n")
        (folder / ENVIRONMENT_FILE).write_text(str(seconds))  # not part of the grid's output
    assert compare_folders(a, b) == ["runs/ga/forget5_seed0/run.json: differs"]  # another model folder
    run = json.loads((b / "runs/ga/forget5_seed0/run.json").read_text())
    run["model"] = str(Path(board_module.__file__).resolve().parent / "assets/tiny-vanilla")
    (b / "runs/ga/forget5_seed0/run.json").write_text(json.dumps(run))
    assert compare_folders(a, b) == []
    (b / "leaderboard.csv").write_text("method\nnpo\n")
    run = json.loads((b / "runs/ga/forget5_seed0/run.json").read_text())
    run["steps"] = 41
    (b / "runs/ga/forget5_seed0/run.json").write_text(json.dumps(run))
    shutil.copy(b / "leaderboard.csv", b / "extra.csv")
    assert compare_folders(a, b) == ["extra.csv: only in the recomputed folder", "leaderboard.csv: differs",
                                     "runs/ga/forget5_seed0/run.json: differs"]


@needs_vanilla
def test_recheck_grid_recomputes_one_deleted_cell_to_the_same_bytes_and_reports_a_changed_file(tmp_path):
    """A small real grid (ga, two seeds, one step, one question per task), committed-style: the recheck
    deletes a cell in a copy, bench resumes it, and every file equals the original; a tampered original is
    reported, a missing environment.json or an unfinished grid refused."""
    from mlunlearn.bench import run_grid
    from mlunlearn.board import recheck_grid, write_environment
    from mlunlearn.records import EnvironmentMismatch

    out = tmp_path / "grid"
    spec = GridSpec(methods=("ga",), seeds=(0, 1), settings={"max_steps": 1}, limit=1)
    run_grid(spec, out, progress=False, log=None)
    with pytest.raises(EnvironmentMismatch, match="environment.json is missing"):
        recheck_grid(out, log=None)
    write_environment(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lines = []
    assert recheck_grid(out, "ga/forget5_seed1", workdir=tmp_path / "work", log=lines.append) == []
    assert lines[0].startswith("recompute ga forget5_seed1 of ")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the original untouched
    # the copy was recomputed, not copied: its cell has a fresh run.json with its own timings
    assert (tmp_path / "work/grid/runs/ga/forget5_seed1/result.json").read_bytes() == \
        (out / "runs/ga/forget5_seed1/result.json").read_bytes()
    result = out / "runs/ga/forget5_seed1/result.json"
    result.write_text(result.read_text().replace("Forget Set Results", "Forget Set  Results"))
    shutil.rmtree(tmp_path / "work")
    assert recheck_grid(out, "ga/forget5_seed1", workdir=tmp_path / "work", log=None) == [
        "runs/ga/forget5_seed1/result.json: differs"]
    with pytest.raises(GridError, match="no cell 'ga/forget10_seed0'.*e.g. ga/forget5_seed0"):
        recheck_grid(out, "ga/forget10_seed0", log=None)
    result.unlink()
    with pytest.raises(GridError, match="not a finished grid"):
        recheck_grid(out, log=None)
