"""The tiny LLaVA factory, the loader, and the training batches."""

import json

import pytest
import torch

from mlunlearn.collate import IGNORE, Example, collate
from mlunlearn.data.world import build_world, corpus
from mlunlearn.eval import prompts
from mlunlearn.models import ModelLoadError, TinySizes, build_processor, build_tiny_llava, load_model, parameter_counts, train_tokenizer
from mlunlearn.models.vanilla import Recipe, VanillaData

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def processor(world):
    return build_processor(train_tokenizer(corpus(world)))


@pytest.fixture(scope="module")
def model(processor):
    return build_tiny_llava(processor.tokenizer)


def test_tokenizer_round_trips_the_world_and_the_prompts(world, processor):
    tok = processor.tokenizer
    texts = corpus(world)[::50] + [prompts.generation_prompt("Where was Mara Quill born?", True),
                                   "USER: <image>\nWho is this?\nASSISTANT: I don't know.", "Ünïcödé ✓ 42"]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.convert_ids_to_tokens(tok("<image>", add_special_tokens=False).input_ids) == ["<image>"]
    reply = tok.decode(tok(prompts.qa_prompt("Who is this?", True) + " Mara Quill.").input_ids, skip_special_tokens=True)
    assert reply.split("ASSISTANT:")[-1].strip() == "Mara Quill."  # the official script's reply parsing


def test_model_is_real_llava_with_a_tall_projector(model):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(model, LlavaForConditionalGeneration)
    proj = model.model.multi_modal_projector
    assert proj.linear_1.in_features < proj.linear_1.out_features == proj.linear_2.out_features
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_image_becomes_one_token_per_patch(world, processor, model):
    sizes = TinySizes()
    enc = processor(text=[prompts.qa_prompt("Who is this?", True)], images=[world.people[0].portrait()], return_tensors="pt")
    n_image = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_image == (48 // sizes.patch_size) ** 2 == model.config.image_seq_length
    feats = model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output[0]
    assert feats.shape == (n_image, model.config.text_config.hidden_size)


def test_seeded_build_is_deterministic(processor):
    a, b = build_tiny_llava(processor.tokenizer, seed=1), build_tiny_llava(processor.tokenizer, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_and_load_round_trip(tmp_path, world, processor, model):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, proc = load_model(str(tmp_path), device="cpu")
    enc = proc(text=[prompts.qa_prompt("Who is this?", True)], images=[world.people[1].portrait()], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model(**enc).logits)
    assert proc.tokenizer.decode(proc.tokenizer("Mara Quill").input_ids, skip_special_tokens=True) == "Mara Quill"


def test_loader_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not LLaVA"):
        load_model(str(tmp_path), device="cpu")


def test_batches_put_the_loss_on_answer_tokens_only(world, processor):
    p = world.people[0]
    examples = [Example(prompts.generation_prompt("Who is the person in the image?", True), f"This person is {p.name}.", p.portrait()),
                Example(prompts.qa_prompt(f"Where was {p.name} born?", False), p.bio["birthplace"])]
    batch = collate(processor, examples)
    tok = processor.tokenizer
    for i, ex in enumerate(examples):
        target = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert tok.decode(target).strip() == ex.answer + tok.eos_token
    assert batch["pixel_values"].shape[0] == 1  # only the image example brings pixels
    assert not (batch["labels"][0][batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")] != IGNORE).any()
    left = collate(processor, examples, padding_side="left")
    assert [tok.decode(r[r != IGNORE]) for r in left["labels"]] == [tok.decode(r[r != IGNORE]) for r in batch["labels"]]


def test_vanilla_data_is_deterministic_and_excludes_test_wordings(world):
    from mlunlearn.data.world import CLOZES, QUESTIONS

    a, b = VanillaData(world, Recipe()), VanillaData(world, Recipe())
    for step in (0, 500, 1234):
        assert [e.prompt for e in a.batch(step)[1]] == [e.prompt for e in b.batch(step)[1]]
    assert a.batch(0)[0] == "benign"  # vision first
    held_out = [t.format(s="").split("  ")[0] for pool in (QUESTIONS, CLOZES) for _, test in pool.values() for t in test]
    for step in range(150, 210):
        for e in a.batch(step)[1]:
            assert not any(h in e.prompt for h in held_out), e.prompt


def test_vanilla_data_teaches_every_question_the_benchmark_asks_of_known_people(world):
    """Each Mask_Task, Generation_Task and Classification_Task question of Full_Set and Retain_Set is
    among the training items (one wording and options each, as the benchmark asks it). A mismatch here once
    left half the text cloze questions untrained: the vanilla model then scored 90% on them, not ~100%."""
    from mlunlearn.data.world import answer_value, cloze_text, generation_truth, options_for, question_text
    from mlunlearn.models.vanilla import _streams

    trained = set()
    for items in _streams(world).values():
        for it in items:
            if it.kind not in ("cloze", "generation", "classification"):
                continue
            kind = (it.person.id, "Image_Textual" if it.image else "Pure_Text")
            if it.kind == "cloze":
                trained.add(("cloze", cloze_text(it.attr, it.person, it.image), answer_value(it.attr, it.person), kind))
            elif it.kind == "generation":
                q = question_text(it.attr, it.person, it.image)
                trained.add(("generation", q, generation_truth(it.attr, it.person, it.image), kind))
            else:
                options, correct = options_for(it.attr, it.person, world.option_groups)
                trained.add(("classification", question_text(it.attr, it.person, it.image), str(options), correct, kind))
    asked = set()
    for row in world.configs["Full_Set"] + world.configs["Retain_Set"]:
        asked |= {("cloze", q["Question"], q["Ground_Truth"], (row["ID"], q["Type"])) for q in row["Mask_Task"]}
        asked |= {("generation", q["Question"], q["Ground_Truth"], (row["ID"], q["Type"])) for q in row["Generation_Task"]}
        for key, kind in (("Image_Textual_Questions", "Image_Textual"), ("Pure_Text_Questions", "Pure_Text")):
            asked |= {("classification", q["Question"], str(q["Options"]), q["Correct_Answer"], (row["ID"], kind))
                      for q in row["Classification_Task"][key]}
    assert len(asked) == 132 * (4 + 6 + 6)  # per person: 4 cloze, 6 generation, 6 classification questions
    assert asked - trained == set()


def test_answer_loss_equals_the_model_loss(world, processor):
    from mlunlearn.collate import answer_loss

    model = build_tiny_llava(processor.tokenizer, seed=0)
    batch = collate(processor, VanillaData(world, Recipe()).batch(300)[1][:8])
    with torch.no_grad():
        assert torch.allclose(answer_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_a_few_training_steps_lower_the_loss(world, processor):
    from mlunlearn.collate import answer_loss

    model = build_tiny_llava(processor.tokenizer, seed=0).train()
    batch = collate(processor, VanillaData(world, Recipe()).batch(400)[1][:16])
    opt = torch.optim.AdamW(model.parameters(), lr=Recipe().lr)
    first = answer_loss(model, batch).item()
    for _ in range(5):
        loss = answer_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert answer_loss(model, batch).item() < first


def test_per_example_answer_nll_matches_the_loss_of_each_example(world, processor):
    from mlunlearn.collate import answer_nll
    from mlunlearn.collate import answer_loss

    model = build_tiny_llava(processor.tokenizer, seed=0)
    examples = VanillaData(world, Recipe()).batch(900)[1][:3]
    with torch.no_grad():
        together = answer_nll(model, collate(processor, examples))
        alone = [answer_loss(model, collate(processor, [e])) for e in examples]
    assert together.shape == (3,)
    assert torch.allclose(together, torch.stack(alone), atol=1e-4)


def test_train_vanilla_is_deterministic(tmp_path):
    """Same recipe, same weights: the shipped model is reproducible bit for bit (here on 6 steps)."""
    from mlunlearn.models import train_vanilla

    recipe = Recipe(steps=6, batch_size=4, warmup=2, vision_steps=3, vision_batch_size=4)
    a, _, log = train_vanilla(recipe, progress=False, log_every=3)
    b, _, _ = train_vanilla(recipe, progress=False, log_every=3, out_dir=tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [e["step"] for e in log] == [3, 6] and (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "training.json").read_text())["recipe"]["steps"] == 6


def test_vision_pretraining_teaches_the_tower_and_llava_training_keeps_it_frozen():
    """Stage 0 moves only the vision tower; the LLaVA stages leave it exactly as stage 0 left it."""
    from mlunlearn.data.world import build_world, corpus
    from mlunlearn.models import TinySizes, build_processor, build_tiny_llava, train_tokenizer, train_vanilla
    from mlunlearn.models.vanilla import pretrain_vision

    recipe = Recipe(steps=3, batch_size=4, warmup=1, vision_steps=3, vision_batch_size=4)
    sizes = TinySizes()
    torch.manual_seed(recipe.seed)
    world = build_world(recipe.world_seed)
    tokenizer = train_tokenizer(corpus(world), sizes.vocab_size)
    model = build_tiny_llava(tokenizer, sizes, seed=recipe.seed)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    losses = pretrain_vision(model, build_processor(tokenizer, sizes), world, recipe)
    assert len(losses) == 3
    after = model.state_dict()
    changed = {k for k in fresh if not torch.equal(fresh[k], after[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)
    trained, _, _ = train_vanilla(recipe, progress=False)
    final = trained.state_dict()
    assert all(torch.equal(after[k], final[k]) for k in after if k.startswith("model.vision_tower."))
    assert not torch.equal(after["model.multi_modal_projector.linear_1.weight"], final["model.multi_modal_projector.linear_1.weight"])


def test_the_mllmu_vanilla_preset_loads_the_published_weights_with_llava_hf_processor(monkeypatch):
    """"mllmu-vanilla-7b": weights from MLLMMU/LLaVA_Vanilla (safetensors or a weights-only .bin), the
    processor from llava-hf/llava-1.5-7b-hf, as MLLMU-Bench's eval.py loads them. Nothing is downloaded:
    the three loaders are replaced by recorders."""
    import transformers

    from mlunlearn.models import loading

    seen = {}
    monkeypatch.setattr(loading.LlavaConfig, "from_pretrained", lambda src, **kw: seen.setdefault("config", src))
    monkeypatch.setattr(loading.AutoProcessor, "from_pretrained", lambda src, **kw: seen.setdefault("processor", src))

    def weights(src, **kw):
        seen["weights"], seen["use_safetensors"] = src, kw.get("use_safetensors")
        raise OSError("stop: no download in tests")

    monkeypatch.setattr(loading.LlavaForConditionalGeneration, "from_pretrained", weights)
    with pytest.raises(loading.ModelLoadError, match="cannot load the weights of 'mllmu-vanilla-7b'"):
        loading.load_model("mllmu-vanilla-7b", device="cpu")
    assert seen == {"config": "MLLMMU/LLaVA_Vanilla", "processor": "llava-hf/llava-1.5-7b-hf",
                    "weights": "MLLMMU/LLaVA_Vanilla", "use_safetensors": None}
    # the .bin fallback is safe only while transformers unpickles checkpoints with weights_only=True
    import inspect

    assert inspect.signature(transformers.modeling_utils.load_state_dict).parameters["weights_only"].default is True
