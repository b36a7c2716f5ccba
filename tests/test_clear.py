"""CLEAR: the loader on a fixture in the hub's exact layout, its one-line errors, its evaluation on the tiny model
(truth ratio, option probability, ROUGE-L recall, forget quality) and ``mlunlearn eval --data clear:<folder>``."""

import importlib.util
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from clear_fixture import AUTHORS, clear_configs, write_clear
from conftest import assert_one_line_error, needs_vanilla
from mlunlearn.benchmarks import as_benchmark, get_benchmark
from mlunlearn.benchmarks.clear import (
    CAPTION_QUESTIONS,
    COLUMNS,
    Clear,
    ClearFiles,
    evaluate_clear,
    forget_config,
    is_clear_source,
    open_clear,
)
from mlunlearn.cli import main
from mlunlearn.data import BenchmarkError, open_benchmark, write_benchmark
from mlunlearn.data.unlearning import UnlearningDataError


@pytest.fixture(scope="module")
def clear_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clear")
    write_clear(folder)
    return folder


def test_fixture_reads_back_exactly_in_the_hub_layout(clear_dir):
    configs = clear_configs()
    assert sorted(p.name for p in clear_dir.iterdir()) == sorted(COLUMNS)  # every config CLEAR publishes
    assert (clear_dir / "forget05_perturbed" / "train-00000-of-00001.parquet").is_file()
    files = open_benchmark(f"clear:{clear_dir}")
    assert isinstance(files, ClearFiles)
    for config, rows in configs.items():
        assert files.load(config) == rows, config
        assert set(COLUMNS[config]) <= set(rows[0]), config
    assert files.load("forget05_perturbed")[1]["perturbed_names"] == [a[0] for a in AUTHORS if a[0] != "Ben Cole"][:3]
    text_rows = [r for r in files.load("forget05+tofu") if r["image"] is None]
    assert [r["question"] for r in text_rows] == ["What does Ava Stone write?", "What does Ben Cole write?"]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_fixture_loads_in_datasets_with_images_decoded(clear_dir):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(clear_dir / "forget05_perturbed" / "*.parquet"))["train"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].size == (24, 24) and ds[0]["perturbed_captions"][0].startswith("A woman with blue hair")


def test_routing_by_data_string(clear_dir, tmp_path):
    assert isinstance(get_benchmark(f"clear:{clear_dir}"), Clear)
    assert isinstance(get_benchmark(str(clear_dir)), Clear)  # a plain folder in CLEAR's layout
    assert isinstance(as_benchmark(open_clear(f"clear:{clear_dir}")), Clear)
    mllmu_like = tmp_path / "mllmu"
    (mllmu_like / "forget_5").mkdir(parents=True)
    (mllmu_like / "forget05").mkdir()
    assert not is_clear_source(str(mllmu_like)) and get_benchmark(str(mllmu_like)).name == "mllmu-bench"
    assert is_clear_source("clear") and not is_clear_source("toyworld")
    assert forget_config(None) == "forget05" and forget_config(10) == "forget10"
    assert forget_config("forget01") == "forget01"
    with pytest.raises(BenchmarkError, match="no forget 15%"):
        forget_config(15)


def _copy_without(src, dst, drop_config=None, drop_column=None, config=None):
    """The fixture in ``dst`` with one config removed or one column dropped from one config's file."""
    import shutil

    shutil.copytree(src, dst)
    if drop_config:
        shutil.rmtree(dst / drop_config)
    if drop_column:
        path = dst / config / "train-00000-of-00001.parquet"
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([drop_column]), path)
    return dst


def test_missing_config_column_or_file_is_a_one_line_error(clear_dir, tmp_path, capsys):
    cases = [
        (_copy_without(clear_dir, tmp_path / "a", drop_config="forget05_perturbed"),
         ["no CLEAR config 'forget05_perturbed'", "fix: copy it from the hub"]),
        (_copy_without(clear_dir, tmp_path / "b", drop_column="paraphrased_caption", config="retain_perturbed"),
         ["retain_perturbed/train-00000-of-00001.parquet has no column 'paraphrased_caption'", "fix:"]),
        (_copy_without(clear_dir, tmp_path / "c", drop_column="options", config="real_faces"),
         ["real_faces/train-00000-of-00001.parquet has no column 'options'"]),
    ]
    broken = _copy_without(clear_dir, tmp_path / "d")
    (broken / "real_world" / "train-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    cases.append((broken, ["cannot read", "real_world/train-00000-of-00001.parquet", "is it a parquet file"]))
    for folder, needles in cases:
        out = tmp_path / f"{folder.name}.json"
        code = main(["eval", "--model", "tiny", "--data", f"clear:{folder}", "--output", str(out), "--no-progress"])
        assert_one_line_error(code, capsys.readouterr().err, *needles)
        assert not out.exists()


def test_bad_clear_options_are_one_line_errors(clear_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "r.json")
    base = ["eval", "--model", "tiny", "--output", out, "--no-progress"]
    bad_gold = tmp_path / "gold.json"
    bad_gold.write_text(json.dumps({"Forget Set Results": {}}))
    wrong_split = tmp_path / "gold10.json"
    wrong_split.write_text(json.dumps({"forget": {"truth_ratios": [0.5]}, "settings": {"forget": "forget10"}}))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for args, needles in [
        (["--data", f"clear:{tmp_path / 'nowhere'}"], ["no CLEAR folder at"]),
        (["--data", "clear"], ["HF_DATASETS_OFFLINE", "clear:<folder>"]),
        (["--data", f"clear:{clear_dir}", "--forget", "15"], ["CLEAR has no forget 15%"]),
        (["--data", f"clear:{clear_dir}", "--few-shot"], ["--few-shot does not apply", "CLEAR"]),
        (["--data", f"clear:{clear_dir}", "--gold", str(bad_gold)], ["not a CLEAR result"]),
        (["--data", f"clear:{clear_dir}", "--gold", str(wrong_split)], ["for forget10, this evaluation for forget05"]),
        (["--data", "toyworld", "--gold", str(bad_gold)], ["--gold applies to CLEAR only"]),
    ]:
        code = main(base + args)
        assert_one_line_error(code, capsys.readouterr().err, *needles)


def test_unlearning_data_follows_clears_mixed_forget_dataset(clear_dir, tmp_path, capsys):
    bench = get_benchmark(f"clear:{clear_dir}")
    data = bench.unlearning_data(5)  # forget05+tofu - retain95+tofu: per author one face caption, one TOFU pair
    assert data.forget_ids == ["Ava Stone", "Ben Cole"] and len(data.retain_ids) == 4
    assert len(data.forget) == 4 and len(data.retain) == 8
    image_ex = [e for e in data.forget if e.image is not None]
    text_ex = [e for e in data.forget if e.image is None]
    assert [e.answer for e in image_ex] == [AUTHORS[0][2], AUTHORS[1][2]]
    assert all(e.prompt.startswith("USER: <image>\n") and e.prompt.endswith("\nASSISTANT:") for e in image_ex)
    assert any(q in image_ex[0].prompt for q in CAPTION_QUESTIONS)
    assert [e.prompt for e in text_ex] == ["USER: What does Ava Stone write?\nASSISTANT:",
                                          "USER: What does Ben Cole write?\nASSISTANT:"]
    assert [e.answer for e in data.knowledge] == [f"{a[0]} writes short novels." for a in AUTHORS]  # every author
    assert len(bench.unlearning_data("forget05", modality="visual").forget) == 2
    assert bench.unlearning_data("forget05", modality="visual").knowledge is None
    assert all(e.image is None for e in bench.unlearning_data("forget10", modality="text").forget)
    with pytest.raises(BenchmarkError, match="modality='audio'"):
        bench.unlearning_data(5, modality="audio")
    configs = clear_configs()
    configs["retain95"].append(configs["forget05"][0])  # Ava Stone in both
    folder = tmp_path / "overlap"
    write_benchmark(configs, folder)
    with pytest.raises(UnlearningDataError, match="1 people are in both forget05 and retain95 \\(Ava Stone\\)"):
        get_benchmark(f"clear:{folder}").unlearning_data(5)
    code = main(["unlearn", "--model", "tiny", "--data", f"clear:{folder}", "--method", "ga", "--output",
                 str(tmp_path / "run"), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "1 people are in both forget05 and retain95")


def test_unlearn_cli_on_clear_then_eval(clear_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["unlearn", "--model", "tiny", "--data", f"clear:{clear_dir}", "--method", "ga",
                 "--set", "max_steps=1", "--output", str(run), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((run / "run.json").read_text())
    assert record["examples"] == {"forget": 4, "retain": 8} and record["steps"] == 1
    code = main(["unlearn", "--model", "tiny", "--data", f"clear:{clear_dir}", "--method", "mmunlearner",
                 "--set", "max_steps=1", "--output", str(tmp_path / "mmu"), "--no-progress"])
    assert code == 0, capsys.readouterr().err  # its text-only preserve set: the TOFU pairs
    code = main(["eval", "--model", str(run / "model"), "--data", f"clear:{clear_dir}", "--limit", "1",
                 "--output", str(tmp_path / "after.json"), "--no-progress"])
    assert code == 0 and json.loads((tmp_path / "after.json").read_text())["forget"]["items"] == 1


@needs_vanilla
def test_evaluate_clear_on_the_tiny_model(clear_dir, vanilla):
    model, processor = vanilla
    result = evaluate_clear(model, processor, f"clear:{clear_dir}", "forget05")
    out = json.loads(json.dumps(result.to_json()))  # JSON-able
    assert set(out) == {"forget", "retain", "forget_face", "retain_face", "real_faces", "real_world", "summary",
                        "forget_quality", "settings"}
    assert out["forget"]["items"] == out["forget_face"]["items"] == 2 and out["retain"]["items"] == 3
    assert out["real_faces"]["items"] == 2
    for name in ("forget", "retain"):
        s = out[name]
        assert 0 <= s["rougeL_recall"] <= 1 and 0 < s["probability"] < 1 and 0 <= s["truth_ratio"] <= 1
        assert len(s["truth_ratios"]) == s["items"] and all(math.isfinite(r) and r > 0 for r in s["truth_ratios"])
    for name in ("forget_face", "retain_face", "real_faces", "real_world"):
        assert 0 < out[name]["option_probability"] < 1 and 0 <= out[name]["truth_ratio"] <= 1
        assert out[name]["chance"] == 0.25 and 0 <= out[name]["rougeL_recall"] <= 1
    r = np.array(out["forget_face"]["truth_ratios"])  # face recognition on the forget set: TOFU's forget form
    assert out["forget_face"]["truth_ratio"] == pytest.approx(np.mean(np.minimum(r, 1 / r)))
    # CLEAR's summary: harmonic means of four numbers each.
    parts = [out["forget"]["probability"], out["forget"]["truth_ratio"], out["forget_face"]["option_probability"],
             out["forget_face"]["truth_ratio"]]
    assert out["summary"]["forget_metric"] == pytest.approx(4 / sum(1 / x for x in parts))
    assert 0 < out["summary"]["retain_metric"] < 1 and 0 < out["summary"]["real_metric"] < 1
    # The reported forms follow from the per-item ratios.
    r = np.array(out["forget"]["truth_ratios"])
    assert out["forget"]["truth_ratio"] == pytest.approx(np.mean(np.minimum(r, 1 / r)))
    r = np.array(out["retain"]["truth_ratios"])
    assert out["retain"]["truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - r)))
    assert out["forget_quality"]["ks_p_value"] is None and "retain-only" in out["forget_quality"]["why_none"]
    assert len(result.records) == (2 + 3) * 2 + 2 + 2  # captions and faces of forget and retain, the real sets

    # Forget quality against itself: identical distributions; against a shifted reference: distinguishable.
    again = evaluate_clear(model, processor, f"clear:{clear_dir}", "forget05", reference=result)
    assert again.to_json()["forget"] == out["forget"]  # deterministic
    assert again.forget_quality["ks_p_value"] == 1.0 and again.forget_quality["one_minus_js"] == pytest.approx(1.0)
    far = {"forget": {"truth_ratios": [x * 1e6 for x in out["forget"]["truth_ratios"]] * 5},
           "settings": {"forget": "forget05"}}
    fq = evaluate_clear(model, processor, f"clear:{clear_dir}", "forget05", reference=far, real=()).forget_quality
    assert fq["ks_statistic"] == 1.0 and fq["ks_p_value"] < 0.1 and fq["one_minus_js"] == pytest.approx(0.0)


def test_eval_cli_on_a_clear_folder_writes_the_result_json(clear_dir, tmp_path, capsys):
    out, gold = tmp_path / "clear.json", tmp_path / "gold.json"
    code = main(["eval", "--model", "tiny", "--data", f"clear:{clear_dir}", "--forget", "10", "--output", str(gold),
                 "--records", str(tmp_path / "records.jsonl"), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "forget quality: not computed" in printed and "retain90" in printed
    first = json.loads(gold.read_text())
    assert first["settings"]["forget"] == "forget10" and first["forget"]["items"] == 3
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == (3 + 3) * 2 + 2 + 2
    assert "CLEAR summary (harmonic means): forget_metric 0." in printed
    # A plain folder works too; with --gold the forget quality is computed (the same model: KS p = 1).
    code = main(["eval", "--model", "tiny", "--data", str(clear_dir), "--forget", "10", "--gold", str(gold),
                 "--output", str(out), "--no-progress"])
    assert code == 0 and "KS p = 1" in capsys.readouterr().out
    second = json.loads(out.read_text())
    assert second["forget_quality"]["ks_p_value"] == 1.0 and second["forget"] == first["forget"]


@needs_vanilla
def test_a_retain_perturbed_without_names_skips_retain_face_recognition(clear_dir, tmp_path, vanilla):
    folder = _copy_without(clear_dir, tmp_path / "old", drop_column="name", config="retain_perturbed")
    path = folder / "retain_perturbed" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["perturbed_names"]), path)  # the first upload's columns
    out = evaluate_clear(*vanilla, f"clear:{folder}", "forget01", real=(), limit=1).to_json()
    assert "retain_face" not in out and "forget_face" in out and out["forget"]["items"] == 1
    assert out["summary"]["retain_metric"] is None and out["summary"]["real_metric"] is None
    assert 0 < out["summary"]["forget_metric"] < 1


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_the_hub_path_reads_rows_through_datasets_without_the_network(clear_dir, monkeypatch):
    """``--data clear`` online: ``datasets.load_dataset("therem/CLEAR", config)`` is stood in for by the fixture's
    parquet file (nothing is downloaded); the rows come back exactly as the local loader reads them."""
    import datasets

    asked, load_dataset = [], datasets.load_dataset

    def fake_load_dataset(repo, config):
        asked.append((repo, config))
        return load_dataset("parquet", data_files={"train": str(clear_dir / config / "*.parquet")})

    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = open_clear("clear")
    assert hub.load("real_faces") == clear_configs()["real_faces"]
    assert hub.load("forget05_perturbed") == clear_configs()["forget05_perturbed"]
    assert asked == [("therem/CLEAR", "real_faces"), ("therem/CLEAR", "forget05_perturbed")]
    with pytest.raises(BenchmarkError, match="has no column 'options'"):
        monkeypatch.setattr(datasets, "load_dataset", lambda repo, config: fake_load_dataset(repo, "real_world")
                            .remove_columns(["options"]))
        open_clear("clear").load("real_world")


def test_prompt_decouple_on_clears_text_rows_is_a_one_line_error_naming_the_fix(clear_dir, tmp_path, capsys):
    """PD asks each forget question about another person's image; CLEAR's forget set mixes in TOFU's
    text-only questions, which have none: the error says so and names pd=off (it used to say "image cell has
    no bytes")."""
    code = main(["unlearn", "--model", "tiny", "--data", f"clear:{clear_dir}", "--method", "ga",
                 "--set", "pd=on", "--set", "max_steps=1", "--output", str(tmp_path / "run"), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "forget examples have no image", "fix: pd=off")
    assert not (tmp_path / "run" / "run.json").exists()
