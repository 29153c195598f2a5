"""Plotting helpers that draw on a given ``ax``, and ``save_figure`` (PNG + PDF into the run folder).

Notebooks compose these; none of them calls ``plt.show``, so headless runs never block.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "MPLBACKEND" not in os.environ and "ipykernel" not in str(matplotlib.get_backend()):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import paths  # noqa: E402

PALETTE = plt.get_cmap("tab10").colors


def setup_style() -> None:
    """One consistent look for every notebook (seaborn whitegrid, readable font sizes)."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "axes.titlesize": 10})


def figure_dir() -> Path:
    """``<run folder>/figures/<notebook stem>`` (``$NBSUPPORT_NOTEBOOK``, else ``interactive``)."""
    d = paths.run_dir() / "figures" / os.environ.get("NBSUPPORT_NOTEBOOK", "interactive")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    if not s:
        raise ValueError(f"figure name {name!r} has no usable characters")
    return s


def save_figure(fig, name: str, dpi: int = 150) -> dict[str, Path]:
    """Write ``fig`` as ``<name>.png`` and ``<name>.pdf`` into :func:`figure_dir`; returns the paths."""
    d = figure_dir()
    out = {"png": d / f"{_safe(name)}.png", "pdf": d / f"{_safe(name)}.pdf"}
    fig.savefig(out["png"], dpi=dpi, bbox_inches="tight")
    fig.savefig(out["pdf"], bbox_inches="tight")
    return out


def to_rgb(img) -> np.ndarray:
    """PIL / uint8 ``[H, W, 3]`` / float ``[H, W, 3]`` / ImageNet-normalised tensor ``[3, H, W]`` -> float RGB."""
    if torch.is_tensor(img):
        from .data import denormalize

        return denormalize(img)
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0, 1)


def grid(n: int, ncols: int = 4, size: float = 3.0):
    """A figure with ``n`` axes in rows of ``ncols``; returns ``(fig, axes)`` (flat, extra axes hidden)."""
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, layout="constrained")
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def _bare(ax, title: str | None = None, im=None, colorbar: bool = False):
    """No ticks or grid; optional title and colour bar for ``im``."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if colorbar and im is not None:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def show_image(ax, img, title: str | None = None):
    ax.imshow(to_rgb(img))
    _bare(ax, title)
    return ax


def overlay_mask(ax, img, mask, color=None, alpha: float = 0.5, title: str | None = None):
    """Image with a bool mask ``[H, W]`` or instance masks ``[N, H, W]`` (distinct colours) on top."""
    rgb = to_rgb(img).copy()
    masks = np.asarray(mask, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    for k, m in enumerate(masks):
        if m.shape != rgb.shape[:2]:
            m = np.asarray(torch.nn.functional.interpolate(
                torch.from_numpy(m[None, None].astype(np.float32)), size=rgb.shape[:2], mode="nearest")[0, 0]) > 0.5
        c = np.asarray(color if color is not None else PALETTE[k % len(PALETTE)])
        rgb[m] = (1 - alpha) * rgb[m] + alpha * c
    return show_image(ax, rgb, title)


def heatmap(ax, values, img=None, cmap: str = "viridis", vmin=None, vmax=None, colorbar: bool = True,
            alpha: float = 0.6, title: str | None = None):
    """A patch map ``[h, w]``; over ``img`` (stretched to the image extent) when given."""
    v = _numpy(values)
    if img is not None:
        rgb = to_rgb(img)
        H, W = rgb.shape[:2]
        ax.imshow(rgb, extent=(0, W, H, 0))
        im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, extent=(0, W, H, 0), interpolation="nearest")
    else:
        im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    _bare(ax, title, im, colorbar)
    return im


def hist_pair(ax, a, b, labels=("same", "different"), bins: int = 50, density: bool = True, title: str | None = None):
    """Two overlaid histograms with their means marked."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    both = np.concatenate([a, b]) if a.size + b.size else np.zeros(1)
    edges = np.linspace(both.min(), both.max() + 1e-12, bins + 1)
    for x, lab, c in ((a, labels[0], PALETTE[0]), (b, labels[1], PALETTE[3])):
        if x.size:
            ax.hist(x, bins=edges, density=density, alpha=0.55, color=c, label=f"{lab} (mean {x.mean():.3f})")
            ax.axvline(x.mean(), color=c, ls="--", lw=1)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def affinity_matrix(ax, A, vmin: float = -1, vmax: float = 1, cmap: str = "RdBu_r", title: str | None = None,
                    colorbar: bool = True):
    """A patch-by-patch affinity matrix (thesis Fig 26: blue dissimilar, red similar)."""
    im = ax.imshow(_numpy(A), vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    _bare(ax, title, im, colorbar)
    return im


def points(ax, yx, colors=None, s: float = 30, marker: str = "o"):
    """Scatter pixel points given as ``[K, 2]`` (y, x)."""
    yx = np.asarray(yx, float).reshape(-1, 2)
    colors = colors if colors is not None else [PALETTE[k % len(PALETTE)] for k in range(len(yx))]
    return ax.scatter(yx[:, 1], yx[:, 0], c=colors, s=s, marker=marker, edgecolors="white", linewidths=0.8)


def match_lines(ax_a, ax_b, yx_a, yx_b, colors=None, lw: float = 0.8):
    """Lines joining point k of ``ax_a`` to point k of ``ax_b`` (correspondences across two axes)."""
    from matplotlib.patches import ConnectionPatch

    yx_a, yx_b = np.asarray(yx_a, float).reshape(-1, 2), np.asarray(yx_b, float).reshape(-1, 2)
    for k, (pa, pb) in enumerate(zip(yx_a, yx_b)):
        c = colors[k] if colors is not None else PALETTE[k % len(PALETTE)]
        con = ConnectionPatch(xyA=(pa[1], pa[0]), coordsA=ax_a.transData, xyB=(pb[1], pb[0]),
                              coordsB=ax_b.transData, color=c, lw=lw)
        ax_b.figure.add_artist(con)
