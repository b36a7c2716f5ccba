"""The README's Performance section and the teaching page's chapter times are what benchmarks/report.py prints
for the committed results (issue 14: "the README reports the latest figures"), and benchmarks/book_time.py
times a copy of a chapter with the kernel's CPU time, never the committed notebook."""

import copy
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import book_time  # noqa: E402
import report  # noqa: E402

FIX = "run `python benchmarks/report.py --write` and commit README.md and book/teaching.md with the results"


def test_readme_performance_section_is_the_report_of_the_committed_results():
    assert report.generated(report.README, report.README_MARKERS) == report.readme_section(), FIX


def test_teaching_page_chapter_times_are_the_report_of_the_committed_results():
    assert report.generated(report.TEACHING, report.TEACHING_MARKERS) == report.teaching_table(), FIX


def test_every_committed_result_has_a_row_and_a_measurement_date():
    results = report.load()
    section = report.readme_section(results)
    for name, result in results.items():
        assert f"| `{name}.py` |" in section
        dates = ([e["date"] for e in result.get("cpu", {}).values()] if name == "book_time"
                 else [result["measured_date"]])
        assert dates and all(d in section for d in dates), name


def test_a_changed_result_changes_the_report(tmp_path):
    """The comparison above can fail: a new ratio, a new chapter time or an unmeasured chapter shows."""
    results = report.load()
    changed = copy.deepcopy(results)
    changed["eval_speed"]["ratio_official_over_ours_cpu"]["ours_batch8"] = 123.0
    assert "123.0× CPU" in report.readme_section(changed)
    assert report.readme_section(changed) != report.readme_section(results)
    chapter = report.toc_chapters()[0]
    changed["book_time"]["cpu"][chapter]["cpu_s"] += 60
    assert report.teaching_table(changed) != report.teaching_table(results)
    del changed["book_time"]["cpu"][chapter]
    assert f"| {{doc}}`{chapter}` | not measured |" in report.teaching_table(changed)
    assert f"not measured: chapter {chapter[:2]}" in report.readme_section(changed)


def test_a_result_without_a_row_is_an_error(tmp_path):
    (tmp_path / "new_benchmark.json").write_text("{}")
    with pytest.raises(report.ReportError, match="new_benchmark.json has no row in the report; add one"):
        report.load(tmp_path)


def test_write_replaces_only_the_text_between_the_markers(tmp_path):
    page = tmp_path / "page.md"
    before, after = "# Title\n\nprose before\n", "\nprose after\n"
    page.write_text(f"{before}{report.TEACHING_MARKERS[0]}\nold table\n{report.TEACHING_MARKERS[1]}{after}")
    assert report.write(page, report.TEACHING_MARKERS, "| new | table |\n")
    text = page.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    assert report.generated(page, report.TEACHING_MARKERS) == "| new | table |\n"
    assert not report.write(page, report.TEACHING_MARKERS, "| new | table |\n")  # unchanged: not rewritten
    page.write_text("no markers")
    with pytest.raises(report.ReportError, match="lacks the markers"):
        report.write(page, report.TEACHING_MARKERS, "x")


def test_book_time_chapters_come_from_the_toc():
    chapters = book_time.chapters()
    assert [p.stem for p in chapters] == report.toc_chapters()
    assert chapters and all(p.parent.name == "book" and p.suffix == ".ipynb" for p in chapters)
    assert [p.stem for p in book_time.chapters("1,10")] == [chapters[0].stem, "10_benchmark"]


def test_book_time_bad_chapters_are_one_line_errors(capsys):
    for bad, needle in (("12", "no chapter 12 in _toc.yml"), (",", "(empty list)")):
        code = book_time.main(["--chapters", bad, "--output", "/nonexistent/never-written.json"])
        assert_one_line_error(code, capsys.readouterr().err, needle, "use numbers among 01,")


def test_book_time_prepares_the_copy_install_line_off_gpu_switch_on_probe_last():
    settings = ('MODEL = "tiny"     # on a GPU: ...\nDATA = "toyworld"  # "mllmu-bench" ...\n'
                'TINY = MODEL == "tiny"\nOTHER = "toyworld"')
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('import os\nif os.path.exists("/content"):\n    %pip install -q "pkg"'),
        nbformat.v4.new_code_cell(settings)])
    book_time.prepare(nb, "t4", "x.ipynb")
    assert "%pip" not in nb.cells[0].source and "    pass  # book_time.py" in nb.cells[0].source
    assert nb.cells[1].source == settings.replace('"tiny"  ', '"mllmu-vanilla-7b"  ', 1).replace(
        'DATA = "toyworld"', 'DATA = "mllmu-bench"')  # only the two settings lines change
    assert "getrusage" in nb.cells[-1].source
    cpu = book_time.prepare(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(settings)]), None, "x")
    assert cpu.cells[0].source == settings  # the CPU path runs the chapter as committed


def test_book_time_switches_every_chapter_to_its_gpu_path_or_names_what_is_missing():
    for chapter in book_time.chapters():
        nb = nbformat.read(chapter, as_version=4)
        if chapter.stem == "09_safety":
            with pytest.raises(book_time.BookTimeError, match="needs SafeEraser's dataset folder"):
                book_time.switch_to_gpu(nb, "a100", chapter.name)
            book_time.switch_to_gpu(nb, "a100", chapter.name, safeeraser="/data/SafeEraser/dataset")
            assert 'DATA = "safeeraser:/data/SafeEraser/dataset"' in "".join(c.source for c in nb.cells)
        else:
            book_time.switch_to_gpu(nb, "a100", chapter.name)
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        for pattern, _ in book_time.SWITCHES + book_time.DATA_SWITCHES:  # no CPU setting is left
            assert not pattern.search(source), (chapter.name, pattern.pattern)
    with pytest.raises(book_time.BookTimeError, match="x.ipynb has no GPU switch"):
        book_time.switch_to_gpu(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), "t4",
                                "x.ipynb")


def test_book_time_gpu_without_safeeraser_folder_is_a_one_line_error(capsys):
    code = book_time.main(["--gpu", "t4", "--chapters", "09", "--output", "/nonexistent/never-written.json"])
    assert_one_line_error(code, capsys.readouterr().err, "09_safety.ipynb on a GPU needs SafeEraser's", "--safeeraser")


def test_book_time_runs_a_copy_and_counts_the_kernels_cpu_time(tmp_path, monkeypatch):
    """A notebook that burns CPU and writes into its folder: its CPU time is counted (its own and a waited-for
    child's), neither the notebook nor its folder changes, and it ran with a new empty package cache."""
    monkeypatch.setenv("MLUNLEARN_CACHE", str(tmp_path / "users-cache"))
    book = tmp_path / "book"
    book.mkdir()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n"
                                  "    pass"),
        nbformat.v4.new_code_cell("import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
                                  "'import time\\nt = time.process_time()\\n"
                                  "while time.process_time() - t < 1.0: pass'], check=True)"),
        nbformat.v4.new_code_cell("open('written.txt', 'w').write('x')"),
        nbformat.v4.new_code_cell("import os\ncache = os.environ['MLUNLEARN_CACHE']\n"
                                  "assert 'book_time_' in cache and not os.path.exists(cache), cache")])
    path = book / "99_probe.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    entry = book_time.run_chapter(path)
    assert entry["cpu_s"] >= 2.0 and entry["cpu_children_s"] >= 1.0, entry
    assert entry["wall_s"] >= 2.0 and entry["peak_rss_mib"] > 0 and entry["peak_gpu_mib"] is None, entry
    assert path.read_bytes() == before and sorted(p.name for p in book.iterdir()) == ["99_probe.ipynb"]
    assert os.environ["MLUNLEARN_CACHE"] == str(tmp_path / "users-cache")  # restored


def test_book_time_json_entries_name_their_machine_and_commit():
    results = json.loads((ROOT / "benchmarks" / "results" / "book_time.json").read_text())
    assert results["cpu"], "no chapter measured"
    for name, entry in results["cpu"].items():
        assert {"cpu_s", "wall_s", "date", "commit", "machine"} <= set(entry), name
        assert " cores, " in entry["machine"] and "torch " in entry["machine"], name
        cores = int(entry["machine"].split(" cores", 1)[0])
        assert 0 < entry["cpu_s"] <= entry["wall_s"] * cores + 5, name


def test_no_result_holds_a_nested_dict_besides_its_measurements():
    """Chapter 4 shows every dict of sine_overhead.json as a timing: provenance must stay flat strings."""
    for name, result in report.load().items():
        if name != "book_time":
            assert {"measured_date", "measured_commit", "measured_machine"} <= set(result), name
            assert not any(isinstance(result[k], dict) for k in result if k.startswith("measured")), name
    sine = json.loads((ROOT / "benchmarks" / "results" / "sine_overhead.json").read_text())
    assert all("median_s" in v for v in sine.values() if isinstance(v, dict))  # what chapter 4 reads


def test_book_time_chapters_replaces_only_the_chapters_it_runs(tmp_path, monkeypatch, capsys):
    """`--chapters 10` writes chapter 10's entry (with its date, commit and machine) and keeps every other."""
    output = tmp_path / "book_time.json"
    kept = {"cpu_s": 1.0, "wall_s": 2.0, "date": "2000-01-01", "commit": "abc", "machine": "1 cores, x, torch 0"}
    output.write_text(json.dumps({"cpu": {"01_anatomy_and_world": kept, "10_benchmark": kept},
                                  "gpu_t4": {"10_benchmark": kept}}))
    ran = []
    monkeypatch.setattr(book_time, "run_chapter", lambda path, gpu=None, safeeraser=None: ran.append(path.stem)
                        or {"wall_s": 30.0, "cpu_s": 12.0, "cpu_children_s": 0.0, "peak_rss_mib": 600,
                            "peak_gpu_mib": None})
    assert book_time.main(["--chapters", "10", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert ran == ["10_benchmark"]
    assert results["cpu"]["01_anatomy_and_world"] == kept and results["gpu_t4"]["10_benchmark"] == kept
    new = results["cpu"]["10_benchmark"]
    assert new["cpu_s"] == 12.0 and new["date"] != kept["date"] and " cores, " in new["machine"] and new["commit"]
    assert "whole book" in capsys.readouterr().out


@pytest.mark.parametrize("script, args, needle", [
    ("eval_speed.py", ["--modes", "forget,bogus"], "unknown mode 'bogus'"),
    ("eval_speed.py", ["--repeats", "0"], "must be at least 1, got 0"),
    ("cagul_overhead.py", ["--k", "17"], "an image has only 16 visual tokens"),
    ("cagul_overhead.py", ["--k", "x"], "'x' is not a whole number"),
    ("jacobian_estimator.py", ["--tokens", "0"], "must be at least 1, got 0"),
    ("jacobian_estimator.py", ["--threads", "0"], "must be at least 1, got 0"),
    ("sine_overhead.py", ["--quik"], "unrecognized arguments: --quik"),
    ("report.py", ["--wirte"], "unrecognized arguments: --wirte"),
])
def test_benchmark_scripts_bad_arguments_are_one_line_errors(script, args, needle, tmp_path):
    """Each refused before it measures or writes anything (before: tracebacks from statistics, torch or the
    method, or --tokens 0 measuring nothing and exiting 0)."""
    import subprocess

    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args]
                          + (["--output", str(out)] if script != "report.py" else []),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert_one_line_error(done.returncode, done.stderr, needle, f"see {script} --help")
    assert not out.exists()
