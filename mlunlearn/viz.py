"""Figures the chapters share: the book's figure style, portrait grids, patch grids, training curves
(book chapter 1).

Every chapter calls :func:`book_style` once: one seaborn theme, fonts that stay legible at the book's
column width, and high-resolution (retina) inline output.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from mlunlearn.data import decode_image

# The rendered book's text column is about 7.3 inches wide at 100 dpi: a figure no wider than this is
# shown at its own size, so its fonts keep the sizes set in book_style. Wider figures are shrunk.
COLUMN_WIDTH = 7.2


def book_style(retina: bool = True) -> None:
    """The book's figure style: seaborn's ``whitegrid`` theme with 10–11 pt text, and (in a notebook)
    retina PNG output, so figures of at most :data:`COLUMN_WIDTH` inches stay sharp and legible."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="deep", rc={
        "figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (COLUMN_WIDTH, 3.6),
        "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9, "legend.fontsize": 9, "legend.title_fontsize": 9, "figure.titlesize": 11,
        "figure.constrained_layout.use": False,
    })
    if retina:
        try:
            from IPython import get_ipython
            from matplotlib_inline.backend_inline import set_matplotlib_formats
        except ImportError:  # not in IPython: nothing to configure
            return
        if get_ipython() is not None:
            set_matplotlib_formats("retina")


def portrait_grid(rows, highlight=(), columns: int = 10, title: str | None = None, image_key: str = "image"):
    """A grid of the rows' images labelled by ID; IDs in ``highlight`` get a red frame (e.g. the forget set)."""
    n = len(rows)
    lines = int(np.ceil(n / columns))
    cell = min(1.1, COLUMN_WIDTH / columns)  # inches per portrait: the grid fits the column
    fig, axes = plt.subplots(lines, columns, figsize=(cell * columns, (cell + 0.15) * lines),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        img = row[image_key][0] if image_key == "images" else row[image_key]
        ax.imshow(decode_image(img))
        ax.set_title(row["ID"], fontsize=8, color="crimson" if row["ID"] in highlight else "black")
        if row["ID"] in highlight:
            ax.axis("on")
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("crimson"), spine.set_linewidth(2.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def image_strip(images, labels, title: str | None = None, size: float = 1.4):
    """Images side by side with a label under each (``size`` inches each, shrunk to fit the column)."""
    size = min(size, COLUMN_WIDTH / len(images))
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.4), squeeze=False)
    for ax, img, label in zip(axes.flat, images, labels):
        ax.imshow(decode_image(img))
        ax.set_xlabel(label, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def patch_grid(image, patch_size: int, ax=None):
    """The image with its vision-transformer patches outlined and numbered in token order."""
    img = np.asarray(decode_image(image))
    ax = ax or plt.subplots(figsize=(3, 3))[1]
    ax.imshow(img)
    side = img.shape[0] // patch_size
    for k in range(1, side):
        ax.axhline(k * patch_size - 0.5, color="white", lw=1)
        ax.axvline(k * patch_size - 0.5, color="white", lw=1)
    for i in range(side if side <= 8 else 0):  # numbers only while they stay legible
        for j in range(side):
            ax.text(j * patch_size + patch_size / 2, i * patch_size + patch_size / 2, str(i * side + j),
                    color="white", ha="center", va="center", fontsize=8, fontweight="bold")
    ax.set_xticks([]), ax.set_yticks([])
    return ax


def plot_training_log(log, ax=None, title: str = "training loss per stream"):
    """Loss per data stream against step, from a training log (a list of ``{"step", "loss/…"}`` dicts).
    The legend sits outside the axes, right of them, so it covers no curve."""
    ax = ax or plt.subplots(figsize=(COLUMN_WIDTH, 3.6))[1]
    streams = sorted({k for entry in log for k in entry if k.startswith("loss/")})
    for key in streams:
        points = [(e["step"], e[key]) for e in log if key in e]
        ax.plot(*zip(*points), label=key[5:], lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="stream")
    ax.figure.tight_layout()
    return ax
