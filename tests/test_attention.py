"""Cross-modal attention (book chapter 7; CAGUL's token selection): scores, ranking, grid layout, eager switch."""

import copy

import pytest
import torch

from mlunlearn.analysis.attention import (
    cross_modal_attention, eager_attention, lowest_k, patch_grid_size, query_masks, rank_visual_tokens,
    to_patch_grid, visual_attention_scores,
)
from mlunlearn.collate import collate
from mlunlearn.data import open_benchmark
from mlunlearn.data.unlearning import unlearning_data
from conftest import needs_vanilla


def _hand_made():
    """One example, T = 6: BOS, 3 visual tokens (positions 1-3), 2 query tokens (4, 5); 1 layer, 2 heads.

    Query rows put on the visual tokens (1, 2, 3): head 0: position 4 (0.1, 0.5, 0.2), position 5 (0.3, 0.1,
    0.2); head 1: (0.0, 0.2, 0.6) and (0.2, 0.0, 0.4). The rest of each row goes to BOS and itself.
    """
    att = torch.zeros(1, 2, 6, 6)
    att[0, 0, 4, 1:4] = torch.tensor([0.1, 0.5, 0.2])
    att[0, 0, 5, 1:4] = torch.tensor([0.3, 0.1, 0.2])
    att[0, 1, 4, 1:4] = torch.tensor([0.0, 0.2, 0.6])
    att[0, 1, 5, 1:4] = torch.tensor([0.2, 0.0, 0.4])
    att[0, :, 4, 0] = 1 - att[0, :, 4, 1:4].sum(-1)
    att[0, :, 5, 0] = 1 - att[0, :, 5, 1:4].sum(-1)
    image = torch.tensor([[False, True, True, True, False, False]])
    query = torch.tensor([[False, False, False, False, True, True]])
    return att, image, query


def test_scores_of_a_hand_made_attention_tensor():
    att, image, query = _hand_made()
    scores = visual_attention_scores([att], image, query)
    assert scores.shape == (1, 1, 2, 3)
    expected = torch.tensor([[0.2, 0.3, 0.2], [0.1, 0.1, 0.5]])  # per head: mean of the two query rows
    assert torch.allclose(scores[0, 0], expected)
    # over heads: token 0 -> 0.15, token 1 -> 0.2, token 2 -> 0.35
    assert rank_visual_tokens(scores).tolist() == [[0, 1, 2]]


def test_lowest_k_picks_the_least_attended_not_the_most():
    att, image, query = _hand_made()
    scores = visual_attention_scores([att], image, query)
    assert lowest_k(scores, 1).tolist() == [[0]]
    assert lowest_k(scores, 2).tolist() == [[0, 1]]
    assert 2 not in lowest_k(scores, 2).tolist()[0]  # the most attended token is never among the lowest
    with pytest.raises(ValueError, match="between 1 and"):
        lowest_k(scores, 4)


def test_grid_layout_is_row_major_from_the_top_left():
    values = torch.arange(16.0)
    grid = to_patch_grid(values, 4)
    assert grid[0, 1] == 1 and grid[1, 0] == 4 and grid[3, 2] == 14  # row j // 4, column j % 4
    # the "full" feature strategy keeps the class token first: it is dropped
    assert torch.equal(to_patch_grid(torch.cat([torch.tensor([-1.0]), values]), 4), grid)
    with pytest.raises(ValueError, match="do not fill a 4x4"):
        to_patch_grid(torch.arange(15.0), 4)


def test_eager_attention_is_switched_back_even_after_an_error():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(_llava_config(image_size=24, patch_size=12))
    model.set_attn_implementation("sdpa")
    with eager_attention(model):
        assert model.config.text_config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa" and model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with eager_attention(model):
            raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert isinstance(model.config, LlavaConfig)


def _llava_config(image_size, patch_size):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=8)
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=1024)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=5,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def test_llava15_shaped_model_gives_a_24x24_map():
    """LLaVA-1.5's geometry (336 px, 14-px patches: 576 visual tokens) on a random model of tiny width."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_llava_config(image_size=336, patch_size=14)).eval()
    assert patch_grid_size(model) == 24
    ids = torch.tensor([[1, 7, 8] + [5] * 576 + [9, 10, 11, 12, 13]])
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(1, 3, 336, 336)}
    att = cross_modal_attention(model, None, batch, over="answer")
    assert att.scores.shape == (1, 2, 2, 576) and att.grid_map().shape == (1, 24, 24)
    assert torch.all(att.layer_profile() <= 1 + 1e-5) and torch.all(att.scores >= 0)


@pytest.fixture(scope="module")
def examples():
    return unlearning_data(open_benchmark("toyworld"), 5).forget[:2]


@needs_vanilla
class TestOnTheTinyModel:
    def test_masks_select_the_question_and_the_positions_that_predict_the_answer(self, vanilla, examples):
        model, processor = vanilla
        batch = collate(processor, examples)
        masks = query_masks(batch, model.config.image_token_index)
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
        question = [t for t, m in zip(tokens, masks["question"][0]) if m]
        assert "Who" in question and "Ġimage" in question and "ASSISTANT" in question
        assert "<image>" not in question and "USER" not in question
        n_answer = int((batch["labels"][0] != -100).sum())
        assert int(masks["answer"][0].sum()) == n_answer
        assert masks["image"][0].sum() == 16
        first = int((batch["labels"][0] != -100).nonzero()[0])
        assert masks["answer"][0, first - 1] and not masks["answer"][0, first + n_answer - 1]

    def test_scores_match_a_direct_forward_and_the_grid_comes_from_the_config(self, vanilla, examples):
        model, processor = vanilla
        att = cross_modal_attention(model, processor, examples, over="question")
        assert att.grid == 4 == model.config.vision_config.image_size // model.config.vision_config.patch_size
        assert att.scores.shape == (2, 4, 4, 16) and att.grid_map().shape == (2, 4, 4)
        batch = collate(processor, examples)
        masks = query_masks(batch, model.config.image_token_index)
        with eager_attention(model), torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True)
        direct = visual_attention_scores(out.attentions, masks["image"], masks["question"])
        assert torch.allclose(att.scores, direct)
        assert torch.allclose(att.grid_map()[:, 0, 1], att.scores.mean(dim=(1, 2))[:, 1])
        assert torch.allclose(att.grid_map(layer=2, head=1).flatten(1), att.scores[:, 2, 1])
        assert torch.all((att.layer_profile() > 0) & (att.layer_profile() < 1))
        assert model.config.text_config._attn_implementation != "eager"
        assert not torch.allclose(att.scores, cross_modal_attention(model, processor, examples, "answer").scores)

    def test_visual_token_order_is_the_patch_grid_order(self, vanilla, examples):
        """Change the pixels of the patch in row 0, column 1 only: of the vision tower's input tokens (the class
        token, then one per patch, the sequence LLaVA's visual tokens keep), only the one that lands in
        ``to_patch_grid`` cell (0, 1) changes."""
        model, processor = vanilla
        pixels = processor.image_processor([examples[0].image], return_tensors="pt")["pixel_values"]
        embeddings = model.model.vision_tower.embeddings
        edited = pixels.clone()
        edited[..., 0:12, 12:24] += 1.0
        with torch.no_grad():
            moved = (embeddings(edited) - embeddings(pixels)).abs().sum(-1)[0]  # (1 + 16,)
        assert moved[0] == 0
        cells = to_patch_grid(moved, 4)  # 17 tokens: the class token is dropped
        assert cells[0, 1] > 0 and int((cells > 0).sum()) == 1

    def test_works_under_peft_and_restores_the_implementation(self, vanilla, examples):
        from peft import LoraConfig, get_peft_model

        model, processor = vanilla
        wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=r".*language_model.*q_proj"))
        wrapped.train()
        att = cross_modal_attention(wrapped, processor, examples)
        plain = cross_modal_attention(model, processor, examples)
        assert torch.allclose(att.scores, plain.scores)  # peft's B = 0 start: the same model
        inner = wrapped.base_model.model
        assert inner.config.text_config._attn_implementation == "sdpa" and wrapped.training


def test_heatmap_over_the_portrait_keeps_the_grid_orientation():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mlunlearn.viz import COLUMN_WIDTH, heatmap_grid, heatmap_over_image, heatmaps_beside_image

    portrait = Image.new("RGB", (48, 48))
    values = to_patch_grid(torch.arange(16.0), 4).numpy()
    shown = heatmap_over_image(portrait, values)
    assert shown.get_extent() == [-0.5, 47.5, 47.5, -0.5]  # the 4x4 cells cover the 48x48 portrait
    assert shown.get_array()[0, 1] == 1 and shown.get_array()[1, 0] == 4  # row 0 drawn at the top
    fig = heatmaps_beside_image(portrait, [values, -values], ["a", "b"], diverging=[False, True])
    assert fig.get_size_inches()[0] <= COLUMN_WIDTH + 1e-9
    fig = heatmap_grid(portrait, [[values] * 4] * 3, ["r1", "r2", "r3"], list("abcd"), diverging=True)
    assert fig.get_size_inches()[0] <= COLUMN_WIDTH + 1e-9
    plt.close("all")
