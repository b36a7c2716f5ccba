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


# ----------------------------------------------------------------------------------------------------
# Attention and saliency over the portrait (book chapter 7)
# ----------------------------------------------------------------------------------------------------

def heatmap_over_image(image, values, ax=None, cmap: str | None = None, vmin=None, vmax=None,
                       alpha: float = 0.6, diverging: bool = False):
    """``values`` (a ``(grid, grid)`` patch map, or a pixel map) drawn over ``image``: each cell covers its
    patch of the portrait, row 0 at the top (the visual-token order of
    :func:`mlunlearn.analysis.to_patch_grid`). ``diverging``: a red-blue map centred on 0 (signed
    attributions); otherwise a sequential map from ``vmin`` (default the map's minimum). Returns the
    heat-map's ``AxesImage`` (for a colour bar)."""
    img = np.asarray(decode_image(image))
    values = np.asarray(values, dtype=float)
    ax = ax or plt.subplots(figsize=(2.4, 2.4))[1]
    ax.imshow(img, interpolation="nearest")
    if diverging:
        bound = np.abs(values).max() if vmax is None else vmax
        vmin, vmax, cmap = -bound, bound, cmap or "RdBu_r"
    shown = ax.imshow(values, cmap=cmap or "magma", vmin=vmin, vmax=vmax, alpha=alpha, interpolation="nearest",
                      extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    ax.set_xticks([]), ax.set_yticks([])
    ax.grid(False)
    return shown


def heatmaps_beside_image(image, maps, titles, suptitle: str | None = None, diverging=False, shared_scale=False,
                          size: float = 1.75, colorbar_label: str | None = None):
    """The portrait, then each map of ``maps`` over it, in one row at most :data:`COLUMN_WIDTH` wide.

    ``diverging``: one bool for all maps or one per map (signed attributions: red-blue centred on 0).
    ``shared_scale``: one colour scale for all maps (to compare magnitudes, e.g. before and after
    unlearning); otherwise each map has its own scale and colour bar.
    """
    maps = [np.asarray(m, dtype=float) for m in maps]
    flags = [diverging] * len(maps) if isinstance(diverging, bool) else list(diverging)
    n = len(maps) + 1
    size = min(size, COLUMN_WIDTH / (n + 0.35 * len(maps)))
    fig, axes = plt.subplots(1, n, figsize=(COLUMN_WIDTH if n > 3 else size * n * 1.35, size + 0.75),
                             squeeze=False)
    axes = axes[0]
    axes[0].imshow(np.asarray(decode_image(image)), interpolation="nearest")
    axes[0].set_title("portrait", fontsize=9)
    axes[0].set_xticks([]), axes[0].set_yticks([])
    axes[0].grid(False)
    bound = max(np.abs(m).max() for m in maps) if shared_scale else None
    low = min(m.min() for m in maps) if shared_scale else None
    for ax, values, title, signed in zip(axes[1:], maps, titles, flags):
        if signed:
            shown = heatmap_over_image(image, values, ax, diverging=True, vmax=bound)
        else:
            shown = heatmap_over_image(image, values, ax, vmin=low, vmax=bound)
        ax.set_title(title, fontsize=9)
        if not shared_scale or ax is axes[-1]:
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=7)
            if colorbar_label and ax is axes[-1]:
                bar.set_label(colorbar_label, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer_profile(profiles: dict, ax=None, ylabel: str = "attention to the image",
                       title: str | None = None, styles: dict | None = None):
    """One line per entry of ``profiles`` (label → values per decoder layer, e.g.
    :meth:`mlunlearn.analysis.CrossModalAttention.layer_profile` of one example), layers on the x axis; the
    legend sits right of the axes. ``styles``: label → keyword arguments for ``ax.plot``."""
    ax = ax or plt.subplots(figsize=(COLUMN_WIDTH * 0.6, 2.6))[1]
    for label, values in profiles.items():
        values = np.asarray(values, dtype=float)
        ax.plot(range(len(values)), values, marker="o", lw=1.5, label=label, **(styles or {}).get(label, {}))
    ax.set_xticks(range(max(len(np.asarray(v)) for v in profiles.values())))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return ax


def heatmap_grid(image, maps, row_labels, column_labels, diverging=False, colorbar_labels=None,
                 suptitle: str | None = None):
    """A table of maps over one portrait: ``maps[r][c]`` is drawn over ``image`` in row ``r`` (e.g. a
    measure), column ``c`` (e.g. a model); each row shares one colour scale (``diverging``: one bool for all
    rows or one per row) with its colour bar at the right, so a row compares like with like."""
    rows, cols = len(maps), len(maps[0])
    flags = [diverging] * rows if isinstance(diverging, bool) else list(diverging)
    cell = min(1.6, (COLUMN_WIDTH - 0.9) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.9, cell * rows + 0.5), squeeze=False)
    for r in range(rows):
        values = [np.asarray(m, dtype=float) for m in maps[r]]
        bound = max(np.abs(v).max() for v in values)
        low = min(v.min() for v in values)
        for c, v in enumerate(values):
            ax = axes[r, c]
            shown = (heatmap_over_image(image, v, ax, diverging=True, vmax=bound) if flags[r]
                     else heatmap_over_image(image, v, ax, vmin=low, vmax=bound))
            if r == 0:
                ax.set_title(column_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
        bar = fig.colorbar(shown, ax=list(axes[r]), fraction=0.025, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        if colorbar_labels:
            bar.set_label(colorbar_labels[r], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig
