"""The evaluation protocol: which questions are asked, determinism, batching."""

import collections

import pytest
import torch

from mlunlearn.data import open_benchmark
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


def test_few_shot_prepends_one_example_and_skips_it(bench):
    plain = build_queries(bench, 5, modes=("forget",), tasks=("classification",))
    shot = build_queries(bench, 5, modes=("forget",), tasks=("classification",), few_shot=True)
    assert len(shot) == len(plain) - 2  # the shot person's first image and first text question are left out
    image_q = next(q for q in shot if q.record["modality"] == "Image_Textual")
    assert image_q.prompt.startswith("USER: <image>\nQuestion: ") and "Correct Answer: " in image_q.prompt
    assert image_q.prompt.count("<image>") == len(image_q.images) == 2
    celebrity = build_queries(bench, 5, modes=("retain_celebrity",), tasks=("classification",), few_shot=True)
    assert all("Correct Answer:" not in q.prompt for q in celebrity)  # as the official script


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

    queries = build_queries(bench, 5, modes=("forget", "retain_celebrity"), limit=2, few_shot=True)
    tokenizer = train_tokenizer([q.prompt for q in queries], 400)
    processor, model = build_processor(tokenizer), build_tiny_llava(tokenizer)
    prompts, images = [q.prompt for q in queries], [q.images for q in queries]
    batched = generate_replies(model, processor, prompts, images, batch_size=5, max_new_tokens=6)
    single = generate_replies(model, processor, prompts, images, batch_size=1, max_new_tokens=6)
    assert batched == single
    assert processor.tokenizer.padding_side == "right"  # restored after generation
