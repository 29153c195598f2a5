"""Ground truth on a patch grid: the one rule every analysis uses to give each patch a label.

A patch takes the label covering the majority (``min_fraction``, default 0.5) of its pixels; otherwise,
or when that label is the ignore value 255, it has none (-1).
"""

from __future__ import annotations

import numpy as np

from nbsupport.analysis.affinity import _np

# ----------------------------------------------------------------------------------------------------
# Ground truth on the patch grid


def _cells(shape_hw, grid_hw) -> tuple[np.ndarray, int, int]:
    """Cell index ``[H, W]`` of every pixel on an ``(h, w)`` grid of (near-)equal cells."""
    H, W = shape_hw
    h, w = (int(v) for v in grid_hw)
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"grid_hw must be (h, w) with 1 <= h <= {H} and 1 <= w <= {W}, got {tuple(grid_hw)}")
    ys = np.arange(H) * h // H
    xs = np.arange(W) * w // W
    return ys[:, None] * w + xs[None, :], h, w


def labels_on_grid(labels, grid_hw, ignore: int | None = 255, min_fraction: float = 0.5) -> np.ndarray:
    """Majority label per patch: a label map ``[H, W]`` on a ``(h, w)`` grid of equal cells (pixel row
    ``y`` falls in cell row ``y * h // H``) -> int64 ``[h, w]``. A cell is -1 when its most frequent
    label covers less than ``min_fraction`` of the cell's pixels (``ignore`` pixels count in the cell) or
    when that label is ``ignore``; ties go to the smallest label. ``ignore=None``: no ignore label."""
    lab = _np(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a [H, W] label map, got shape {lab.shape}")
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    cell, h, w = _cells(lab.shape, grid_hw)
    vals, inv = np.unique(lab, return_inverse=True)
    counts = np.bincount(cell.ravel() * len(vals) + inv.ravel(), minlength=h * w * len(vals)).reshape(h * w, len(vals))
    best = counts.argmax(1)
    frac = counts[np.arange(h * w), best] / counts.sum(1)
    out = vals[best].astype(np.int64)
    bad = frac < min_fraction
    if ignore is not None:
        bad |= vals[best] == ignore
    out[bad] = -1
    return out.reshape(h, w)


def instance_on_grid(instances, grid_hw, min_fraction: float = 0.5) -> np.ndarray:
    """Majority instance id per patch -> int64 ``[h, w]`` (0 = background, -1 = no id covers
    ``min_fraction`` of the cell). ``instances``: an id map ``[H, W]`` (0 = background) or bool masks
    ``[N, H, W]`` (mask ``k`` gets id ``k + 1``; where masks overlap the later one wins)."""
    inst = _np(instances)
    if inst.ndim == 3:
        ids = np.zeros(inst.shape[1:], np.int64)
        for k, m in enumerate(inst.astype(bool), 1):
            ids[m] = k
        inst = ids
    return labels_on_grid(inst, grid_hw, ignore=None, min_fraction=min_fraction)


def masks_on_grid(masks, grid_hw, min_fraction: float = 0.5) -> np.ndarray:
    """Bool masks ``[K, H, W]`` -> bool ``[K, h, w]``: a patch belongs to mask ``k`` when the mask covers at
    least ``min_fraction`` of its pixels (overlapping objects stay separate, unlike an id map)."""
    m = _np(masks).astype(bool)
    if m.ndim != 3:
        raise ValueError(f"masks must be [K, H, W], got shape {m.shape}")
    cell, h, w = _cells(m.shape[1:], grid_hw)
    area = np.bincount(cell.ravel(), minlength=h * w)
    cov = (
        np.stack([np.bincount(cell.ravel(), weights=mk.ravel(), minlength=h * w) for mk in m])
        if len(m)
        else np.zeros((0, h * w))
    )
    return (cov / area >= min_fraction).reshape(len(m), h, w) & (cov > 0).reshape(len(m), h, w)
