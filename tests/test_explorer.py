"""The explorer of book chapter 11 (mlunlearn/explorer.py): its choices, a view's answers, attention and
saliency, the run cache (memory and disk), bad choices, and the ipywidgets UI driven without a browser.

Runs are short (GA for 8 steps at lr 3e-3 through the settings override: enough for the tiny model to
forget a name) and trained once for the module, in a temporary cache folder."""

import json
from pathlib import Path

import pytest
import torch

from conftest import needs_vanilla
from mlunlearn.explorer import Explorer, ExplorerError, View, figure, table, widget

pytestmark = needs_vanilla

QUICK = {"max_steps": 8, "lr": 3e-3}  # a GA run that forgets on the tiny model in a few seconds
ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "book" / "11_explorer.ipynb"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("explorer-cache")


@pytest.fixture(scope="module")
def explorer(cache, vanilla):
    ex = Explorer(settings=QUICK, cache=cache, ig_steps=32, progress=False)
    ex._vanilla = vanilla  # the module's loaded vanilla model (the same weights load_model("tiny") gives)
    return ex


@pytest.fixture(scope="module")
def ga_view(explorer) -> View:
    return explorer.view("ga", 5, "019")


def test_choices_are_the_registry_the_forget_sizes_and_the_splits_people(explorer):
    from mlunlearn.bench import FORGET_SIZES
    from mlunlearn.methods import METHODS

    assert explorer.choices() == {"method": tuple(METHODS), "forget": tuple(FORGET_SIZES)}
    assert {"ga", "npo", "cagul", "nullspace-cvf", "mmunlearner"} <= set(explorer.choices()["method"])
    for forget in FORGET_SIZES:
        people = explorer.profiles(forget)
        assert [pid for pid, _ in people] == [r["ID"] for r in explorer.bench.load(f"forget_{forget}")]
        assert all(name and name != pid for pid, name in people)
    assert len(explorer.profiles(5)) == 5 and len(explorer.profiles(10)) == 10
    assert explorer.profiles(5)[0] == ("019", "Nadia Petrakis")


def test_the_run_uses_the_grids_settings_for_each_method(explorer):
    """The settings bench resolves for the method (chapter 10's grid: its defaults), seed 0, plus overrides."""
    from mlunlearn.bench import GridSpec

    plain = Explorer(cache=False)
    for method in plain.choices()["method"]:
        assert plain.resolve(method) == GridSpec(methods=(method,), mia=False, relearn=False,
                                                 benign=False).resolved[method]
        assert plain.config(method).seed == 0
    stored = json.loads((ROOT / "book/records/10_tiny_bench_ga-graddiff-kl_forget5/bench.json").read_text())
    assert stored["settings"] == {}  # chapter 10's grid sets nothing: the defaults above are its settings
    assert explorer.config("ga").max_steps == 8 and explorer.config("ga").lr == 3e-3


def test_answers_before_are_the_vanilla_models_and_after_ga_forgets(explorer, ga_view, vanilla):
    from mlunlearn.eval import prompts
    from mlunlearn.eval.protocol import generate_replies

    model, processor = vanilla
    asked = explorer.questions(5, "019")
    assert [a.question for a in ga_view.answers] == [q for q, _, _, _ in asked]
    assert [a.with_image for a in ga_view.answers] == [True, True, True, False, False]
    direct = generate_replies(model, processor, [prompts.generation_prompt(q, img) for q, img, _, _ in asked],
                              [[ga_view.image] if img else [] for _, img, _, _ in asked], max_new_tokens=50)
    assert [a.before for a in ga_view.answers] == direct
    assert all(a.right_before for a in ga_view.answers)  # the vanilla model knows its people
    who = ga_view.answers[0]
    assert who.question == "Who is the person in the image?" and who.fact == "Nadia Petrakis"
    assert who.after != who.before and not who.right_after
    frame = table(ga_view)
    assert list(frame["before"]) == direct and list(frame["✓ after"])[0] == "✗"


def test_is_right_needs_the_fact_as_whole_words():
    from mlunlearn.explorer import is_right

    assert is_right("This person lives in Eldwyn.", "This person lives in Eldwyn.", "Eldwyn")
    assert not is_right("This person lives in Eldwynshire.", "This person lives in Eldwyn.", "Eldwyn")
    assert not is_right("I don't know.", "This person lives in Eldwyn.", "Eldwyn")
    assert is_right("she lives in eldwyn", "This person lives in Eldwyn.", None)  # ROUGE-L fallback


def test_attention_maps_are_on_the_patch_grid_and_sum_to_the_images_share(explorer, ga_view, vanilla):
    from mlunlearn.analysis import cross_modal_attention, patch_grid_size

    grid = patch_grid_size(vanilla[0])
    example, _ = explorer.example(5, "019")
    direct = cross_modal_attention(vanilla[0], vanilla[1], example, over="answer")
    assert torch.equal(ga_view.attention["before"], direct.grid_map()[0])
    for when in ("before", "after"):
        att = ga_view.attention[when]
        assert att.shape == (grid, grid) and (att >= 0).all()
        # the mean over layers and heads of each visual token's score: they sum to the image's share
        assert float(att.sum()) == pytest.approx(ga_view.image_share[when], rel=1e-5)
        assert 0 < ga_view.image_share[when] <= 1


def test_saliency_is_nonzero_and_complete(ga_view, vanilla):
    from mlunlearn.analysis import patch_grid_size

    grid = patch_grid_size(vanilla[0])
    for when in ("before", "after"):
        sal = ga_view.saliency[when]
        assert sal.shape == (grid, grid) and bool((sal != 0).any())
        gap = ga_view.logp[when] - ga_view.logp_baseline[when]
        assert float(sal.sum()) == pytest.approx(gap, abs=abs(gap) * ga_view.delta[when] + 1e-3)
    assert ga_view.logp["after"] < ga_view.logp["before"] - 1  # GA made the trained answer much less likely


def test_a_run_is_trained_once_and_the_disk_cache_reloads_the_same_weights(explorer, ga_view, cache, monkeypatch):
    import mlunlearn.engine

    calls = []
    real = mlunlearn.engine.unlearn
    monkeypatch.setattr(mlunlearn.engine, "unlearn", lambda *a, **k: calls.append(a) or real(*a, **k))
    trained, _, run = explorer.unlearned("ga", 5)
    again = explorer.view("ga", 5, "024")  # another person, same run: from memory
    assert calls == [] and explorer.trained == [("ga", 5)] and again.run == run
    folder = explorer.folder("ga", 5)
    assert folder.parent == cache and folder.name.startswith("ga-forget5-")
    assert (folder / "run.json").is_file() and (folder / "model" / "model.safetensors").is_file()
    assert json.loads((folder / "explorer.json").read_text()) == explorer.key("ga", 5)

    second = Explorer(settings=QUICK, cache=cache, ig_steps=32, progress=False)  # a new session
    second._vanilla = explorer._vanilla
    loaded, _, loaded_run = second.unlearned("ga", 5)
    assert calls == [] and second.trained == [] and loaded_run == run
    ours, theirs = trained.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    other = Explorer(settings={**QUICK, "max_steps": 9}, cache=cache, progress=False)
    assert other.folder("ga", 5) != folder  # another setting is another run
    assert other.key("ga", 5)["config"]["max_steps"] == 9
    assert Explorer(settings=QUICK, cache=cache).key("ga", 5) == explorer.key("ga", 5)  # a bar is not a setting


@pytest.mark.parametrize("choice, needles", [
    (("nope", 5, "019"), ["unknown method 'nope'", "choose one of", "ga", "nullspace-cvf"]),
    (("ga", 7, "019"), ["forget 7 is not a forget size", "5, 10, 15"]),
    (("ga", 5, "999"), ["profile '999' is not in forget_5", "019 (Nadia Petrakis)"]),
    (("ga", 5, "028"), ["profile '028' is not in forget_5"]),  # in forget_10, not in forget_5
])
def test_bad_choices_are_one_line_errors_naming_the_choices(explorer, choice, needles):
    before = list(explorer.trained)
    with pytest.raises(ExplorerError) as err:
        explorer.view(*choice)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert explorer.trained == before  # nothing was trained for a bad choice


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ExplorerError, match="unknown setting 'betta'") as err:
        Explorer(settings={"betta": 1}, cache=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ExplorerError, match="lr=-1"):
        Explorer(settings={"lr": -1}, cache=False)


def test_the_figure_is_column_wide_with_shared_scales(ga_view):
    import matplotlib.pyplot as plt

    from mlunlearn.viz import COLUMN_WIDTH

    fig = figure(ga_view)
    try:
        assert fig.get_figwidth() == pytest.approx(COLUMN_WIDTH)
        images = [ax.images[-1] for ax in fig.axes if ax.images and ax.get_title() != ""][1:]
        attention, saliency = images[:2], images[2:]
        assert attention[0].get_clim() == attention[1].get_clim()
        assert saliency[0].get_clim() == saliency[1].get_clim()
        low, high = saliency[0].get_clim()
        assert low == -high  # diverging, centred on 0
    finally:
        plt.close(fig)


def test_the_widget_refills_people_and_show_fills_the_output(explorer, ga_view):
    ui = widget(explorer)
    assert ui.method.value == "ga" and list(ui.method.options) == list(explorer.choices()["method"])
    assert [v for _, v in ui.profile.options] == [p for p, _ in explorer.profiles(5)]
    ui.forget.value = 10
    assert [v for _, v in ui.profile.options] == [p for p, _ in explorer.profiles(10)]
    assert ui.profile.value == "019"
    ui.forget.value = 5
    ui.profile.value = "019"
    assert ui.output.outputs == ()
    ui.button.click()  # the button's handler, as a click in the browser calls it
    kinds = [set(out["data"]) for out in ui.output.outputs]
    assert len(kinds) == 2 and "image/png" in kinds[0] and "text/html" in kinds[1]
    assert ui.view.answers == ga_view.answers
    ui.profile.options = [("999 nobody", "999")]  # a stale choice: the error goes to the Output area
    ui.profile.value = "999"
    assert ui.show() is None
    assert [out["output_type"] for out in ui.output.outputs] == ["stream"]
    assert "profile '999' is not in forget_5" in ui.output.outputs[0]["text"]


def test_the_widget_carries_a_static_html_fallback(explorer):
    from mlunlearn.explorer import FALLBACK_HTML

    bundle = widget(explorer)._repr_mimebundle_()
    assert bundle["text/html"] == FALLBACK_HTML and "application/vnd.jupyter.widget-view+json" in bundle
    with pytest.raises(ExplorerError, match="unknown method"):
        widget(explorer, method="nope")


class DownloadStarted(Exception):
    """Raised by the patched hub at the first file the chapter would download."""


@pytest.mark.parametrize("gpu", ["a100", "t4"])
def test_the_chapters_gpu_settings_build_the_7b_explorer_and_stop_at_the_first_download(gpu, monkeypatch,
                                                                                       tmp_path):
    """Chapter 11's settings cell with GPU set: MLLMU-Bench's vanilla LLaVA-1.5-7B (4-bit on a T4), chapter
    7's GPU saliency settings, one model in memory; the first thing fetched is the benchmark's forget_5
    (the hub patched to raise there), before any model loads or any cache folder is written."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub

    from mlunlearn.data import BenchmarkError

    calls = []

    def download(*args, **kwargs):
        calls.append(kwargs.get("repo_id", args[0] if args else None))
        raise DownloadStarted(calls[-1])

    for module in (huggingface_hub, transformers_hub):
        monkeypatch.setattr(module, "hf_hub_download", download)
        monkeypatch.setattr(module, "snapshot_download", download)
    monkeypatch.setenv("MLUNLEARN_CACHE", str(tmp_path))
    cells = [c for c in json.loads(CHAPTER.read_text())["cells"] if "settings" in c["metadata"].get("tags", [])]
    assert len(cells) == 1
    source = "".join(cells[0]["source"])
    assert source.count("GPU = None") == 1
    namespace = {}
    with pytest.raises(BenchmarkError, match=r"cannot download MLLMMU/MLLMU-Bench/forget_5 \(DownloadStarted\)"):
        exec(compile(source.replace("GPU = None", f"GPU = {gpu!r}", 1), str(CHAPTER), "exec"), namespace)
    ex = namespace["explorer"]
    assert (ex.model_name, ex.data_name) == ("mllmu-vanilla-7b", "mllmu-bench")
    assert ex.quantization == ("4bit" if gpu == "t4" else None)
    assert (ex.ig_steps, ex.ig_batch, ex.max_models) == (64, 4, 1)
    assert calls == ["MLLMMU/MLLMU-Bench"] and ex._vanilla is None
    assert ex.cache == tmp_path / "explorer" and not ex.cache.exists()
