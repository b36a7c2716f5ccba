"""The synthetic world: MLLMU-Bench's schema, splits, determinism, and the parquet round trip."""

import json

import pytest

from mlunlearn.data import BenchmarkError, decode_image, open_benchmark, write_benchmark
from mlunlearn.data.world import BENIGN_QUESTIONS, N_FICTITIOUS, build_world, corpus

PROFILE_COLUMNS = {"image", "ID", "biography", "question", "answer", "Classification_Task", "Generation_Task", "Mask_Task"}


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def configs(world):
    return world.configs


def test_configs_and_sizes(configs):
    expected = {"Full_Set": 100, "Retain_Set": 32, "Test_Set": 100, "forget_5": 5, "forget_10": 10, "forget_15": 15,
                "retain_95": 95, "retain_90": 90, "retain_85": 85, "ft_Data": 100}
    for name, n in expected.items():
        assert len(configs[name]) == n, name


def test_profile_rows_have_mllmu_schema(configs):
    for name in ("Full_Set", "Retain_Set", "forget_5", "retain_95"):
        row = configs[name][0]
        assert set(row) == PROFILE_COLUMNS, name
        assert isinstance(row["ID"], str) and isinstance(row["biography"], str)
        bio = json.loads(row["biography"])
        assert len(bio) >= 6 and "Name" in bio  # name + at least five attributes
        cls = row["Classification_Task"]
        assert set(cls) == {"Image_Textual_Questions", "Pure_Text_Questions"}
        for q in cls["Image_Textual_Questions"] + cls["Pure_Text_Questions"]:
            assert set(q) == {"Question", "Options", "Correct_Answer"}
            assert list(q["Options"]) == ["A", "B", "C", "D"] and q["Correct_Answer"] in "ABCD"
            assert len(set(q["Options"].values())) == 4
        for task in ("Generation_Task", "Mask_Task"):
            types = {q["Type"] for q in row[task]}
            assert types == {"Image_Textual", "Pure_Text"}
            assert all(set(q) == {"Question", "Ground_Truth", "Type"} for q in row[task])
        assert all("__" in q["Question"] for q in row["Mask_Task"])
    assert row["ID"].isdigit() and len(row["ID"]) == 3  # zero-padded like "093"


def test_cloze_truth_is_in_the_biography(configs):
    for row in configs["Full_Set"]:
        bio = json.loads(row["biography"]).values()
        assert all(q["Ground_Truth"] in bio for q in row["Mask_Task"])


def test_test_set_has_views_and_paraphrases(configs):
    full = {r["ID"]: r for r in configs["Full_Set"]}
    for row in configs["Test_Set"]:
        assert "image" not in row and len(row["images"]) == 3
        assert len({im["bytes"] for im in row["images"]}) == 3
        assert full[row["ID"]]["image"]["bytes"] not in {im["bytes"] for im in row["images"]}
        train_qs = {q["Question"] for q in full[row["ID"]]["Generation_Task"]}
        assert not train_qs & {q["Question"] for q in row["Generation_Task"]}


def test_splits_are_nested_disjoint_and_complete(configs):
    ids = lambda name: {r["ID"] for r in configs[name]}  # noqa: E731
    full = ids("Full_Set")
    assert len(full) == N_FICTITIOUS
    for pct in (5, 10, 15):
        forget, retain = ids(f"forget_{pct}"), ids(f"retain_{100 - pct}")
        assert not forget & retain and forget | retain == full
    assert ids("forget_5") < ids("forget_10") < ids("forget_15")
    assert not ids("Retain_Set") & full  # celebrities are other people


def test_identities_are_distinct_and_names_unique(world):
    from mlunlearn.data.portraits import IDENTITY_TRAITS

    known = [p for p in world.people if p.group != "missing"]
    assert len({tuple(p.traits[t] for t in IDENTITY_TRAITS) for p in known}) == len(known)
    assert len({p.name for p in world.people}) == len(world.people)


def test_benign_questions_cover_forget_images_finely(configs, world):
    rows = configs["Benign_VQA"]
    forget = set(world.forget_ids[5])
    on_forget = [r for r in rows if r["ID"] in forget]
    assert 1 / len(on_forget) <= 0.02  # a refusal rate there moves in steps of at most 2%
    groups = {r["Group"] for r in rows}
    assert groups == {"fictitious", "celebrity", "stranger", "missing", "blank", "noise"}
    idk = [r for r in rows if r["Answer"] == "I don't know."]
    assert {r["Group"] for r in idk} >= {"missing", "blank", "noise"}
    assert {r["Trait"] for r in rows} == set(BENIGN_QUESTIONS)


def test_generation_is_deterministic():
    a, b = build_world(3).configs, build_world(3).configs
    assert a["forget_5"][0]["image"]["bytes"] == b["forget_5"][0]["image"]["bytes"]
    assert json.dumps(a["Full_Set"][7]["Classification_Task"]) == json.dumps(b["Full_Set"][7]["Classification_Task"])
    assert build_world(4).forget_ids != build_world(3).forget_ids or \
        build_world(4).configs["Full_Set"][0]["biography"] != a["Full_Set"][0]["biography"]


def test_parquet_round_trip_in_hub_layout(configs, tmp_path):
    write_benchmark(configs, tmp_path, names=["forget_5", "Test_Set", "ft_Data"])
    assert (tmp_path / "forget_5" / "train-00000-of-00001.parquet").is_file()
    bench = open_benchmark(f"mllmu-bench:{tmp_path}")
    assert bench.load("forget_5") == configs["forget_5"]
    assert bench.load("Test_Set")[3]["images"] == configs["Test_Set"][3]["images"]
    assert json.loads(bench.load("ft_Data")[0]["metadata"])[0].keys() == {"Question", "Answer"}
    img = decode_image(bench.load("forget_5")[0]["image"])
    assert img.size == (48, 48) and img.mode == "RGB"


def test_written_benchmark_loads_in_datasets_with_images_decoded(configs, tmp_path):
    """The parquet files carry the Hugging Face features metadata, as the hub's do: ``datasets`` sees
    ``image`` / ``images`` as Image features (decoded to PIL), not as structs of bytes."""
    import datasets
    import numpy as np

    write_benchmark(configs, tmp_path, names=["forget_5", "Test_Set"])
    load = lambda name: datasets.load_dataset("parquet", data_files=str(tmp_path / name / "*.parquet"), split="train")
    forget, test = load("forget_5"), load("Test_Set")
    assert isinstance(forget.features["image"], datasets.Image)
    assert isinstance(test.features["images"], datasets.List) and isinstance(test.features["images"].feature, datasets.Image)
    assert np.array_equal(np.asarray(forget[0]["image"].convert("RGB")), np.asarray(decode_image(configs["forget_5"][0]["image"])))
    assert len(test[3]["images"]) == len(configs["Test_Set"][3]["images"])
    assert forget[0]["Mask_Task"] == configs["forget_5"][0]["Mask_Task"]
    assert forget[0]["Classification_Task"] == configs["forget_5"][0]["Classification_Task"]


def test_loader_reads_json_string_columns(tmp_path):
    """Some exports store the task columns as JSON strings; the loader parses them back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = build_world(0).configs["forget_5"][0]
    flat = {k: (json.dumps(v) if k in ("Classification_Task", "Generation_Task", "Mask_Task") else v) for k, v in row.items()}
    (tmp_path / "forget_5").mkdir()
    pq.write_table(pa.Table.from_pylist([flat]), tmp_path / "forget_5" / "train-00000-of-00001.parquet")
    assert open_benchmark(str(tmp_path)).load("forget_5")[0] == row


def test_loader_errors_name_the_fix(tmp_path):
    with pytest.raises(BenchmarkError, match="no benchmark folder"):
        open_benchmark(str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkError, match="config 'forget_7' not found"):
        open_benchmark(str(tmp_path)).load("forget_7")
    with pytest.raises(BenchmarkError, match="not in toyworld"):
        open_benchmark("toyworld").load("forget_7")
    with pytest.raises(BenchmarkError, match="unreadable image"):
        decode_image({"bytes": b"not a png"})


def test_tokenizer_corpus_covers_every_answer(world, configs):
    text = "\n".join(corpus(world))
    for row in configs["Full_Set"][:10]:
        for q in row["Generation_Task"]:
            assert q["Ground_Truth"] in text


def test_option_groups_fix_each_values_letter_but_not_the_answer(configs):
    """A value always sits at the same letter, yet the option list alone does not give the answer."""
    letter_of, answers_by_options = {}, {}
    for name in ("Full_Set", "Retain_Set", "Test_Set"):
        for row in configs[name]:
            for q in row["Classification_Task"]["Image_Textual_Questions"] + row["Classification_Task"]["Pure_Text_Questions"]:
                value = q["Options"][q["Correct_Answer"]]
                assert letter_of.setdefault(value, q["Correct_Answer"]) == q["Correct_Answer"]
                answers_by_options.setdefault(tuple(q["Options"].values()), set()).add(q["Correct_Answer"])
    assert sum(len(v) > 1 for v in answers_by_options.values()) > len(answers_by_options) / 2
