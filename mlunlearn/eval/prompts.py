"""MLLMU-Bench's prompts, exactly as its official evaluation script writes them.

Shared by evaluation and by the tiny vanilla model's training, so the tiny model learns the very
formats it is tested on (book chapter 1). ``image=True`` puts LLaVA-1.5's ``<image>`` placeholder in
the prompt; the processor expands it to one token per visual patch.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
LETTERS = ("A", "B", "C", "D")

CLASSIFICATION_SUFFIX = "Just give ONE letter representing the answer directly."
CLOZE_SUFFIX = "Please **ONLY** provide the correct answer that should replace the [Blank]."
GENERATION_SUFFIX_IMAGE = "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
GENERATION_SUFFIX_TEXT = "Answer the question based on your trained knowledge in one sentence in ENGLISH."


def user_turn(text: str, image: bool) -> str:
    """``USER: <image>\\n{text}`` with an image, ``USER: {text}`` without (LLaVA-1.5 chat format)."""
    return f"USER: {IMAGE_TOKEN}\n{text}" if image else f"USER: {text}"


def chat(text: str, image: bool) -> str:
    """A full single-turn prompt ending in ``ASSISTANT:``; the reply follows after one space."""
    return f"{user_turn(text, image)}\nASSISTANT:"


def format_options(question: str, options: dict) -> str:
    """``{question}\\nA: ..\\nB: ..`` in the options' own order, as the official script does."""
    return question + "\n" + "\n".join(f"{k}: {v}" for k, v in options.items())


def _official_turn(text: str, image: bool) -> str:
    """``USER: <image>\\n{text}`` or, without an image, ``USER:\\n{text}``.

    Why: the official script's classification and cloze prompts put a newline (not a space) after a
    text-only ``USER:``; generation prompts do not (they use :func:`user_turn`).
    """
    return f"USER: {IMAGE_TOKEN}\n{text}" if image else f"USER:\n{text}"


def classification_prompt(question: str, options: dict, image: bool) -> str:
    """4-option question; the model should reply with a single letter."""
    body = f"{format_options(question, options)}\n{CLASSIFICATION_SUFFIX}"
    return f"{_official_turn(body, image)}\nASSISTANT:"


def classification_shot(question: str, options: dict, answer: str, image: bool) -> str:
    """One worked example as the official script prepends it (``Question: … Correct Answer: X``).

    Why the letters are spelled out: the official example lists ``options['A']`` … ``options['D']`` in that
    order (not the options' own order, as its question prompt does).
    """
    lines = "\n".join(f"{letter}: {options[letter]}" for letter in LETTERS)
    return _official_turn(f"Question: {question}\n{lines}\nCorrect Answer: {answer}\n", image)


def cloze_question(question: str) -> str:
    """The cloze body: the dataset writes the blank as ``__``; the prompt shows it as ``[Blank]``."""
    return f"{question.replace('__', '[Blank]')}\n{CLOZE_SUFFIX}"


def cloze_prompt(question: str, image: bool) -> str:
    """Cloze question; the model should reply with the missing words only."""
    return f"{_official_turn(cloze_question(question), image)}\nASSISTANT:"


def cloze_shot(question: str, answer: str, image: bool) -> str:
    """One official cloze example; note ``USER:<image>`` without a space, as the official script writes it."""
    head = f"USER:{IMAGE_TOKEN}" if image else "USER:"
    return f"{head}\n{cloze_question(question)}\nCorrect Answer: {answer}\n"


def generation_prompt(question: str, image: bool) -> str:
    """Open question answered in one sentence (the image and text variants differ in one word).

    The image variant ends in ``"ASSISTANT: "`` (trailing space) and the text variant in ``"ASSISTANT:"``,
    exactly as in the official script. With a whitespace tokenizer the space changes nothing; with
    LLaVA's SentencePiece tokenizer it adds a lone ``▁`` token before the reply.
    """
    suffix = GENERATION_SUFFIX_IMAGE if image else GENERATION_SUFFIX_TEXT
    return chat(f"{question}\n{suffix}", image) + (" " if image else "")


def qa_prompt(question: str, image: bool) -> str:
    """Plain question (ft_Data, benign visual questions): ``USER: <image>\\n{q}\\nASSISTANT:``."""
    return chat(question, image)


def with_answer(prompt: str, answer: str) -> str:
    """A training text: the prompt followed by its answer, with exactly one space after ``ASSISTANT:``.

    Why: :func:`generation_prompt` with an image already ends in a space (an official quirk); the other
    prompts end in ``ASSISTANT:``. This keeps the trained text identical to what evaluation feeds.
    """
    return prompt + answer if prompt.endswith(" ") else f"{prompt} {answer}"
