"""Run records (mlunlearn/records.py) and their recheck (tools/recheck_records.py)."""

from __future__ import annotations

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
