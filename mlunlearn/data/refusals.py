"""Refusal answers: the "I don't know" family.

``IDK`` is the world's natural answer wherever a question cannot be answered (a stranger's name, the hair
colour of a bald portrait, anything about a blank image). ``REFUSALS`` are the strings refusal-based
unlearning methods (refusal PO, SafeEraser's PO) train the model to say; the tiny tokenizer is trained on
all of them, so each round-trips exactly.
"""

IDK = "I don't know."

REFUSALS = (
    IDK,
    "I do not know.",
    "I'm not sure.",
    "I have no idea.",
    "I cannot answer that.",
    "Sorry, I don't know who this is.",
    "I don't have any information about that.",
    "I am unable to answer this question.",
    "That is not something I know.",
    "I can't help with that.",
)
