"""Bad input on the evaluation side and in model loading: one line on stderr, exit status 2, no traceback.

Also: output paths are checked before the model loads, and results are written atomically (a failed
write leaves the previous file as it was). Each case here is a row of the README's "Bad input" table.
"""

import json
import os
import shutil
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlunlearn.cli import main
from mlunlearn.data import BenchmarkError, open_benchmark, write_benchmark
from mlunlearn.eval.results import EvalResult, Record
from mlunlearn.models import ModelLoadError, build_processor, build_tiny_llava, load_model, train_tokenizer
from mlunlearn import utils
from conftest import assert_one_line_error

torch.set_num_threads(1)

CONFIGS = ("forget_5", "Test_Set", "retain_95", "Retain_Set")


# ----------------------------------------------------------------------------------------------------
# Fixtures: a two-person benchmark folder and a random tiny LLaVA folder, built once per module
# ----------------------------------------------------------------------------------------------------

def _small_configs() -> dict:
    """Two people per config, copied from the toy world, in MLLMU-Bench's columns (and ft_Data)."""
    world = open_benchmark("toyworld")
    configs = {name: [dict(r) for r in world.load(name)[:2]] for name in ("forget_5", "retain_95", "Retain_Set")}
    ids = {r["ID"] for r in configs["forget_5"] + configs["retain_95"]}
    forget_ids = {r["ID"] for r in configs["forget_5"]}
    configs["Test_Set"] = [dict(r) for r in world.load("Test_Set") if r["ID"] in forget_ids]
    configs["ft_Data"] = [dict(r) for r in world.load("ft_Data") if r["ID"] in ids]
    return configs


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return write_benchmark(_small_configs(), tmp_path_factory.mktemp("bench") / "bench")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mlunlearn.data.world import build_world, corpus

    tokenizer = train_tokenizer(corpus(build_world(0)), 512)
    folder = tmp_path_factory.mktemp("model") / "model"
    build_tiny_llava(tokenizer).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if `mlunlearn eval` gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was detected")

    monkeypatch.setattr("mlunlearn.models.load_model", refuse)


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _eval(capsys, *args):
    code = main(["eval", "--no-progress", "--limit", "1", "--max-new-tokens", "3", "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


_assert_one_line_error = assert_one_line_error  # tests/conftest.py


def _set_parquet(folder, config, edit):
    """Rewrite ``folder/config``'s parquet file with ``edit(table)``."""
    (path,) = (folder / config).glob("*.parquet")
    pq.write_table(edit(pq.read_table(path)), path)


# ----------------------------------------------------------------------------------------------------
# The model folder
# ----------------------------------------------------------------------------------------------------

def test_corrupt_safetensors(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "model.safetensors", "corrupt", "fix")


def test_truncated_safetensors(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "model.safetensors", "fix")


def test_missing_safetensors(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    (model / "model.safetensors").unlink()
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "model.safetensors", "missing", "fix")


def test_truncated_config_json(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text[: len(text) // 2])
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "config.json", "not valid JSON", "fix")


def test_config_json_not_an_object(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    (model / "config.json").write_text("[]\n")
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "config.json", "list", "fix")


def test_corrupt_tokenizer(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    (model / "tokenizer.json").write_text("{ not json")
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "processor", "fix")


def test_missing_processor(tmp_path, capsys, bench_dir, model_dir):
    model = _copy(model_dir, tmp_path, "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (model / name).unlink(missing_ok=True)
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(bench_dir),
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "processor", "save_pretrained", "fix")


# ----------------------------------------------------------------------------------------------------
# Devices: checked inside load_model, so `eval` and `unlearn` (and chapters) all get it
# ----------------------------------------------------------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=no_cuda), "bogus", "cuda:x"])
def test_bad_device_eval(tmp_path, capsys, bench_dir, device):
    code, _, err = _eval(capsys, "--model", "tiny", "--data", str(bench_dir), "--device", device,
                         "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, repr(device), "cpu")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=no_cuda), "bogus"])
def test_bad_device_load_model(model_dir, device):
    with pytest.raises(ModelLoadError, match="device"):
        load_model(str(model_dir), device=device)
    with pytest.raises(ModelLoadError, match="device"):
        load_model("tiny", device=device)


@no_cuda
def test_bad_device_unlearn(tmp_path, capsys, bench_dir):
    code = main(["unlearn", "--no-progress", "--model", "tiny", "--data", str(bench_dir), "--method", "ga",
                 "--device", "cuda", "--output", str(tmp_path / "run")])
    _assert_one_line_error(code, capsys.readouterr().err, "'cuda'", "CUDA")


# ----------------------------------------------------------------------------------------------------
# Options argparse rejects (exit 2 from argparse)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--max-new-tokens", "-1"), ("--max-new-tokens", "0"),
                                           ("--seed", "-1")])
def test_bad_number_is_a_usage_error(capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------
# The benchmark's rows
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, column", [("retain_95", "Mask_Task"), ("forget_5", "Classification_Task"),
                                            ("Retain_Set", "Generation_Task")])
def test_json_column_that_does_not_parse(tmp_path, capsys, no_model_load, config, column):
    configs = _small_configs()
    for row in configs[config]:  # exports that store the nested columns as JSON strings
        row[column] = json.dumps(row[column])
    bad = configs[config][1]
    bad[column] = bad[column][: len(bad[column]) // 2]
    folder = write_benchmark(configs, tmp_path / "bench")
    code, _, err = _eval(capsys, "--data", str(folder), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, f"'{config}'", f"'{column}'", f"ID {bad['ID']}", "JSON", "fix")


def test_json_column_of_the_wrong_kind(tmp_path, capsys, no_model_load):
    configs = _small_configs()
    for row in configs["retain_95"]:
        row["Mask_Task"] = json.dumps(row["Mask_Task"])
    configs["retain_95"][0]["Mask_Task"] = "42"  # valid JSON, but not a list of questions
    folder = write_benchmark(configs, tmp_path / "bench")
    code, _, err = _eval(capsys, "--data", str(folder), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "'retain_95'", "'Mask_Task'", f"ID {configs['retain_95'][0]['ID']}", "list")


def test_metadata_that_does_not_parse(tmp_path):
    """ft_Data's metadata is read by `unlearn` (eval does not read ft_Data)."""
    from mlunlearn.data.unlearning import unlearning_data

    configs = _small_configs()
    bad = configs["ft_Data"][2]
    bad["metadata"] = bad["metadata"][:-3]
    bench = open_benchmark(str(write_benchmark(configs, tmp_path / "bench")))
    with pytest.raises(BenchmarkError, match=rf"'ft_Data'.*'metadata'.*ID {bad['ID']}.*JSON"):
        unlearning_data(bench, 5)


def test_metadata_that_does_not_parse_unlearn_cli(tmp_path, capsys):
    configs = _small_configs()
    bad = configs["ft_Data"][0]
    bad["metadata"] = bad["metadata"][:-3]
    folder = write_benchmark(configs, tmp_path / "bench")
    code = main(["unlearn", "--no-progress", "--model", "tiny", "--data", str(folder), "--method", "ga",
                 "--device", "cpu", "--output", str(tmp_path / "run")])
    _assert_one_line_error(code, capsys.readouterr().err, "'ft_Data'", "'metadata'", f"ID {bad['ID']}", "fix")


def test_empty_forget_split(tmp_path, capsys, bench_dir, no_model_load):
    folder = _copy(bench_dir, tmp_path, "bench")
    _set_parquet(folder, "forget_5", lambda table: table.slice(0, 0))  # the columns, zero rows
    code, _, err = _eval(capsys, "--data", str(folder), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "forget_5", "no rows", "fix")
    assert not (tmp_path / "r.json").exists()


def test_test_set_without_the_forget_people(tmp_path, capsys, bench_dir, no_model_load):
    folder = _copy(bench_dir, tmp_path, "bench")
    def other_people(table):
        return table.set_column(table.schema.get_field_index("ID"), "ID",
                                pa.array([f"9{i:02d}" for i in range(len(table))]))

    _set_parquet(folder, "Test_Set", other_people)
    code, _, err = _eval(capsys, "--data", str(folder), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "Test_Set", "no rows for the 2 people of forget_5", "fix")


def test_empty_test_set(tmp_path, capsys, bench_dir, no_model_load):
    folder = _copy(bench_dir, tmp_path, "bench")
    _set_parquet(folder, "Test_Set", lambda table: table.slice(0, 0))
    code, _, err = _eval(capsys, "--data", str(folder), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "Test_Set", "no rows", "fix")


def test_test_set_without_images(tmp_path, capsys, bench_dir, no_model_load):
    folder = _copy(bench_dir, tmp_path, "bench")
    _set_parquet(folder, "Test_Set", lambda table: table.drop(["images"]))
    code, _, err = _eval(capsys, "--data", str(folder), "--output", str(tmp_path / "r.json"))
    _assert_one_line_error(code, err, "Test_Set", "'images'", "fix")


# ----------------------------------------------------------------------------------------------------
# Output paths: checked before the model loads
# ----------------------------------------------------------------------------------------------------

def _bad_paths(tmp_path):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    return {
        "proc": ("/proc/nope/results.json", "/proc"),
        "directory": (str(tmp_path / "a_folder"), "folder"),
        "under_a_file": (str(tmp_path / "a_file" / "results.json"), "not a folder"),
    }


@pytest.mark.parametrize("case", ["proc", "directory", "under_a_file"])
@pytest.mark.parametrize("option", ["--output", "--records", "--benign"])
def test_unwritable_output(tmp_path, capsys, bench_dir, no_model_load, option, case):
    path, needle = _bad_paths(tmp_path)[case]
    args = {"--output": str(tmp_path / "r.json"), option: path}
    code, _, err = _eval(capsys, "--data", str(bench_dir), *[x for kv in args.items() for x in kv])
    _assert_one_line_error(code, err, option, needle, "fix")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys, bench_dir, no_model_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = _eval(capsys, "--data", str(bench_dir), "--output", str(folder / "r.json"))
    finally:
        folder.chmod(0o755)
    _assert_one_line_error(code, err, "--output", "not writable", "fix")


def test_read_only_output_folder_simulated(tmp_path, capsys, bench_dir, no_model_load, monkeypatch):
    """The same case when the tests run as root (who may write anywhere): creating a file is refused."""
    import tempfile

    folder = tmp_path / "ro"
    folder.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse_in_folder(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, folder):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse_in_folder)
    for option in ("--output", "--records", "--benign"):
        args = {"--output": str(tmp_path / "r.json"), option: str(folder / "sub" / "out.json")}
        code, _, err = _eval(capsys, "--data", str(bench_dir), *[x for kv in args.items() for x in kv])
        _assert_one_line_error(code, err, option, "not writable", "Permission denied", "fix")


def test_two_outputs_on_one_path(tmp_path, capsys, bench_dir, no_model_load):
    same = str(tmp_path / "r.json")
    code, _, err = _eval(capsys, "--data", str(bench_dir), "--output", same, "--records", same)
    _assert_one_line_error(code, err, "--output", "--records", "same file")


def test_check_writable_modes(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    # A file: a new one (its folders created later), an existing one; never a folder.
    assert utils.check_writable(tmp_path / "new" / "deeper" / "r.json") == tmp_path / "new" / "deeper" / "r.json"
    utils.check_writable(tmp_path / "a_file")
    with pytest.raises(utils.OutputPathError, match="is a folder"):
        utils.check_writable(tmp_path / "a_folder")
    # A folder: a new or existing folder; never a file, nothing under a file.
    utils.check_writable(tmp_path / "a_folder", kind="folder")
    utils.check_writable(tmp_path / "new_run", kind="folder")
    with pytest.raises(utils.OutputPathError, match="is a file"):
        utils.check_writable(tmp_path / "a_file", kind="folder")
    with pytest.raises(utils.OutputPathError, match="not a folder"):
        utils.check_writable(tmp_path / "a_file" / "run", kind="folder", what="--output")
    with pytest.raises(utils.OutputPathError, match="/proc"):
        utils.check_writable("/proc/nope/run", kind="folder")
    with pytest.raises(ValueError, match="kind"):
        utils.check_writable(tmp_path / "x", kind="dir")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new_run").exists()  # the check creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # no probe file left


# ----------------------------------------------------------------------------------------------------
# Atomic writes: a failure while writing leaves the previous file untouched
# ----------------------------------------------------------------------------------------------------

def _result(n=3):
    return EvalResult([Record(mode="forget", task="classification", modality="Image_Textual", id=str(i),
                              question="q", reply="r", reference="A", scores={"accuracy": 1.0})
                       for i in range(n)])


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_replaces_and_keeps_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "out.json"
    utils.write_atomic(path, "first\n")
    utils.write_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert _listing(path.parent) == ["out.json"]


def test_write_atomic_through_a_symlink(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    utils.write_atomic(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "out.json"
    path.write_text('{"valid": true}\n')

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space"):
        utils.write_atomic(path, '{"new": "text"}\n')
    assert path.read_text() == '{"valid": true}\n'
    assert _listing(tmp_path) == ["out.json"]  # no temporary file left behind


def test_save_json_failure_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = _result().save_json(tmp_path / "results.json")
    before = path.read_text()
    real_dumps = json.dumps
    # A text that cannot be encoded fails while it is being written (as a full disk would).
    monkeypatch.setattr("mlunlearn.eval.results.json.dumps", lambda *a, **k: real_dumps(*a, **k) + "\udc80")
    with pytest.raises(UnicodeEncodeError):
        _result(5).save_json(path)
    assert path.read_text() == before
    json.loads(before)
    assert _listing(tmp_path) == ["results.json"]


def test_save_json_unserialisable_keeps_the_old_file(tmp_path):
    path = _result().save_json(tmp_path / "results.json")
    before = path.read_text()
    bad = _result()
    for record in bad.records:
        record.scores["accuracy"] = Fraction(1)  # averages fine, then is not JSON-serialisable
    with pytest.raises(TypeError):
        bad.save_json(path)
    assert path.read_text() == before
    assert _listing(tmp_path) == ["results.json"]


def test_save_records_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = _result().save_records(tmp_path / "records.jsonl")
    before = path.read_text()
    assert len(before.splitlines()) == 3
    real_dumps, calls = json.dumps, []

    def dumps_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("Object of type X is not JSON serializable")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr("mlunlearn.eval.results.json.dumps", dumps_then_fail)
    with pytest.raises(TypeError):
        _result(5).save_records(path)
    assert path.read_text() == before
    assert _listing(tmp_path) == ["records.jsonl"]


def test_benign_json_is_written_atomically(tmp_path, monkeypatch):
    benign = EvalResult([Record(mode="benign", task="benign_vqa", modality="Image_Textual", id="1",
                                question="q", reply="r", reference=None, scores={"refusal_rate": 0.0},
                                group="fictitious", in_forget=False)], default_by=("group", "in_forget"))
    path = benign.save_json(tmp_path / "benign.json")
    before = path.read_text()
    assert json.loads(before)["overall"] == {"refusal_rate": 0.0, "n": 1}
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        benign.save_json(path)
    assert path.read_text() == before
    assert _listing(tmp_path) == ["benign.json"]
