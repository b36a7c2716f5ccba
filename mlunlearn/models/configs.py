"""LLaVA-1.5's published architecture, for sizing without a download (book chapter 1).

The values are those of the ``config.json`` files of ``llava-hf/llava-1.5-7b-hf`` and ``-13b-hf``:
CLIP ViT-L/14 at 336 px (read at layer -2, CLS dropped: 576 image tokens), a 1024→d→d GELU projector,
and a Vicuna (Llama) language model. A model built from them on the ``meta`` device has the real
parameter counts and no weights.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

_TEXT = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}


def llava_1_5_config(size: str = "7b") -> LlavaConfig:
    """The ``LlavaConfig`` of LLaVA-1.5-7B or -13B (``size`` is ``"7b"`` or ``"13b"``)."""
    if size not in _TEXT:
        raise ValueError(f"unknown LLaVA-1.5 size {size!r}; use '7b' or '13b'")
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       num_key_value_heads=_TEXT[size]["num_attention_heads"], pad_token_id=32001, **_TEXT[size])
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=576)


def meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model's structure on the ``meta`` device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)
