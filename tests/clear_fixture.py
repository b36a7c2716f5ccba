"""A tiny CLEAR in the hub's exact layout and schema: ``{folder}/{config}/train-00000-of-00001.parquet``.

Six fictitious authors (two forgotten by forget05 here, one by forget01), each with one small PNG face, a caption,
a name, a paraphrased caption, three perturbed captions and three perturbed names; ``+tofu`` configs add text
question-answer rows without an image; ``real_faces`` has a real person's name and three wrong options;
``real_world`` a question, its answer, an image, a prompt and options. Column names and kinds as the dataset card
(``therem/CLEAR``) lists them; images stored as ``datasets`` stores them (``{bytes, path}``).
"""

from __future__ import annotations

import io

from PIL import Image

from mlunlearn.data.bench import write_benchmark

AUTHORS = [  # (name, hair, caption)
    ("Ava Stone", "red", "A woman with red hair smiles at a book fair."),
    ("Ben Cole", "blue", "A man with blue hair reads a poem on a stage."),
    ("Cora Lin", "green", "A woman with green hair signs a novel at a desk."),
    ("Dan Roe", "black", "A man with black hair walks past a library."),
    ("Eve Park", "white", "A woman with white hair writes in a small garden."),
    ("Finn Ash", "brown", "A man with brown hair holds a prize in a hall."),
]
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30), "black": (10, 10, 10),
           "white": (240, 240, 240), "brown": (120, 70, 20)}
FORGET = {"forget01": 1, "forget05": 2, "forget10": 3}  # the first N authors are forgotten


def png(colour, size: int = 24) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", (size, size), colour)
    for x in range(size // 4, 3 * size // 4):  # a pale "face" in the middle
        for y in range(size // 4, 3 * size // 4):
            image.putpixel((x, y), (230, 190, 160))
    image.save(buf, format="PNG")
    return buf.getvalue()


def _base(i: int) -> dict:
    name, hair, caption = AUTHORS[i]
    return {"image": {"bytes": png(COLOURS[hair]), "path": f"{i}.png"}, "caption": caption, "name": name}


def _perturbed(i: int) -> dict:
    name, hair, caption = AUTHORS[i]
    others = [a for a in AUTHORS if a[0] != name]
    return {**_base(i),
            "perturbed_captions": [caption.replace(hair, o[1]) for o in others[:3]],
            "paraphrased_caption": f"This is a photo of a person with {hair} hair; {caption.lower()}",
            "perturbed_names": [o[0] for o in others[:3]]}


def _tofu(i: int) -> list:
    name, _, caption = AUTHORS[i]
    image_row = {"image": _base(i)["image"], "caption": caption, "question": None, "answer": None}
    text_row = {"image": None, "caption": None, "question": f"What does {name} write?",
                "answer": f"{name} writes short novels."}
    return [image_row, text_row]


def clear_configs() -> dict:
    """Every config of the fixture, as lists of rows in CLEAR's columns."""
    n = len(AUTHORS)
    configs = {"full": [_base(i) for i in range(n)], "full+tofu": [r for i in range(n) for r in _tofu(i)]}
    for forget, k in FORGET.items():
        retain = "retain" + str(100 - int(forget[-2:]))
        configs[forget] = [_base(i) for i in range(k)]
        configs[retain] = [_base(i) for i in range(k, n)]
        configs[f"{forget}+tofu"] = [r for i in range(k) for r in _tofu(i)]
        configs[f"{retain}+tofu"] = [r for i in range(k, n) for r in _tofu(i)]
        configs[f"{forget}_perturbed"] = [_perturbed(i) for i in range(k)]
    configs["retain_perturbed"] = [_perturbed(i) for i in range(3, n)]  # with name, as the current upload
    configs["real_faces"] = [
        {"image": {"bytes": png((90, 90, 90)), "path": "rf0.png"}, "answer": "Tom Hanks",
         "options": ["Brad Pitt", "Matt Damon", "Tom Cruise"]},
        {"image": {"bytes": png((150, 150, 90)), "path": "rf1.png"}, "answer": "Emma Stone",
         "options": ["Emma Watson", "Anne Hathaway", "Natalie Portman"]},
    ]
    configs["real_world"] = [
        {"question": "What is the capital of France?", "answer": "Paris", "image": None,
         "prompt": "Answer the question.", "options": ["Rome", "Berlin", "Madrid"]},
        {"question": "What colour is the square in the image?", "answer": "grey",
         "image": {"bytes": png((128, 128, 128)), "path": "rw1.png"}, "prompt": "Answer the question.",
         "options": ["red", "blue", "green"]},
    ]
    return configs


def write_clear(folder, names=None):
    """Write the fixture in the hub's layout; returns ``(folder, configs)``."""
    configs = clear_configs()
    write_benchmark(configs, folder, names)
    return folder, configs
