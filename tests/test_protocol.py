"""The evaluation protocol: which questions are asked, determinism, batching."""

import collections

import pytest
import torch

from conftest import assert_one_line_error
from mlunlearn.data import BenchmarkError, decode_image, open_benchmark
from mlunlearn.eval.protocol import (
    build_benign_queries,
    build_queries,
    generate_replies,
    mode_configs,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench():
    return open_benchmark("toyworld")


def test_mode_configs():
    assert mode_configs(10) == {"forget": "forget_10", "test": "Test_Set", "retain_shared": "retain_90",
                                "retain_celebrity": "Retain_Set"}


def test_test_mode_asks_only_about_forget_people(bench):
    queries = build_queries(bench, 5, modes=("test",))
    forget_ids = {r["ID"] for r in bench.load("forget_5")}
    assert {q.record["id"] for q in queries} == forget_ids
    assert {q.record["task"] for q in queries} == {"fill_in_the_blank", "classification", "generation"}


def test_limit_caps_each_mode_task_modality(bench):
    counts = collections.Counter(
        (q.record["mode"], q.record["task"], q.record["modality"]) for q in build_queries(bench, 5, limit=3)
    )
    assert len(counts) == 4 * 3 * 2 and set(counts.values()) == {3}


def test_image_prompts_carry_one_image(bench):
    for q in build_queries(bench, 5, limit=2):
        assert q.prompt.count("<image>") == len(q.images) == (q.record["modality"] == "Image_Textual")


def test_test_view_is_seeded(bench):
    def views(seed, limit):
        return {q.record["id"]: q.images[0]["bytes"] for q in build_queries(bench, 5, modes=("test",), seed=seed,
                                                                              limit=limit) if q.images}
    assert views(0, None) == views(0, None)
    small = views(0, 1)
    assert all(views(0, None)[i] == b for i, b in small.items())  # the view does not depend on limit
    assert views(0, None) != views(1, None)


def _cells(queries):
    return collections.Counter((q.record["mode"], q.record["task"], q.record["modality"]) for q in queries)


def test_few_shot_follows_the_official_rule_hand_count(bench):
    """forget_5 has 5 people, each with 3 image and 3 text classification questions and 2 + 2 cloze items.
    Official rule: classification prepends every question of 1 sampled person and drops that person
    (4 people x 3 = 12 per modality); cloze, of 2 people (3 x 2 = 6); generation is untouched; the
    celebrities are not in Full_Set, so they get no examples and lose nobody."""
    plain = _cells(build_queries(bench, 5))
    shots = build_queries(bench, 5, few_shot=True)
    cells = _cells(shots)
    for mode in ("forget", "test"):
        for modality in ("Image_Textual", "Pure_Text"):
            assert plain[(mode, "classification", modality)] == 15 and cells[(mode, "classification", modality)] == 12
            assert plain[(mode, "fill_in_the_blank", modality)] == 10
            assert cells[(mode, "fill_in_the_blank", modality)] == 6
            assert cells[(mode, "generation", modality)] == plain[(mode, "generation", modality)] == 15
    assert cells[("retain_shared", "classification", "Image_Textual")] == 94 * 3  # 95 people, 1 dropped
    assert cells[("retain_shared", "fill_in_the_blank", "Pure_Text")] == 93 * 2  # 2 dropped
    for key, count in plain.items():
        if key[0] == "retain_celebrity":
            assert cells[key] == count
    assert all("Correct Answer:" not in q.prompt for q in shots if q.record["mode"] == "retain_celebrity")

    # Images: 3 examples of the shot person + the question's own (classification), 2 x 2 + 1 (cloze).
    counts = {(q.record["task"], len(q.images)) for q in shots if q.record["mode"] == "forget"
              and q.record["modality"] == "Image_Textual"}
    assert counts == {("classification", 4), ("fill_in_the_blank", 5), ("generation", 1)}
    assert all(q.prompt.count("<image>") == len(q.images) for q in shots)

    # The dropped people are sampled from the mode's own people, and their Full_Set questions are the examples.
    forget_ids = {r["ID"] for r in bench.load("forget_5")}
    scored = {q.record["id"] for q in shots if q.record["mode"] == "forget" and q.record["task"] == "classification"}
    (shot_id,) = forget_ids - scored
    full = {r["ID"]: r for r in bench.load("Full_Set")}[shot_id]
    text_query = next(q for q in shots if q.record["mode"] == "forget" and q.record["task"] == "classification"
                      and q.record["modality"] == "Pure_Text")
    for example in full["Classification_Task"]["Pure_Text_Questions"]:
        assert f"USER:\nQuestion: {example['Question']}\nA: {example['Options']['A']}\n" in text_query.prompt
    image_query = next(q for q in shots if q.record["mode"] == "forget" and q.record["task"] == "classification"
                       and q.record["modality"] == "Image_Textual")
    assert image_query.images[:3] == [full["image"]] * 3 and image_query.images[3] is not full["image"]


def test_few_shot_exact_prompt(bench):
    """One prompt written out by hand from the official format: the shot person's three text questions with
    their answers (in Full_Set order), then the question."""
    query = next(q for q in build_queries(bench, 5, modes=("forget",), tasks=("classification",), few_shot=True)
                 if q.record["modality"] == "Pure_Text")
    example = "USER:\nQuestion: {}\nA: {}\nB: {}\nC: {}\nD: {}\nCorrect Answer: {}\n"
    assert query.prompt == (
        example.format("What did Brisa Falk study?", "chemistry", "physics", "astronomy", "geology", "D")
        + example.format("Where does Brisa Falk live?", "Dunmere", "Pellridge", "Brinhaven", "Wyndham", "B")
        + example.format("Where was Brisa Falk born?", "Dunmere", "Pellridge", "Brinhaven", "Wyndham", "C")
        + "USER:\nWhere does Nadia Petrakis live?\nA: Solcaster\nB: Harrowgate\nC: Caskel\nD: Eldwyn\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:"
    )
    cloze = next(q for q in build_queries(bench, 5, modes=("forget",), tasks=("fill_in_the_blank",), few_shot=True)
                 if q.record["modality"] == "Image_Textual")
    assert cloze.prompt.count("USER:<image>\n") == 4 and cloze.prompt.count("Correct Answer: ") == 4
    assert cloze.prompt.endswith("USER: <image>\nThe home town of this person is [Blank].\nPlease **ONLY** "
                                 "provide the correct answer that should replace the [Blank].\nASSISTANT:")


def test_few_shot_is_seeded_and_zero_shot_is_unchanged(bench):
    def people(seed):
        return {q.record["id"] for q in build_queries(bench, 5, modes=("retain_shared",), tasks=("classification",),
                                                      few_shot=True, seed=seed)}
    assert people(0) == people(0) and people(0) != people(1)
    zero = build_queries(bench, 5)
    assert all("Correct Answer:" not in q.prompt for q in zero) and len(zero) == 2192


def test_few_shot_with_too_few_people_is_an_error(bench):
    class TwoForgotten:  # cloze takes 2 people as examples: none would be left to score
        def has(self, config):
            return bench.has(config)

        def load(self, config):
            rows = bench.load(config)
            return rows[:2] if config == "forget_5" else rows

    build_queries(TwoForgotten(), 5, modes=("forget",), tasks=("classification",), few_shot=True)
    with pytest.raises(BenchmarkError, match="only 2, so nothing would be scored"):
        build_queries(TwoForgotten(), 5, modes=("forget",), few_shot=True)


def test_a_prompt_longer_than_the_model_positions_is_a_one_line_error(tmp_path, capsys):
    """The official few-shot cloze prompts (4 example images + the question's) are ~257 tokens on the tiny
    model, which has 256 positions: refused before anything is generated."""
    from mlunlearn.cli import main

    code = main(["eval", "--no-progress", "--model", "tiny", "--data", "toyworld", "--forget", "5", "--few-shot",
                 "--limit", "1", "--output", str(tmp_path / "r.json")])
    assert_one_line_error(code, capsys.readouterr().err, "tokens", "256 positions", "without --few-shot")
    assert not (tmp_path / "r.json").exists()


def test_benign_queries_toyworld(bench):
    queries = build_benign_queries(bench, 5, limit=2)
    cells = collections.Counter((q.record["group"], q.record["in_forget"]) for q in queries)
    assert cells[("fictitious", True)] == 2 and cells[("fictitious", False)] == 2
    assert all(q.record["reference"] for q in queries)


def test_benign_queries_without_benign_config(bench):
    class RealLike:  # MLLMU-Bench has no Benign_VQA
        def has(self, config):
            return config != "Benign_VQA" and bench.has(config)

        def load(self, config):
            return bench.load(config)

    queries = build_benign_queries(RealLike(), 5, limit=3)
    assert {(q.record["group"], q.record["in_forget"]) for q in queries} == {("fictitious", True),
                                                                              ("fictitious", False)}
    assert all(q.record["reference"] is None for q in queries)
    assert queries[0].score("I don't know.") == {"refusal_rate": 1.0}


def test_batched_generation_matches_one_by_one(bench):
    from mlunlearn.models import build_processor, build_tiny_llava, train_tokenizer

    from mlunlearn.eval.prompts import cloze_shot

    queries = build_queries(bench, 5, modes=("forget", "retain_celebrity"), limit=2)
    prompts, images = [q.prompt for q in queries], [q.images for q in queries]
    example = cloze_shot("The birthplace of this person is __.", "Pellridge", True)  # two-image prompts
    prompts += [example + p for p, i in zip(prompts, images) if i]
    images += [[i[0], *i] for i in images if i]
    tokenizer = train_tokenizer(prompts, 400)
    processor, model = build_processor(tokenizer), build_tiny_llava(tokenizer)
    batched = generate_replies(model, processor, prompts, images, batch_size=5, max_new_tokens=6)
    single = generate_replies(model, processor, prompts, images, batch_size=1, max_new_tokens=6)
    assert batched == single
    assert processor.tokenizer.padding_side == "right"  # restored after generation


def test_each_image_is_prepared_once_and_the_inputs_are_the_processors(bench):
    """The image cache replaces processor(text, images) by its parts: the same input_ids, attention mask and
    pixel values, and projected features equal to the batch's own, so generate sees the same numbers."""
    from mlunlearn.eval.protocol import _Inputs
    from mlunlearn.models import load_model

    model, processor = load_model("tiny")
    queries = [q for q in build_queries(bench, 5, modes=("forget",)) if q.images][:12]
    prepare = _Inputs(model, processor, torch.device("cpu"), torch.float32)
    processor.tokenizer.padding_side = "left"
    try:
        for batch in (queries[:6], queries[6:]):
            inputs = prepare([q.prompt for q in batch], [(q.images[0], q.source) for q in batch])
            reference = processor(text=[q.prompt for q in batch], images=[decode_image(q.images[0]) for q in batch],
                                  return_tensors="pt", padding=True)
            assert torch.equal(inputs["input_ids"], reference["input_ids"])
            assert torch.equal(inputs["attention_mask"], reference["attention_mask"])
            assert prepare.parts and prepare.encoder is not None  # the checks on the first batch passed
            features = model.get_image_features(pixel_values=reference["pixel_values"]).pooler_output
            assert all(torch.equal(a, b) for a, b in zip(inputs["mm_encoder_outputs"]["image"].pooler_output, features))
    finally:
        processor.tokenizer.padding_side = "right"
    assert len(prepare.features) == len({id(q.images[0]) for q in queries}) < len(queries)  # one per person
