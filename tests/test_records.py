"""Run records (mlunlearn/records.py) and their recheck (tools/recheck_records.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import needs_vanilla
from mlunlearn import records
from mlunlearn.engine import UnlearnConfig

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("recheck_records", ROOT / "tools" / "recheck_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


# -- cached ---------------------------------------------------------------------------------------------


def test_cached_stores_then_loads_when_the_key_matches(tmp_path):
    fn = Counter({"x": (1, 2.5)})
    first = records.cached("r", fn, {"lr": 1e-3, "seed": 0}, tmp_path)
    assert fn.calls == 1 and first == {"x": [1, 2.5]}  # returned as it reads back from JSON
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored["key"] == {"lr": 1e-3, "seed": 0} and stored["value"] == {"x": [1, 2.5]}

    again = records.cached("r", Counter({"x": "never"}), {"seed": 0, "lr": 1e-3}, tmp_path)
    assert again == first  # same key (order does not matter): the stored value, fn not called


def test_cached_recomputes_when_the_key_differs_and_replaces_the_record(tmp_path):
    records.cached("r", Counter(1), {"lr": 1e-3}, tmp_path)
    fn = Counter(2)
    assert records.cached("r", fn, {"lr": 3e-3}, tmp_path) == 2 and fn.calls == 1
    assert json.loads((tmp_path / "r.json").read_text())["key"] == {"lr": 3e-3}
    fn = Counter(3)
    assert records.cached("r", fn, {"lr": 3e-3}, tmp_path, recompute=True) == 3 and fn.calls == 1


def test_cached_recomputes_an_unreadable_record(tmp_path):
    (tmp_path / "r.json").write_text('{"key": {"lr": 0.001}, "val')  # a truncated write
    fn = Counter(7)
    assert records.cached("r", fn, {"lr": 1e-3}, tmp_path) == 7 and fn.calls == 1


def test_record_names_are_plain_file_names(tmp_path):
    with pytest.raises(ValueError):
        records.cached("../escape", Counter(1), {}, tmp_path)


# -- diff -----------------------------------------------------------------------------------------------


def test_diff_is_exact():
    x = 75.43859649122807
    assert records.diff({"a": [x, math.nan, None]}, {"a": [x, math.nan, None]}) == []
    assert records.diff({"a": [x]}, {"a": [math.nextafter(x, 0)]}) != []  # one ulp apart
    assert records.diff({"a": 1}, {"a": 1.0}) != []
    assert records.diff({"a": 1}, {"b": 1}) == ["value['a']: stored 1, recomputed (missing)",
                                                 "value['b']: stored (missing), recomputed 1"]
    assert records.diff([1, 2], [1]) == ["value: stored 2 items, recomputed 1"]


# -- recheck: a cheap task registered for the test ------------------------------------------------------


@pytest.fixture
def square_task(monkeypatch):
    monkeypatch.setitem(records.TASKS, "square", lambda key, context: {"y": key["n"] ** 2 / 3})
    return {"task": "square", "n": 4, **records.environment()}


def _tamper(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record["value"])
    path.write_text(json.dumps(record))


def test_recheck_passes_an_honest_record_and_catches_a_tampered_one(tmp_path, square_task, capsys):
    records.cached_task("sq", square_task, tmp_path)
    path = tmp_path / "sq.json"
    assert records.recheck(path) == []
    assert _tool().main(["sq", "--folder", str(tmp_path)]) == 0

    _tamper(path, lambda v: v.update(y=v["y"] + 1e-9))
    assert records.recheck(path) == [f"value['y']: stored {16 / 3 + 1e-9!r}, recomputed {16 / 3!r}"]
    capsys.readouterr()
    assert _tool().main(["--all", "--folder", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL   sq: 1 value(s) differ" in out and "recomputed 5.333333333333333" in out


def test_recheck_refuses_records_of_other_versions(tmp_path, square_task, capsys):
    key = {**square_task, "torch": "0.0.1"}
    records.cached("old", lambda: {"y": 0}, key, tmp_path)
    with pytest.raises(records.EnvironmentMismatch):
        records.recheck(tmp_path / "old.json")
    assert _tool().main(["old", "--folder", str(tmp_path)]) == 1
    assert "made with torch 0.0.1" in capsys.readouterr().out


def test_recheck_fails_on_a_missing_record(tmp_path, capsys):
    assert _tool().main(["nothing_here", "--folder", str(tmp_path)]) == 1
    assert "no record nothing_here.json" in capsys.readouterr().out


def test_the_default_recheck_subset_is_committed():
    folder = ROOT / "book" / "records"
    for name in _tool().DEFAULT:
        key = records.read_record(folder / f"{name}.json")["key"]
        assert key["task"] in records.TASKS


# -- a real task, recomputed from its key alone ---------------------------------------------------------


@needs_vanilla
def test_a_sweep_record_is_reproduced_from_its_key_and_tampering_is_caught(tmp_path, vanilla):
    model, processor = vanilla
    from mlunlearn.data import open_benchmark

    context = records.Context().add("tiny", "cpu", "toyworld", model, processor, open_benchmark("toyworld"))
    methods = {"plain": ("po", {"params": "lora+projector"})}
    key = records.sweep_key("tiny", "toyworld", methods, [3e-3], UnlearnConfig(max_steps=2, seed=0))
    value = records.cached_task("s", key, tmp_path, context)
    assert [row["method"] for row in value["sweep"]] == ["plain"]
    path = tmp_path / "s.json"
    assert records.recheck(path, context) == []  # a second, independent run gives the same numbers

    _tamper(path, lambda v: v["sweep"][0].update({"retain exact %": 100.0}))
    assert any("retain exact %" in line for line in records.recheck(path, context))


# -- compare records with run summaries, shared by chapters 5 and 6 -----------------------------------------


def test_run_summaries_enter_a_compare_key_only_when_asked():
    methods = {"GA": ("ga", {})}
    plain = records.compare_key("tiny", "toyworld", methods, UnlearnConfig(seed=0))
    assert "runs" not in plain  # chapter 4's records keep their keys
    assert records.compare_key("tiny", "toyworld", methods, UnlearnConfig(seed=0), runs=True) == {**plain, "runs": True}


def test_a_comparison_from_a_record_keeps_its_rows_and_runs_and_adds_to_another():
    from mlunlearn.experiments import Comparison

    value = records.canonical({"table": [{"method": "vanilla", "lr": None, "forget cls img": 100.0},
                                         {"method": "GA", "lr": 1e-3, "forget cls img": 0.0}],
                               "runs": {"GA": {"lr": 1e-3, "parametrisation": "lora", "steps": 40}}})
    base = Comparison.from_record(value)
    assert list(base.table.index) == ["vanilla", "GA"]
    assert base.runs["GA"] == {"config": {"lr": 1e-3}, "parametrisation": "lora", "steps": 40}  # run.json's layout
    ours = Comparison(base.table.loc[["GA"]].rename(index={"GA": "X"}), logs={"X": "log"},
                      runs={"X": {"steps": 7}})
    both = base + ours
    assert list(both.table.index) == ["vanilla", "GA", "X"]
    assert both.runs == {"GA": base.runs["GA"], "X": {"steps": 7}} and both.logs == {"X": "log"}


def test_an_unknown_baseline_is_named():
    from mlunlearn.experiments import baseline_comparison

    with pytest.raises(ValueError, match="unknown baseline 'GD'; use some of GA, GradDiff, NPO"):
        baseline_comparison(None, None, None, ["GD"])


# -- compare records with detail (chapter 2: logs, shown replies, benign records) ---------------------------


def test_detail_enters_a_compare_key_only_when_asked():
    methods = {"GA": ("ga", {"lr": 1e-3})}
    config = UnlearnConfig(seed=0)
    literal = {"task": "compare", "model": "tiny", "device": "cpu", "data": "toyworld", "forget": 5,
               "methods": {"GA": ["ga", {"lr": 1e-3}]},
               # the config as keys held it before LATER_FIELDS were added to UnlearnConfig
               "config": records.canonical({k: v for k, v in dataclasses.asdict(config).items()
                                            if k not in records.LATER_FIELDS}),
               "vanilla": True, "batch_size": 64, "monitor": None, **records.environment()}
    assert records.compare_key("tiny", "toyworld", methods, config) == literal  # old keys are unchanged
    assert records.compare_key("tiny", "toyworld", methods, config, runs=True) == {**literal, "runs": True}
    detailed = records.compare_key("tiny", "toyworld", methods, config, detail=True, show=3)
    assert {k: v for k, v in detailed.items() if k != "detail"} == literal
    assert detailed["detail"]["show"] == {"split": "forget", "first": 3}


def _key_again(key: dict) -> dict:
    """The key today's code gives for the settings a record's key names (its own task's key builder)."""
    config = records._config(key)
    if key["task"] == "lr_sweep":
        return records.sweep_key(key["model"], key["data"], records._specs(key), key["lrs"], config, key["forget"],
                                 key["device"])
    if key["task"] == "safety_compare":
        return records.safety_key(key["model"], key["data"], records._specs(key), config, key["vanilla"],
                                  key["batch_size"], key["device"])
    assert key["task"] == "compare", key["task"]
    extra = {"detail": True, "show": key["detail"]["show"]["first"],
             "replies": key["detail"]["replies"]["first"],
             "reply_chars": key["detail"]["benign"]["reply_chars"],
             "benign_accuracy": key["detail"]["benign"].get("accuracy", False)} if "detail" in key else {}
    if "measure" in key:
        extra["measure"] = records.measure_spec(**key["measure"]["projector"])
    return records.compare_key(key["model"], key["data"], records._specs(key), config, key["forget"],
                               key["vanilla"], key["batch_size"], key["monitor"], key["device"],
                               runs=key.get("runs", False), **extra)


def test_the_committed_records_keep_their_keys():
    """Every record in book/records (lr_sweep, compare, safety_compare) has exactly the key its task's key
    builder gives for its settings today, so no chapter recomputes because the code changed."""
    paths = sorted((ROOT / "book" / "records").glob("*.json"))
    tasks = set()
    for path in paths:
        key = records.read_record(path)["key"]
        tasks.add(key["task"])
        assert _key_again(key) == key, path.name
    assert tasks == set(records.TASKS), tasks  # every kind of record is covered


def test_config_fields_added_later_leave_keys_unchanged_at_their_default():
    """A field of UnlearnConfig added after the record format (records.LATER_FIELDS) enters a key only when
    set, and a key without it rebuilds the config with its default."""
    specs = {"GA": ("ga", {})}
    plain = records.compare_key("tiny", "toyworld", specs, UnlearnConfig(lr=1e-3, progress=False))
    assert set(records.LATER_FIELDS) <= set(UnlearnConfig.keys())
    assert not set(records.LATER_FIELDS) & set(plain["config"])
    assert records._config(plain) == UnlearnConfig(lr=1e-3, progress=False)
    on = records.compare_key("tiny", "toyworld", specs, UnlearnConfig(lr=1e-3, progress=False,
                                                                      gradient_checkpointing=True))
    assert on["config"]["gradient_checkpointing"] is True and on != plain
    assert records._config(on).gradient_checkpointing is True
    off = records.safety_key("tiny-safety", "safety", specs, UnlearnConfig(gradient_checkpointing=False))
    assert off["config"]["gradient_checkpointing"] is False  # an explicit value is not the default (None)


def _spy_on_compare(monkeypatch, keyword):
    """Keep each comparison a record task computes (before it becomes JSON) and the ``keyword`` argument it
    was called with: ``(comparisons, arguments)``, filled as the task runs."""
    from mlunlearn import experiments

    live, seen, compare = [], [], experiments.compare

    def spy(*args, **kwargs):
        live.append(compare(*args, **kwargs))
        seen.append(kwargs[keyword])
        return live[-1]

    monkeypatch.setattr(experiments, "compare", spy)
    return live, seen


@needs_vanilla
def test_a_detail_compare_record_gives_what_the_live_comparison_gives(tmp_path, vanilla, monkeypatch):
    import pandas as pd

    from mlunlearn import experiments
    from mlunlearn.data import open_benchmark
    from mlunlearn.data.unlearning import unlearning_data

    model, processor = vanilla
    bench = open_benchmark("toyworld")
    context = records.Context().add("tiny", "cpu", "toyworld", model, processor, bench)
    live, shows = _spy_on_compare(monkeypatch, "show")
    methods = {"PO": ("po", {"lr": 3e-3})}
    key = records.compare_key("tiny", "toyworld", methods, UnlearnConfig(max_steps=2, batch_size=4, seed=0),
                              vanilla=False, detail=True, show=2, replies=3)
    records.cached_task("c", key, tmp_path, context)
    loaded = experiments.Comparison.from_record(records.cached_task("c", key, tmp_path, context))
    assert len(live) == 1  # the second time, loaded from the record
    out = live[0]

    pd.testing.assert_frame_equal(loaded.table, out.table)
    assert list(loaded.logs) == ["PO"] and list(loaded.logs["PO"].index) == [1, 2]
    pd.testing.assert_frame_equal(loaded.logs["PO"], out.logs["PO"])
    shown = unlearning_data(bench, 5).forget[:2]  # as chapter 2's show=data.forget[:3]
    assert [(e.prompt, e.answer, e.image.tobytes()) for e in shows[0]] == [
        (e.prompt, e.answer, e.image.tobytes()) for e in shown]
    assert out.samples == loaded.samples and len(loaded.samples["PO"]) == 2
    for task in records.DETAIL_TASKS:
        for n in (1, 3):
            pd.testing.assert_frame_equal(loaded.replies("forget", task, "Image_Textual", n=n),
                                          out.replies("forget", task, "Image_Textual", n=n))
    with pytest.raises(ValueError, match="first 3 questions"):
        loaded.replies("forget", "generation", "Image_Textual", n=4)

    cut = lambda text: text if len(text) <= 120 else text[:119] + "…"  # noqa: E731 - the stored replies
    ours, theirs = out.benign["PO"].records, loaded.benign["PO"].records
    assert len(ours) == len(theirs) and sum(r.scores["refusal_rate"] for r in ours) == sum(
        r.scores["refusal_rate"] for r in theirs)
    assert [(r.group, r.in_forget, r.scores["refusal_rate"], cut(r.reply)) for r in ours] == [
        (r.group, r.in_forget, r.scores["refusal_rate"], r.reply) for r in theirs]


# -- compare records with a measure (chapter 3: spectra, loss-J columns, monitors, benign accuracy) ---------


def test_a_measure_and_benign_accuracy_enter_a_compare_key_only_when_given():
    methods = {"GA": ("ga", {"lr": 1e-3})}
    config = UnlearnConfig(seed=0)
    plain = records.compare_key("tiny", "toyworld", methods, config, detail=True)
    assert "measure" not in plain and "accuracy" not in plain["detail"]["benign"]
    spec = records.measure_spec(images=8, examples=16)
    assert spec == {"projector": {"images": 8, "examples": 16}}
    measured = records.compare_key("tiny", "toyworld", methods, config, detail=True, measure=spec)
    assert measured == {**plain, "measure": spec}
    accurate = records.compare_key("tiny", "toyworld", methods, config, detail=True, benign_accuracy=True)
    assert accurate["detail"]["benign"] == {**plain["detail"]["benign"], "accuracy": True}
    assert {k: v for k, v in accurate.items() if k != "detail"} == {k: v for k, v in plain.items() if k != "detail"}
    with pytest.raises(ValueError, match="detail=True"):
        records.compare_key("tiny", "toyworld", methods, config, benign_accuracy=True)


def test_an_old_detail_record_loads_without_accuracy():
    from mlunlearn.experiments import Comparison

    value = records.read_record(ROOT / "book" / "records" / "02_tiny_compare.json")["value"]
    loaded = Comparison.from_record(value)
    assert loaded.spectra == {} and loaded.monitors == {}
    records_ = loaded.benign["vanilla"].records
    assert all(set(r.scores) == {"refusal_rate"} for r in records_)


@needs_vanilla
def test_a_measured_compare_record_gives_what_the_live_comparison_gives(tmp_path, vanilla, monkeypatch):
    import numpy as np
    import pandas as pd

    from mlunlearn import experiments
    from mlunlearn.analysis.projector import ProjectorMeasure
    from mlunlearn.data import decode_image, open_benchmark
    from mlunlearn.data.unlearning import unlearning_data

    model, processor = vanilla
    bench = open_benchmark("toyworld")
    context = records.Context().add("tiny", "cpu", "toyworld", model, processor, bench)
    live, measures = _spy_on_compare(monkeypatch, "measure")
    methods = {"PO": ("po", {"params": "projector", "lr": 3e-3})}
    key = records.compare_key("tiny", "toyworld", methods, UnlearnConfig(max_steps=2, batch_size=4, seed=0),
                              detail=True, show=0, replies=0, benign_accuracy=True,
                              monitor=records.monitor_spec(every=1, images=2),
                              measure=records.measure_spec(images=2, examples=4))
    records.cached_task("m", key, tmp_path, context)
    loaded = experiments.Comparison.from_record(records.cached_task("m", key, tmp_path, context))
    assert len(live) == 1  # the second time, loaded from the record
    out, measure = live[0], measures[0]

    # the measure measures what chapter 3 measures: the first forget portraits and training examples
    assert isinstance(measure, ProjectorMeasure)
    portraits = [decode_image(r["image"]) for r in bench.load("forget_5")][:2]
    assert [i.tobytes() for i in measure.images] == [i.tobytes() for i in portraits]
    shown = unlearning_data(bench, 5).forget[:4]
    assert [(e.prompt, e.answer, e.image.tobytes()) for e in measure.examples] == [
        (e.prompt, e.answer, e.image.tobytes()) for e in shown]

    pd.testing.assert_frame_equal(loaded.table, out.table)
    assert {"loss-J cond", "loss-J eff. rank"} <= set(loaded.table.columns)
    assert list(loaded.spectra) == ["vanilla", "PO"] and len(measure.spectra) == 2
    for label, spectrum in zip(["vanilla", "PO"], measure.spectra):
        assert loaded.spectra[label].dtype == spectrum.dtype
        np.testing.assert_array_equal(loaded.spectra[label], spectrum)
    assert not np.array_equal(loaded.spectra["vanilla"], loaded.spectra["PO"])  # the projector trained
    assert list(loaded.monitors) == ["PO"]
    pd.testing.assert_frame_equal(loaded.monitors["PO"].frame(), out.monitors["PO"].frame())
    assert list(loaded.monitors["PO"].frame()["step"]) == [0, 1, 2]

    cut = lambda text: text if len(text) <= 120 else text[:119] + "…"  # noqa: E731 - the stored replies
    for label in ("vanilla", "PO"):
        ours, theirs = out.benign[label].records, loaded.benign[label].records
        assert [(r.group, r.in_forget, r.scores, cut(r.reply)) for r in ours] == [
            (r.group, r.in_forget, r.scores, r.reply) for r in theirs]
        assert sum(r.scores.get("accuracy", 0) for r in theirs) > 0



def test_a_records_fresh_model_loads_as_the_chapters_model_was_loaded(monkeypatch):
    """On a GPU a record reloads its model for every run: a model the chapter loaded in 4 bits must be
    reloaded in 4 bits and the same dtype (chapter 4's grid on a T4), not at full precision."""
    import types

    import torch

    import mlunlearn.models

    calls = []
    monkeypatch.setattr(mlunlearn.models, "load_model", lambda name, **kw: calls.append((name, kw)) or ("m", "p"))
    quantized = types.SimpleNamespace(is_loaded_in_4bit=True, dtype=torch.float16)
    plain = types.SimpleNamespace(dtype=torch.bfloat16)
    context = records.Context().add("llava-hf/llava-1.5-7b-hf", "cuda:0", "toyworld", quantized, None, None)
    context.add("llava-hf/llava-1.5-7b-hf", "cuda:0", "mllmu-bench", plain, None, None)
    key = {"model": "llava-hf/llava-1.5-7b-hf", "device": "cuda:0"}
    assert context.fresh({**key, "data": "toyworld"})() == "m"
    context.fresh({**key, "data": "mllmu-bench"})()
    assert calls == [("llava-hf/llava-1.5-7b-hf", {"device": "cuda:0", "dtype": torch.float16, "quantization": "4bit"}),
                     ("llava-hf/llava-1.5-7b-hf", {"device": "cuda:0", "dtype": torch.bfloat16, "quantization": None})]
    assert context.fresh({"model": "tiny", "device": "cpu", "data": "toyworld"}) is None  # a deep copy instead
