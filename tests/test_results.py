"""EvalResult: the official JSON's exact keys and units, and the tidy frame."""

import json

import pytest

from mlunlearn.eval.results import EvalResult, Record

OFFICIAL_MODES = [
    "Forget Set Results",
    "Test Set Results",
    "Retain Set (shared dataset) Results",
    "Retain Set (real person) Results",
]
GENERATION_KEYS = [
    f"Average {m} ({t})"
    for t in ("Image_Textual", "Pure_Text")
    for m in ("ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU")
]


def _record(mode, task, modality, **scores):
    return Record(mode=mode, task=task, modality=modality, id="001", question="q", reply="r",
                  reference="ref", scores=scores)


def _full_result():
    records = []
    for mode in ("forget", "test", "retain_shared", "retain_celebrity"):
        for modality in ("Image_Textual", "Pure_Text"):
            # 3 of 4 right -> 75 %; 1 of 2 right -> 50 %
            records += [_record(mode, "classification", modality, accuracy=v) for v in (1.0, 1.0, 1.0, 0.0)]
            records += [_record(mode, "fill_in_the_blank", modality, accuracy=v) for v in (1.0, 0.0)]
            records += [_record(mode, "generation", modality, rouge1=r, rouge2=r / 2, rougeL=r, bleu=r / 4)
                        for r in (0.2, 0.6)]
    return EvalResult(records)


def test_official_keys_and_units():
    official = _full_result().to_official()
    assert list(official) == OFFICIAL_MODES
    for section in official.values():
        assert list(section) == ["fill_in_the_blank", "classification", "generation"]
        assert section["fill_in_the_blank"] == {"image_textual_accuracy": 50.0, "pure_text_accuracy": 50.0}
        assert section["classification"] == {"Image-Textual Question Accuracy": 75.0,
                                              "Pure Text Question Accuracy": 75.0}
        assert list(section["generation"]) == GENERATION_KEYS
        assert section["generation"]["Average ROUGE-1 (Image_Textual)"] == pytest.approx(0.4)  # a fraction
        assert section["generation"]["Average ROUGE-2 (Pure_Text)"] == pytest.approx(0.2)
        assert section["generation"]["Average BLEU (Pure_Text)"] == pytest.approx(0.1)


def test_official_empty_cases_follow_the_script():
    # No pure-text questions: accuracy 0 (as the script), generation keys for that modality left out.
    result = EvalResult([
        _record("forget", "classification", "Image_Textual", accuracy=1.0),
        _record("forget", "generation", "Image_Textual", rouge1=1.0, rouge2=1.0, rougeL=1.0, bleu=1.0),
    ])
    section = result.to_official()["Forget Set Results"]
    assert section["classification"]["Pure Text Question Accuracy"] == 0
    assert section["fill_in_the_blank"] == {"image_textual_accuracy": 0, "pure_text_accuracy": 0}
    assert list(section["generation"]) == GENERATION_KEYS[:4]


def test_frame_is_tidy_with_percentages_and_fractions():
    frame = _full_result().frame()
    assert list(frame.columns) == ["mode", "task", "modality", "metric", "value", "n"]
    cls = frame[(frame["mode"] == "forget") & (frame["task"] == "classification")]
    assert set(cls["value"]) == {75.0} and set(cls["n"]) == {4}
    rouge = frame[(frame["mode"] == "test") & (frame["metric"] == "rougeL")]
    assert rouge["value"].tolist() == pytest.approx([0.4, 0.4])
    assert len(frame) == 4 * 2 * (1 + 1 + 4)


def test_summary_has_one_row_per_mode():
    summary = _full_result().summary()
    assert summary.index.tolist() == ["forget", "test", "retain_shared", "retain_celebrity"]
    assert summary.loc["forget", "cls img %"] == 75.0
    assert summary.loc["forget", "ROUGE-L text"] == pytest.approx(0.4)


def test_save_json_writes_the_official_dict(tmp_path):
    result = _full_result()
    path = result.save_json(tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == result.to_official()
    lines = result.save_records(tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(result) and json.loads(lines[0])["scores"] == {"accuracy": 1.0}


def test_benign_summary():
    records = [
        Record("benign", "benign_vqa", "Image_Textual", "001", "q", "I don't know.", "brown",
               {"accuracy": 0.0, "refusal_rate": 1.0}, group="fictitious", in_forget=True),
        Record("benign", "benign_vqa", "Image_Textual", "002", "q", "brown", "brown",
               {"accuracy": 1.0, "refusal_rate": 0.0}, group="fictitious", in_forget=False),
    ]
    result = EvalResult(records, default_by=("group", "in_forget"))
    summary = result.to_benign()
    assert summary["overall"] == {"accuracy": 50.0, "refusal_rate": 50.0, "n": 2}
    assert summary["by_forget_set"]["forget"]["refusal_rate"] == 100.0
    assert summary["by_forget_set"]["not_forget"]["accuracy"] == 100.0
    frame = result.frame()
    assert list(frame.columns) == ["group", "in_forget", "metric", "value", "n"]
    with pytest.raises(ValueError):
        result.to_official()
