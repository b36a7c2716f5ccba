"""Turning (prompt, answer, image) examples into LLaVA training batches.

Used by the vanilla fine-tune and by every unlearning method. The loss is on the answer tokens only:
prompt and image positions get the label -100 (the public multimodal baselines put the loss on the whole
sequence, a known flaw: it makes "unlearning" also unlearn the prompt format).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from PIL import Image

from mlunlearn.eval.prompts import with_answer

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One supervised turn: ``prompt`` ends with ``ASSISTANT:``; ``answer`` follows after one space."""

    prompt: str
    answer: str
    image: object = None  # a PIL image when the prompt holds ``<image>``


def _image_token_count(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image into (16 tiny, 576 LLaVA-1.5)."""
    if processor not in _IMAGE_TOKENS:
        size = processor.image_processor.crop_size or {"height": 336, "width": 336}
        blank = Image.new("RGB", (size["width"], size["height"]))
        ids = processor(text=[processor.image_token], images=[blank], return_tensors="pt")["input_ids"]
        _IMAGE_TOKENS[processor] = int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
    return _IMAGE_TOKENS[processor]


_IMAGE_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # a processor's count, while it lives


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list, int]:
    """Token ids of ``prompt`` + answer + EOS and the prompt's length in tokens.

    The prompt is tokenized exactly as at evaluation time; the answer is tokenized so that it continues
    it (after ``ASSISTANT:`` it starts with a space, after ``ASSISTANT: `` it does not). This keeps the
    trained token sequence identical to what greedy decoding will have to produce.
    """
    p_ids = tokenizer(prompt).input_ids
    f_ids = tokenizer(with_answer(prompt, answer) + tokenizer.eos_token).input_ids
    if f_ids[: len(p_ids)] == p_ids:
        return f_ids, len(p_ids)
    a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    return p_ids + a_ids, len(p_ids)


def collate(processor, examples, padding_side: str = "right") -> dict:
    """A batch ``{input_ids, attention_mask, labels[, pixel_values]}`` for a LLaVA model.

    Shapes: ids/mask/labels ``(B, T)``; ``pixel_values`` ``(n_images, 3, H, W)`` for the examples that
    have an image, in batch order (LLaVA fills the ``<image>`` positions in that order, so text-only and
    image examples can share a batch). Labels are -100 on padding, prompt and image positions.
    """
    tok = processor.tokenizer
    expand = processor.image_token * _image_token_count(processor)
    rows = [encode_example(tok, e.prompt.replace(processor.image_token, expand), e.answer) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        start = 0 if padding_side == "right" else width - len(ids)
        input_ids[i, start:start + len(ids)] = torch.tensor(ids)
        mask[i, start:start + len(ids)] = 1
        labels[i, start + n_prompt:start + len(ids)] = torch.tensor(ids[n_prompt:])
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    images = [e.image for e in examples if e.image is not None]
    if images:
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch


def answer_nll(model, batch) -> torch.Tensor:
    """Mean negative log-likelihood of each example's answer tokens, shape ``(B,)`` (nats per token)."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return nll_from_logits(out.logits, batch["labels"])


def nll_from_logits(logits, labels) -> torch.Tensor:
    """Per-example mean answer-token NLL from full-sequence ``logits`` ``(B, T, V)`` and ``labels`` ``(B, T)``
    (-100 off the answer; position t predicts token t+1); shape ``(B,)``."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(1) / mask.sum(1).clamp(min=1)


def answer_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, computing logits only where there is a label.

    Same value as ``model(**batch).loss``; skipping the vocabulary projection at prompt and image
    positions makes a tiny model's step about 15% cheaper.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def teacher_forced_batches(model, processor, examples, batch_size: int = 16):
    """Yield ``(batch, logits)`` for ``examples`` in batches of ``batch_size``: one teacher-forced forward
    each, in eval mode and without gradients, on the model's device (pixel values in its dtype). The model's
    training mode is restored afterwards. What the membership-inference scores (:mod:`mlunlearn.eval.mia`)
    and the TOFU-style probabilities (:mod:`mlunlearn.eval.tofu`) read their token log-probs from."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                batch = collate(processor, examples[start:start + batch_size])
                batch = {k: v.to(device) for k, v in batch.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(dtype)
                yield batch, model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        model.train(was_training)
