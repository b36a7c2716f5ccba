"""``mlunlearn eval``: one-line errors with exit status 2, and a quick successful run on the toy world."""

import json

import pytest
import torch

from mlunlearn.cli import main
from mlunlearn.data import open_benchmark, write_benchmark

torch.set_num_threads(1)

from mlunlearn.models import ASSET_DIR, build_processor, build_tiny_llava, train_tokenizer
from conftest import assert_one_line_error

needs_vanilla = pytest.mark.skipif(
    not (ASSET_DIR / "model.safetensors").is_file(),
    reason="the tiny vanilla weights (mlunlearn/assets/tiny-vanilla) are not built yet",
)

CONFIGS = ("forget_5", "Test_Set", "retain_95", "Retain_Set")


def _small_configs() -> dict:
    """Two people per config, copied from the toy world, in MLLMU-Bench's columns."""
    world = open_benchmark("toyworld")
    configs = {name: [dict(r) for r in world.load(name)[:2]] for name in ("forget_5", "retain_95", "Retain_Set")}
    forget_ids = {r["ID"] for r in configs["forget_5"]}
    configs["Test_Set"] = [dict(r) for r in world.load("Test_Set") if r["ID"] in forget_ids]
    return configs


def _write(tmp_path, configs, names=CONFIGS):
    return str(write_benchmark(configs, tmp_path / "bench", names=[n for n in names if n in configs]))


def _run_cli(capsys, *args):
    code = main(["eval", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


_assert_one_line_error = assert_one_line_error  # tests/conftest.py


def test_missing_config(tmp_path, capsys):
    folder = _write(tmp_path, _small_configs(), names=("forget_5", "Test_Set", "retain_95"))
    code, _, err = _run_cli(capsys, "--data", folder, "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "Retain_Set", "fix")


def test_missing_forget_config(tmp_path, capsys):
    folder = _write(tmp_path, _small_configs())
    code, _, err = _run_cli(capsys, "--data", folder, "--forget", "10", "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "forget_10")


def test_missing_column(tmp_path, capsys):
    configs = _small_configs()
    for row in configs["retain_95"]:
        del row["Mask_Task"]
    folder = _write(tmp_path, configs)
    code, _, err = _run_cli(capsys, "--data", folder, "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "retain_95", "Mask_Task")


def test_unreadable_image(tmp_path, capsys):
    configs = _small_configs()
    bad_id = configs["forget_5"][1]["ID"]
    configs["forget_5"][1]["image"] = {"bytes": b"this is not a png", "path": None}
    folder = _write(tmp_path, configs)
    code, _, err = _run_cli(capsys, "--data", folder, "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "forget_5", bad_id, "image")


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = _run_cli(capsys, "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "nowhere")


def test_bad_limit_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--limit", "0"])
    assert exit_info.value.code == 2


def test_bad_model_path(tmp_path, capsys):
    folder = _write(tmp_path, _small_configs())
    code, _, err = _run_cli(capsys, "--model", str(tmp_path / "no_such_model"), "--data", folder,
                            "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "no_such_model")


def _check_successful_run(code, stdout, err, out, records):
    assert code == 0, err
    official = json.loads(out.read_text())
    assert list(official) == ["Forget Set Results", "Test Set Results", "Retain Set (shared dataset) Results",
                              "Retain Set (real person) Results"]
    for section in official.values():
        for value in [*section["fill_in_the_blank"].values(), *section["classification"].values()]:
            assert 0 <= value <= 100
        assert len(section["generation"]) == 8
        assert all(0 <= v <= 1 for v in section["generation"].values())
    lines = records.read_text().splitlines()
    assert len(lines) == 4 * 3 * 2 * 2  # modes x tasks x modalities x limit
    assert "forget" in stdout and "cls img %" in stdout


@needs_vanilla
def test_eval_toyworld_limit_2(tmp_path, capsys):
    out, records = tmp_path / "results.json", tmp_path / "records.jsonl"
    result = _run_cli(capsys, "--model", "tiny", "--data", "toyworld", "--forget", "5", "--limit", "2",
                      "--batch-size", "4", "--output", str(out), "--records", str(records))
    _check_successful_run(*result, out, records)


def test_eval_runs_on_a_saved_model_folder(tmp_path, capsys):
    """The whole command on a small benchmark folder and a random tiny LLaVA saved with save_pretrained."""
    from mlunlearn.data.world import build_world, corpus

    tokenizer = train_tokenizer(corpus(build_world(0)), 512)
    processor = build_processor(tokenizer)
    model_dir = tmp_path / "model"
    build_tiny_llava(tokenizer).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    folder = _write(tmp_path, _small_configs())
    out, records = tmp_path / "results.json", tmp_path / "records.jsonl"
    result = _run_cli(capsys, "--model", str(model_dir), "--data", folder, "--limit", "2", "--batch-size", "3",
                      "--max-new-tokens", "5", "--device", "cpu", "--output", str(out), "--records", str(records),
                      "--benign", str(tmp_path / "benign.json"))
    _check_successful_run(*result, out, records)
    benign = json.loads((tmp_path / "benign.json").read_text())
    # No Benign_VQA in this folder: generic questions, refusal rate only.
    assert set(benign["overall"]) == {"refusal_rate", "n"}
    assert set(benign["by_group"]) == {"fictitious"}


# -- eval --quantization 4bit ------------------------------------------------------------------------------


def test_eval_4bit_on_the_cpu_is_a_one_line_error(tmp_path, capsys):
    """As for unlearn: 4 bits need a CUDA GPU (bitsandbytes); on the CPU one line says so, and no file."""
    code, _, err = _run_cli(capsys, "--quantization", "4bit", "--device", "cpu", "--limit", "1",
                            "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "quantization='4bit' needs a CUDA GPU", "drop --quantization")
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit) as exit_info:  # 4bit is the only setting
        main(["eval", "--quantization", "8bit"])
    assert exit_info.value.code == 2


@needs_vanilla
@pytest.mark.parametrize("data,extra", [("toyworld", []), ("toyworld-safety", ["--reference", "tiny"])])
def test_eval_loads_the_model_and_its_reference_in_4bit(tmp_path, capsys, monkeypatch, data, extra):
    """--quantization 4bit reaches load_model for the evaluated model and, on a safety benchmark, for the
    --reference model too (load_model is replaced by a recorder that stops at the first load that would need
    a GPU: here the reference, or the model on MLLMU-Bench data)."""
    from mlunlearn.models import ModelLoadError, load_model

    calls = []

    def recorder(name, device=None, dtype=None, quantization=None, **kw):
        calls.append((name, quantization))
        if name == "tiny" and quantization is not None:
            raise ModelLoadError("stopped by the test")
        return load_model(name, device=device, dtype=dtype, **kw)

    monkeypatch.setattr("mlunlearn.models.load_model", recorder)
    model = "tiny-safety" if data == "toyworld-safety" else "tiny"
    code, _, err = _run_cli(capsys, "--model", model, "--data", data, "--quantization", "4bit", "--limit", "1",
                            *extra, "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "stopped by the test")
    assert calls == [(model, "4bit"), *([("tiny", "4bit")] if extra else [])]
