"""Plotting helpers that draw on a given ``ax``, and ``save_figure`` (PNG + PDF into the run folder).

Notebooks compose these; none of them calls ``plt.show``, so headless runs never block. Images may be
PIL images, uint8 or float ``[H, W, 3]`` arrays, or ImageNet-normalised tensors ``[3, H, W]``
(what ``nbsupport.data.image_to_tensor`` returns); points are pixel ``(y, x)`` pairs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgb as _color_rgb
from PIL import Image

from nbsupport.core import paths

PALETTE = plt.get_cmap("tab10").colors


def setup_style() -> None:
    """One consistent look for every notebook (seaborn whitegrid, readable font sizes); call once."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9)
    plt.rcParams.update(
        {"figure.dpi": 100, "savefig.bbox": "tight", "axes.titlesize": 10, "image.interpolation": "nearest"}
    )


# ----------------------------------------------------------------------------------------------- saving
def figure_dir() -> Path:
    """``<run folder>/figures/<notebook stem>``: the stem is ``$NBSUPPORT_NOTEBOOK`` (set by the runner),
    else that of ``$JPY_SESSION_NAME`` (the notebook JupyterLab runs), else ``interactive``, which is not
    repeated inside the interactive run folder; the run folder is :func:`nbsupport.core.paths.run_dir`.
    Created if missing."""
    stem = os.environ.get("NBSUPPORT_NOTEBOOK") or Path(os.environ.get("JPY_SESSION_NAME") or "").stem
    run = paths.run_dir()
    stem = stem or ("" if run.name == "interactive" else "interactive")
    d = run / "figures" / stem if stem else run / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _safe(name: str) -> str:
    """A file-name-safe version of ``name``: runs of anything but letters, digits, ``.``, ``_``, ``-``
    become ``_``; leading/trailing ``._`` are dropped."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._")
    if not s:
        raise ValueError(f"figure name {name!r} has no usable characters (letters, digits, . _ -)")
    return s


def save_figure(fig, name: str, dpi: int = 150) -> dict[str, Path]:
    """Write ``fig`` as ``<name>.png`` (``dpi``) and ``<name>.pdf`` (vector) into :func:`figure_dir`;
    ``name`` is sanitised (``"Fig 8: keys"`` -> ``Fig_8_keys``). Returns ``{"png": Path, "pdf": Path}``.

    ``$NBSUPPORT_FIGURE_NOTE`` (set by the runner's ``fixture`` profile: "random weights, fixture data") is
    written in the figure's lower left corner, so that no such figure can pass for a result."""
    stem = _safe(re.sub(r"\.(png|pdf)$", "", str(name), flags=re.I))
    note = os.environ.get("NBSUPPORT_FIGURE_NOTE")
    if note and not any(getattr(t, "_nbs_note", False) for t in fig.texts):
        t = fig.text(0.0, 0.0, note, ha="left", va="bottom", fontsize=8, color="crimson")
        t._nbs_note = True
    d = figure_dir()
    out = {"png": d / f"{stem}.png", "pdf": d / f"{stem}.pdf"}
    fig.savefig(out["png"], dpi=dpi, bbox_inches="tight")
    fig.savefig(out["pdf"], bbox_inches="tight")
    return out


# ----------------------------------------------------------------------------------------------- images
def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def to_rgb(img) -> np.ndarray:
    """Any supported image -> float32 RGB ``[H, W, 3]`` in [0, 1].

    PIL (any mode) / uint8 ``[H, W, 3|4]`` / float ``[H, W, 3]`` in [0, 1] (clipped) / grey ``[H, W]`` /
    ImageNet-normalised float tensor ``[3, H, W]`` (de-normalised with the ImageNet mean and std)."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    if torch.is_tensor(img) and img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        if img.dtype == torch.uint8:
            return img.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
        from nbsupport.data.images import denormalize

        return denormalize(img).astype(np.float32)
    arr = _numpy(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image of shape {tuple(arr.shape)}: expected [H, W, 3], [H, W] or a tensor [3, H, W]")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _bare(ax, title: str | None = None, im=None, colorbar: bool = False):
    """No ticks or grid; optional title and colour bar for ``im``."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if colorbar and im is not None:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)


def show_image(ax, img, title: str | None = None):
    """Draw an image (see :func:`to_rgb`) without ticks; returns ``ax``."""
    ax.imshow(to_rgb(img))
    _bare(ax, title)
    return ax


def _resize_mask(m: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (e.g. a patch-grid mask ``[h, w]``) to ``shape``."""
    if m.shape == tuple(shape):
        return m
    t = torch.from_numpy(m[None, None].astype(np.float32))
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5


def _mask_colors(color, n: int) -> list:
    if color is None:
        return [PALETTE[k % len(PALETTE)] for k in range(n)]
    if isinstance(color, str) or (
        np.ndim(color) == 1 and len(color) in (3, 4) and all(isinstance(c, (int, float, np.number)) for c in color)
    ):
        return [_color_rgb(color)] * n  # one colour for every mask
    colors = list(color)
    if len(colors) < n:
        raise ValueError(f"{len(colors)} colours for {n} masks")
    return [_color_rgb(c) for c in colors[:n]]


def overlay_mask(ax, img, mask, color=None, alpha: float = 0.5, title: str | None = None):
    """Image with a bool mask ``[H, W]`` or instance masks ``[N, H, W]`` blended on top (``alpha``).

    Instance masks get distinct tab10 colours unless ``color`` (one colour, or one per mask) is given;
    masks of another size (a patch-grid mask ``[h, w]``) are nearest-upsampled to the image."""
    rgb = to_rgb(img).copy()
    masks = _numpy(mask).astype(bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"mask of shape {masks.shape}: expected [H, W] or [N, H, W]")
    for m, c in zip(masks, _mask_colors(color, len(masks))):
        m = _resize_mask(m, rgb.shape[:2])
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(c[:3], dtype=np.float32)
    return show_image(ax, rgb, title)


def heatmap(
    ax,
    values,
    img=None,
    cmap: str = "viridis",
    vmin=None,
    vmax=None,
    colorbar: bool = True,
    alpha: float = 0.6,
    title: str | None = None,
):
    """A patch map ``values[h, w]``; with ``img`` it is stretched (nearest, i.e. each patch a block) over the
    image's full extent ``(0, W, H, 0)`` and blended with ``alpha``. Returns the map's ``AxesImage``."""
    v = _numpy(values).astype(float)
    if v.ndim != 2:
        raise ValueError(f"heatmap values of shape {v.shape}: expected [h, w]")
    if img is not None:
        rgb = to_rgb(img)
        H, W = rgb.shape[:2]
        ax.imshow(rgb, extent=(0, W, H, 0))
        im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, extent=(0, W, H, 0), interpolation="nearest")
    else:
        im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    _bare(ax, title, im, colorbar)
    return im


# ----------------------------------------------------------------------------------------------- statistics
def hist_pair(ax, a, b, labels=("same", "different"), bins: int = 50, density: bool = True, title: str | None = None):
    """Two overlaid histograms on shared bins, each mean marked by a dashed line and given in the legend
    (non-finite values are dropped). Returns ``ax``."""
    a, b = _numpy(a).astype(float).ravel(), _numpy(b).astype(float).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    both = np.concatenate([a, b])
    lo, hi = (both.min(), both.max()) if both.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, bins + 1)
    for x, lab, c in ((a, labels[0], PALETTE[0]), (b, labels[1], PALETTE[3])):
        if x.size:
            ax.hist(x, bins=edges, density=density, alpha=0.55, color=c, label=f"{lab} (mean {x.mean():.3f})")
            ax.axvline(x.mean(), color=c, ls="--", lw=1)
    if a.size or b.size:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def affinity_matrix(
    ax, A, vmin: float = -1, vmax: float = 1, cmap: str = "RdBu_r", title: str | None = None, colorbar: bool = True
):
    """A patch-by-patch affinity matrix ``A[n, n]`` (thesis Fig 26: blue dissimilar, red similar)."""
    im = ax.imshow(_numpy(A), vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    _bare(ax, title, im, colorbar)
    return im


# ----------------------------------------------------------------------------------------------- points
def points(ax, yx, colors=None, s: float = 30, marker: str = "o"):
    """Scatter pixel points ``yx[K, 2]`` given as (y, x); distinct tab10 colours unless ``colors``."""
    yx = _numpy(yx).astype(float).reshape(-1, 2)
    colors = colors if colors is not None else [PALETTE[k % len(PALETTE)] for k in range(len(yx))]
    return ax.scatter(yx[:, 1], yx[:, 0], c=colors, s=s, marker=marker, edgecolors="white", linewidths=0.8)


def match_lines(ax_a, ax_b, yx_a, yx_b, colors=None, lw: float = 0.8) -> list:
    """Lines joining point k of ``ax_a`` to point k of ``ax_b`` (correspondences across two axes of one
    figure); returns the ``ConnectionPatch`` artists."""
    from matplotlib.patches import ConnectionPatch

    yx_a, yx_b = _numpy(yx_a).astype(float).reshape(-1, 2), _numpy(yx_b).astype(float).reshape(-1, 2)
    if len(yx_a) != len(yx_b):
        raise ValueError(f"match_lines: {len(yx_a)} points in ax_a but {len(yx_b)} in ax_b")
    out = []
    for k, (pa, pb) in enumerate(zip(yx_a, yx_b)):
        c = colors[k] if colors is not None else PALETTE[k % len(PALETTE)]
        con = ConnectionPatch(
            xyA=(pa[1], pa[0]), coordsA=ax_a.transData, xyB=(pb[1], pb[0]), coordsB=ax_b.transData, color=c, lw=lw
        )
        ax_b.figure.add_artist(con)
        out.append(con)
    return out


# ----------------------------------------------------------------------------------------------- layout
def grid(n: int, ncols: int = 4, size: float = 3.0):
    """A figure with ``n`` axes in rows of ``ncols`` (``size`` inches each); returns ``(fig, axes)`` with
    ``axes`` a flat array of length ``n`` (unused grid cells hidden)."""
    if n < 1:
        raise ValueError(f"grid needs n >= 1 axes, got {n}")
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, layout="constrained")
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def table(df, ax=None, precision: int = 3, title: str | None = None):
    """``df`` with floats rounded to ``precision`` (Jupyter shows it as a table); with ``ax`` it is also
    drawn there as a matplotlib table (so it can go into a saved figure). Returns the rounded frame."""
    import pandas as pd

    df = pd.DataFrame(df).round(precision)
    if ax is not None:
        ax.axis("off")
        cells = [
            [f"{v:.{precision}f}" if isinstance(v, float) else str(v) for v in row]
            for row in df.itertuples(index=False)
        ]
        tab = ax.table(cellText=cells, colLabels=[str(c) for c in df.columns], loc="center", cellLoc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(8)
        if title:
            ax.set_title(title)
    return df
