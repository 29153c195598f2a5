"""Drawing helpers of the GroupViT segmentation figures (thesis chapter 5: Fig 9-10, 15-16, 19-25, 28-30), each
on a given ``ax``: class-coloured label maps, their legend, rows of maps beside the image, IoU-disparity bars
and token scatters. The data comes from :mod:`nbsupport.analysis.segmentation_figures`.
"""

from __future__ import annotations

import numpy as np
from matplotlib.patches import Patch

from nbsupport.analysis.segmentation_figures import colorize
from nbsupport.notebook.viz import _bare, show_image, to_rgb


def show_labels(ax, labels, palette, img=None, alpha: float = 0.6, title: str | None = None):
    """A label map ``[H, W]`` in its classes' colours (``palette [L, 3]`` uint8, ignore white); with ``img``
    blended over the image (``alpha``). Returns ``ax``."""
    rgb = colorize(labels, palette).astype(np.float32) / 255.0
    if img is not None:
        base = to_rgb(img)
        if base.shape[:2] != rgb.shape[:2]:
            raise ValueError(f"image {base.shape[:2]} and labels {rgb.shape[:2]} differ in size")
        rgb = (1 - alpha) * base + alpha * rgb
    return show_image(ax, rgb, title)


def label_legend(ax, labels, names, palette, loc: str = "center left", fontsize: int = 7, **kwargs):
    """A legend of coloured squares for ``labels`` (ints; repeats and 255 dropped) named by ``names``,
    outside the right edge of ``ax`` by default. Returns the legend (None without labels)."""
    labs = sorted({int(v) for v in np.asarray(list(labels)).ravel() if int(v) != 255})
    if not labs:
        return None
    handles = [Patch(color=np.asarray(palette[k]) / 255.0, label=str(names[k])) for k in labs]
    kwargs.setdefault("bbox_to_anchor", (1.02, 0.5))
    return ax.legend(handles=handles, loc=loc, fontsize=fontsize, frameon=False, **kwargs)


def map_row(axes, img, maps: dict, palette, titles: bool = True, overlay: bool = False):
    """One figure row: the image, then every label map of ``maps`` (``{column title: [H, W]}``) in class
    colours (``overlay``: blended over the image). Returns the set of labels drawn."""
    axes = list(axes)
    if len(axes) != 1 + len(maps):
        raise ValueError(f"{len(axes)} axes for an image and {len(maps)} maps")
    show_image(axes[0], img, "image" if titles else None)
    seen: set[int] = set()
    for ax, (name, lab) in zip(axes[1:], maps.items()):
        show_labels(ax, lab, palette, img if overlay else None, title=name if titles else None)
        seen |= {int(v) for v in np.unique(np.asarray(lab))}
    return seen


def disparity_bars(ax, df, title: str | None = None, value: str = "difference", label: str = "class"):
    """Horizontal bars of the per-class IoU difference (thesis Fig 21-22; a table of
    :func:`~nbsupport.analysis.segmentation_figures.iou_disparity`): largest at the top, gains green, losses
    red, a zero line, the value at each bar's end. Returns ``ax``."""
    v = np.asarray(df[value], float)
    names = [str(c) for c in df[label]]
    y = np.arange(len(v))[::-1]
    ax.barh(y, v, color=["tab:green" if d >= 0 else "tab:red" for d in v])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    span = max(float(np.abs(v).max()) if len(v) else 1.0, 1e-9)
    for yy, d in zip(y, v):
        ax.text(d + (0.02 * span if d >= 0 else -0.02 * span), yy, f"{d:+.1f}", va="center",
                ha="left" if d >= 0 else "right", fontsize=7)  # fmt: skip
    ax.set_xlim(-1.25 * span, 1.25 * span)
    ax.set_xlabel("IoU difference (B - A, points)")
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title)
    return ax


def scatter_labels(ax, xy, labels, names, palette, s: float = 14, title: str | None = None, legend: bool = True):
    """2-D points ``xy [M, 2]`` coloured by their label (thesis Fig 23: the class each token is given),
    with a legend of the labels present. Returns ``ax``."""
    xy, labels = np.asarray(xy, float).reshape(-1, 2), np.asarray(labels)
    for k in np.unique(labels):
        m = labels == k
        ax.scatter(*xy[m].T, s=s, color=np.asarray(palette[int(k)]) / 255.0, edgecolors="k", linewidths=0.2)
    _bare(ax, title)
    if legend:
        label_legend(ax, labels, names, palette)
    return ax
