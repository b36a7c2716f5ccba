"""A LLaVA-1.5 with llava-hf's exact shapes but 1–2 layers per tower and random weights (issue 13).

Nothing of the real LLaVA-1.5 path can download in CI, so this stands in for ``llava-hf/llava-1.5-7b-hf``:
every config value is the published one (:func:`mlunlearn.models.configs.llava_1_5_config`: CLIP ViT-L/14
at 336 px read at layer -2 with the CLS token dropped, a 1024→4096→4096 GELU projector, Llama-2-7B's text
config, ``<image>`` = 32000, ``<pad>`` = 32001, vocabulary 32064) except the number of layers. One text
layer of LLaVA-1.5-7B is 202 M parameters and its embedding and head 131 M each, so the model is ~0.5 B
parameters (2 GB in fp32) and every tensor a 7B run allocates per layer, per token and per vocabulary
entry has its real size: what the memory estimate (:mod:`mlunlearn.memory`) is checked against.

The processor is the published one rebuilt offline: a CLIP image processor at 336 px (resize the shortest
edge to 336, centre crop 336, CLIP's mean/std) and ``patch_size=14`` with the "default" strategy, so one
image expands to (336/14)² = **576** ``<image>`` tokens; llava-hf's chat template
(``USER: <image>\\n{question} ASSISTANT:``). The tokenizer is Llama-shaped: ``<unk>``=0, ``<s>``=1,
``</s>``=2, the 256 byte-fallback tokens ``<0x00>``…``<0xFF>`` at 3…258, 32000 regular ids, a SentencePiece
``▁`` word marker and BOS prepended; its merges are learned from the book's prompts and the world's
words in a fraction of a second (the rest of the 32000 ids are unused fillers).

Its family is ``"llava-1.5"`` (:func:`mlunlearn.engine.model_family`: a 4096-wide language model), so the
engine applies LLaVA-1.5's defaults (MLLMU-Bench's lr 2e-5, batch 4; gradient checkpointing on).

    from mlunlearn.models import build_llava_1_5_shaped, load_model
    folder = build_llava_1_5_shaped("/tmp/llava7b-shaped")        # ~10 s, 2 GB of safetensors
    model, processor = load_model(str(folder), device="cpu")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .configs import llava_1_5_config
from .tiny import CLIP_MEAN, CLIP_STD

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama-2's tokenizer
N_BYTES = 256  # <0x00> … <0xFF> at ids 3 … 258
LLAMA_VOCAB = 32000  # Llama-2's regular vocabulary; <image> = 32000 and <pad> = 32001 are added after it
IMAGE_SIZE, PATCH_SIZE = 336, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
INIT_STD = 0.02  # Llama's initializer_range: small weights, finite losses of about log(32064) at the start
# llava-hf/llava-1.5-7b-hf's chat template: "USER: <image>\n{question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _training_texts() -> list:
    """The book's fixed prompt phrases and the world's words (no world is built: that takes seconds)."""
    from mlunlearn.data.portraits import TRAITS
    from mlunlearn.data.refusals import REFUSALS
    from mlunlearn.data.world import ATTRIBUTES, BENIGN_QUESTIONS
    from mlunlearn.eval import prompts

    fixed = [prompts.CLASSIFICATION_SUFFIX, prompts.CLOZE_SUFFIX, prompts.GENERATION_SUFFIX_IMAGE,
             prompts.GENERATION_SUFFIX_TEXT, "USER:\nASSISTANT: Question: Correct Answer: [Blank]",
             "What is this person's name? What does this person do? Where does this person live?"]
    texts = fixed * 50 + [*REFUSALS, *BENIGN_QUESTIONS.values()] * 5
    for vals in (*ATTRIBUTES.values(), *TRAITS.values()):
        texts.extend(f" {v}" for v in vals for _ in range(3))
    return texts


def llama_style_tokenizer(texts=None, merges: int = 3000) -> PreTrainedTokenizerFast:
    """A tokenizer laid out like Llama-2's, built offline.

    BPE with byte fallback and SentencePiece's ``▁`` word marker (prepended to the first word, spaces
    replaced), ``<s>`` prepended to every text; ids: the specials 0–2, the byte tokens 3–258, then the
    learned pieces, then unused fillers up to 32000; ``<image>`` = 32000, ``<pad>`` = 32001 (added
    special tokens, as llava-hf added them). ``merges`` caps the learned pieces (trained on ``texts``,
    default: the book's prompt phrases and the world's words).
    """
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=merges, special_tokens=list(LLAMA_SPECIALS), min_frequency=2,
                                  show_progress=False)
    learner.train_from_iterator(list(texts if texts is not None else _training_texts()), trainer)
    learned = json.loads(learner.to_str())["model"]
    # Llama-2 has no newline piece: "\n" falls back to the byte token <0x0A> (id 13); so here.
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])
              if t not in LLAMA_SPECIALS and "\n" not in t]
    vocab = {t: i for i, t in enumerate(LLAMA_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(LLAMA_SPECIALS) + b for b in range(N_BYTES)})
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    if len(vocab) > LLAMA_VOCAB:
        raise ValueError(f"{len(vocab)} pieces do not fit Llama's {LLAMA_VOCAB} ids; lower merges")
    for i in range(len(vocab), LLAMA_VOCAB):  # never produced: no merge leads to them
        vocab[f"<unused{i}>"] = i
    merge_pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    merge_pairs = [m for m in merge_pairs if "\n" not in m[0] + m[1]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False, padding_side="left",
    )


def llava_1_5_processor(tokenizer=None) -> LlavaProcessor:
    """LLaVA-1.5's processor: CLIP at 336 px, patch 14, "default" strategy (576 image tokens), chat template."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True, resample=3,  # bicubic, as published
    )
    # CLIP prepends a CLS token that the "default" strategy drops: one extra token counted, then removed.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer or llama_style_tokenizer(),
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def shaped_config(size: str = "7b", text_layers: int = 1, vision_layers: int = 1) -> LlavaConfig:
    """``llava_1_5_config(size)`` with ``text_layers`` decoder layers and ``vision_layers`` CLIP layers.

    With one vision layer, layer -2 (LLaVA's feature layer) is the patch embeddings after CLIP's
    pre-layernorm: the image tokens still pass the real projector shapes."""
    for name, value in (("text_layers", text_layers), ("vision_layers", vision_layers)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be a whole number >= 1")
    config = llava_1_5_config(size)
    config.text_config.num_hidden_layers = text_layers
    config.vision_config.num_hidden_layers = vision_layers
    config.text_config.bos_token_id, config.text_config.eos_token_id = 1, 2
    config.pad_token_id = config.text_config.pad_token_id
    config.tie_word_embeddings = False
    return config


@torch.no_grad()
def _init_weights(model, seed: int) -> None:
    """Deterministic small-std weights from ``seed``: N(0, 0.02²) matrices and embeddings, zero biases,
    unit norm scales (RMSNorm / LayerNorm), filled in ``named_parameters`` order from one generator."""
    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm,) + tuple(type(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    kinds = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            kinds[id(p)] = "norm" if isinstance(module, norms) and pname == "weight" else pname
    for _, p in model.named_parameters():
        kind = kinds[id(p)]
        if kind == "norm":
            p.fill_(1.0)
        elif kind == "bias":
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD, generator=generator)


def shaped_model(size: str = "7b", text_layers: int = 1, vision_layers: int = 1, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """The shaped model in memory (CPU, ``dtype``), weights from :func:`_init_weights`; nothing written.

    Built on the meta device and materialised once (no default initialisation to overwrite). The
    non-persistent buffers are recomputed as ``from_pretrained`` would: RoPE's inverse frequencies and
    CLIP's position ids."""
    config = shaped_config(size, text_layers, vision_layers)
    config.dtype = dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model = model.to_empty(device="cpu")
    _init_weights(model, seed)
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(module.config)  # small: the buffers only
            module.inv_freq, module.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
        if hasattr(module, "position_ids") and hasattr(module, "num_positions"):
            module.position_ids = torch.arange(module.num_positions).expand((1, -1))
    model.generation_config.pad_token_id = 32001
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    return model.eval()


def build_llava_1_5_shaped(folder, size: str = "7b", text_layers: int = 1, vision_layers: int = 1,
                           seed: int = 0) -> Path:
    """Write a LLaVA-1.5-``size``-shaped model (random weights) and its processor into ``folder``.

    ``load_model(str(folder))`` loads it (in fp32 on the CPU). The weights are fp16 safetensors, as
    llava-hf publishes them (half the bytes to write: ~1 GB at 7B with one layer per tower); same seed,
    same bytes. Returns the folder."""
    folder = Path(folder)
    model = shaped_model(size, text_layers, vision_layers, seed, dtype=torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    llava_1_5_processor().save_pretrained(folder)
    return folder
