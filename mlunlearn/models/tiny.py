"""A tiny but genuine LLaVA-1.5, built offline (book chapter 1).

Every part is the real Hugging Face class LLaVA-1.5 uses: a CLIP vision tower whose second-to-last layer
feeds (CLS dropped) a two-layer GELU projector (``multi_modal_projector.linear_1/linear_2``) into a Llama
language model. Only the sizes shrink. The projector is *tall* like LLaVA's 1024→4096: vision width 48,
text width 128, so its Jacobian has a meaningful spectrum (a square one saturates; see the diagnosis
chapter). The tokenizer is a byte-level BPE trained on the world's own text, so it round-trips any string
exactly and code written for real LLaVA (splitting replies on ``"ASSISTANT:"``) works unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mlunlearn.data.portraits import IMAGE_SIZE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# CLIP's normalisation constants, as in LLaVA-1.5's image processor.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySizes:
    """The tiny model's dimensions (LLaVA-1.5-7B's in comments)."""

    vision_width: int = 48  # 1024
    vision_layers: int = 3  # 24 (the projector reads layer -2, as in LLaVA)
    vision_heads: int = 4  # 16
    patch_size: int = 12  # 14 -> (48/12)^2 = 16 image tokens (576 in LLaVA-1.5)
    text_width: int = 128  # 4096
    text_layers: int = 4  # 32
    text_heads: int = 4  # 32
    text_mlp: int = 384  # 11008
    vocab_size: int = 1536  # 32064 (trained BPE may stop below this)


def train_tokenizer(texts, vocab_size: int = 1536) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``; decodes every string back exactly.

    BOS ``<s>`` is prepended as Llama's tokenizer does; ``<image>`` is one special token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False, padding_side="right",
    )


def build_processor(tokenizer, sizes: TinySizes = TinySizes()) -> LlavaProcessor:
    """LLaVA's processor around a CLIP image processor at the tiny resolution."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    # CLIP prepends a CLS token that the "default" strategy drops: one extra token must be counted.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_tiny_llava(tokenizer, sizes: TinySizes = TinySizes(), seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` of the given sizes (seeded)."""
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_width, intermediate_size=4 * sizes.vision_width,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        image_size=IMAGE_SIZE, patch_size=sizes.patch_size, projection_dim=sizes.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_width, intermediate_size=sizes.text_mlp,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    n_patches = (IMAGE_SIZE // sizes.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=n_patches,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def sizes_dict(sizes: TinySizes) -> dict:
    return asdict(sizes)
