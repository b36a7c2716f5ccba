"""Procedural face-like portraits for the synthetic world (book chapter 1).

A portrait is drawn from a handful of visible traits, so a model can answer benign questions about it
("what colour is the hair?") from the pixels alone, and a person is identified by the *combination* of
traits, as a face is. ``view`` parameters move, scale and relight the drawing: the ``Test_Set`` analogue
of MLLMU-Bench's transformed views.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

IMAGE_SIZE = 48
_SCALE = 4  # drawn at 4x then downsampled: smooth edges at 48 px
_CANVAS = IMAGE_SIZE * _SCALE

# Each trait's values, in the words the world's questions and answers use.
TRAITS: dict[str, tuple[str, ...]] = {
    "face_shape": ("round", "oval", "square"),
    "skin": ("light", "tan", "brown", "dark"),
    "hair_colour": ("black", "brown", "blonde", "red", "grey"),
    "hair_style": ("short", "long", "bun"),
    "eye_colour": ("blue", "green", "brown"),
    "accessory": ("none", "glasses", "hat"),
    "background": ("blue", "green", "yellow", "pink", "purple", "orange"),
}
# Traits that identify a person (the background is a benign trait but not an identity cue:
# test views may change it).
IDENTITY_TRAITS = ("face_shape", "skin", "hair_colour", "hair_style", "eye_colour", "accessory")

_RGB = {
    "skin": {"light": (246, 214, 189), "tan": (222, 176, 132), "brown": (164, 112, 72), "dark": (96, 62, 40)},
    "hair_colour": {"black": (24, 24, 28), "brown": (110, 62, 30), "blonde": (236, 204, 96),
                    "red": (196, 56, 30), "grey": (168, 168, 172)},
    "eye_colour": {"blue": (40, 90, 230), "green": (30, 160, 60), "brown": (100, 56, 20)},
    "background": {"blue": (120, 170, 235), "green": (140, 210, 140), "yellow": (245, 230, 120),
                   "pink": (245, 170, 200), "purple": (175, 140, 220), "orange": (245, 170, 90)},
}
_SHIRT = (70, 80, 95)
_HAT = (40, 40, 120)


@dataclass(frozen=True)
class View:
    """How a portrait is shown: offsets in output pixels, scale, brightness, optional new background."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    brightness: float = 1.0
    background: str | None = None
    noise: float = 0.0  # std of added pixel noise, in 0-255 units
    seed: int = 0  # seeds the noise


CANONICAL = View()


def random_view(rng: np.random.Generator, change_background: float = 0.3) -> View:
    """A pose-like shift, zoom and lighting change (MLLMU-Bench's ``Test_Set`` views are generated poses)."""
    background = None
    if rng.random() < change_background:
        background = str(rng.choice(TRAITS["background"]))
    return View(
        dx=float(rng.uniform(-3, 3)), dy=float(rng.uniform(-2.5, 2.5)), scale=float(rng.uniform(0.92, 1.08)),
        brightness=float(rng.uniform(0.88, 1.12)), background=background, noise=float(rng.uniform(0, 4)),
        seed=int(rng.integers(2**31)),
    )


def draw_portrait(traits: dict, view: View = CANONICAL) -> Image.Image:
    """Draw a 48x48 RGB portrait. ``traits`` maps each name in :data:`TRAITS` to a value.

    ``hair_style`` may also be ``"none"`` (no hair: hair questions have no answer) and ``eye_colour``
    ``"closed"`` (eyes shut: the eye colour cannot be seen); the world uses these for its
    "I don't know is the right answer" portraits.
    """
    bg_name = view.background or traits["background"]
    img = Image.new("RGB", (_CANVAS, _CANVAS), _RGB["background"][bg_name])
    d = ImageDraw.Draw(img)
    s = view.scale * _SCALE
    cx = _CANVAS / 2 + view.dx * _SCALE
    cy = _CANVAS / 2 + 2 * _SCALE + view.dy * _SCALE

    def box(x0, y0, x1, y1):  # coordinates in 48-px units relative to the face centre
        return [cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s]

    hair = _RGB["hair_colour"].get(traits["hair_colour"])
    style = traits["hair_style"]
    d.ellipse(box(-15, 12, 15, 34), fill=_SHIRT)  # shoulders
    if style == "long":  # hair falls behind the shoulders, drawn first
        d.rectangle(box(-13, -6, 13, 16), fill=hair)
    # Shapes exaggerated so a 12-px patch can tell them apart: wide disc, narrow egg, wide box.
    half_w = {"round": 12, "oval": 8, "square": 12}[traits["face_shape"]]
    half_h = {"round": 12, "oval": 14, "square": 12}[traits["face_shape"]]
    skin = _RGB["skin"][traits["skin"]]
    if traits["face_shape"] == "square":
        d.rounded_rectangle(box(-half_w, -half_h, half_w, half_h), radius=0.5 * s, fill=skin)
    else:
        d.ellipse(box(-half_w, -half_h, half_w, half_h), fill=skin)
    if style != "none":  # a cap of hair over the top of the head
        d.chord(box(-half_w - 1.5, -half_h - 3, half_w + 1.5, half_h * 0.6), 180, 360, fill=hair)
        if style == "bun":
            d.ellipse(box(-6.5, -half_h - 11, 6.5, -half_h + 1), fill=hair)
    eye_y = -1.5
    for ex in (-4.5, 4.5):
        if traits["eye_colour"] == "closed":
            d.line(box(ex - 2.5, eye_y, ex + 2.5, eye_y), fill=(30, 30, 30), width=int(s))
        else:
            d.ellipse(box(ex - 3.4, eye_y - 2.6, ex + 3.4, eye_y + 2.6), fill=(250, 250, 250))
            d.ellipse(box(ex - 2.4, eye_y - 2.4, ex + 2.4, eye_y + 2.4), fill=_RGB["eye_colour"][traits["eye_colour"]])
    d.line(box(-3.5, 6.5, 3.5, 6.5), fill=(120, 40, 40), width=int(s))  # mouth
    if traits["accessory"] == "glasses":
        for ex in (-4.5, 4.5):
            d.rectangle(box(ex - 4.2, eye_y - 3.4, ex + 4.2, eye_y + 3.4), outline=(10, 10, 10), width=int(1.4 * s))
        d.line(box(-0.9, eye_y, 0.9, eye_y), fill=(10, 10, 10), width=int(1.4 * s))
    elif traits["accessory"] == "hat":  # a brimmed hat sitting above the hairline
        top = -half_h - (10 if style == "bun" else 4)
        d.rectangle(box(-9, top - 9, 9, top), fill=_HAT)
        d.rectangle(box(-15, top - 1, 15, top + 1.5), fill=_HAT)

    return finish(img, view.brightness, view.noise, view.seed)


def finish(img: Image.Image, brightness: float, noise: float, seed: int) -> Image.Image:
    """A drawing made at a larger scale, downsampled to IMAGE_SIZE, then given a view's lighting and
    seeded sensor noise (the portraits and the safety world's scenes share it)."""
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    if brightness != 1.0:
        img = ImageEnhance.Brightness(img).enhance(brightness)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + np.random.default_rng(seed).normal(0, noise, arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def blank_image(background: str) -> Image.Image:
    """A uniform image with nothing in it (there is no person to ask about)."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _RGB["background"][background])


def noise_image(seed: int) -> Image.Image:
    """Uniform random pixels."""
    arr = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def png_bytes(img: Image.Image) -> bytes:
    """PNG-encode an image (how Hugging Face stores an ``Image`` feature: ``{"bytes": ..., "path": ...}``)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
