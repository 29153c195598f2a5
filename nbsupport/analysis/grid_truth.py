"""Ground truth on a patch grid: the one rule every analysis uses to give each patch a label.

A patch takes the label covering the majority (``min_fraction``, default 0.5) of its pixels; otherwise,
or when that label is the ignore value 255, it has none (-1). The label maps of an image are first
resized (nearest) to the model input, exactly as the image is, so a patch is judged on the pixels it
sees: :func:`labels_to_grid` for one label map, :class:`GridTruth` for the semantic grid, the instance
grid and the class of each instance of a set of images (from COCO annotations or label maps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


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


# ----------------------------------------------------------------------------------------------------
# The ground truth of an image on a model's patch grid


def _hw(v, what: str) -> tuple[int, int]:
    hw = (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(x) for x in v)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"{what} must be a positive int or an (h, w) pair, got {v!r}")
    return hw


def resize_labels(labels, out_hw) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map ``[H, W]`` to ``out_hw`` -> int64 (PIL's
    ``NEAREST`` on a 32-bit integer image, the resize the notebooks always used): labels are never
    blended, the result holds only labels of the original."""
    lab = _np(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a [H, W] label map, got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels must be an integer label map, got dtype {lab.dtype}")
    h, w = _hw(out_hw, "out_hw")
    if (h, w) == lab.shape:
        return lab.astype(np.int64)
    if lab.size and (int(lab.min()) < -(2**31) or int(lab.max()) >= 2**31):
        raise ValueError(f"labels must fit in int32 to be resized, got values in [{lab.min()}, {lab.max()}]")
    return np.asarray(Image.fromarray(lab.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)


def labels_to_grid(
    labels, input_hw, grid_hw, patch=None, ignore: int | None = 255, min_fraction: float = 0.5
) -> np.ndarray:
    """The ground truth of one label map on a model's patch grid -> int64 ``[h, w]`` (-1 = no label).

    ``labels [H, W]`` in the image's own frame is resized (nearest, :func:`resize_labels`) to the model
    input ``input_hw`` as the image is; patch ``(y, x)`` covers input pixels ``[y*ph, (y+1)*ph) x
    [x*pw, (x+1)*pw)`` with ``(ph, pw) = patch`` (default ``input // grid``; pixels right of / below the
    grid are not seen by the model and dropped) and takes :func:`labels_on_grid`'s majority label."""
    ih, iw = _hw(input_hw, "input_hw")
    h, w = _hw(grid_hw, "grid_hw")
    ph, pw = _hw(patch, "patch") if patch is not None else (ih // h, iw // w)
    if h * ph > ih or w * pw > iw or ph < 1 or pw < 1:
        raise ValueError(f"a {h}x{w} grid of {ph}x{pw} patches does not fit the {ih}x{iw} input")
    lab = resize_labels(labels, (ih, iw))[: h * ph, : w * pw]
    return labels_on_grid(lab, (h, w), ignore=ignore, min_fraction=min_fraction)


def _instance_classes(instances: np.ndarray, semantic: np.ndarray, ignore: int | None) -> np.ndarray:
    """Class of each instance id of an id map (the most frequent semantic label under it, ``ignore``
    pixels skipped; ties to the smaller label); index 0 (background) is 0, unused ids -1."""
    n = int(instances.max(initial=0)) + 1
    out = np.full(n, -1, np.int64)
    out[0] = 0
    for k in range(1, n):
        lab = semantic[(instances == k) & ((semantic != ignore) if ignore is not None else True)]
        if lab.size:
            vals, counts = np.unique(lab, return_counts=True)
            out[k] = vals[np.argmax(counts)]
    return out


@dataclass
class GridTruth:
    """Ground truth of ``B`` images on one patch grid ``(h, w)`` (see the module docstring for the rule).

    ``semantic [B, h, w]`` int64: class per patch (0 = background, -1 = no majority or ignored);
    ``instances [B, h, w]`` int64: instance id per patch (0 = background, ``k`` = the image's ``k``-th
    object, -1 = no majority); ``instance_class``: per image int64 ``[K_b + 1]``, the class of each id
    (index 0 is background, 0)."""

    semantic: np.ndarray
    instances: np.ndarray
    instance_class: list

    def __len__(self) -> int:
        return len(self.semantic)

    @property
    def n_objects(self) -> int:
        """Objects over all images (ids 1..K_b of every image, whether or not a patch shows them)."""
        return sum(len(c) - 1 for c in self.instance_class)

    def object_masks(self, b: int) -> np.ndarray:
        """Bool ``[K_b, h, w]``: the patches of each object of image ``b`` (empty where none has a majority)."""
        k = len(self.instance_class[b]) - 1
        return self.instances[b][None] == np.arange(1, k + 1)[:, None, None]

    @classmethod
    def from_coco(cls, coco, ids, input_hw, grid_hw, patch=None, min_fraction: float = 0.5) -> "GridTruth":
        """From COCO instance annotations (a :class:`~nbsupport.data.CocoInstances`: the synthetic world, COCO,
        VOC's objects) of the images ``ids``: the id map of :func:`~nbsupport.data.instances.instance_map`
        (object ``k`` = the ``k``-th non-crowd annotation, the smaller object on top where two overlap) and its
        semantic map, both brought onto the grid by :func:`labels_to_grid`. Crowd regions and VOC's void band
        are ignored: a patch they dominate has no class and no instance (-1), like VOC's 255 in
        :meth:`from_label_maps`."""
        from nbsupport.data.instances import instance_map

        sem, inst, cls_of = [], [], []
        for i in ids:
            ids_map, classes = instance_map(coco, i)
            semantic = np.where(ids_map < 0, 255, classes[np.maximum(ids_map, 0)])
            sem.append(labels_to_grid(semantic, input_hw, grid_hw, patch, 255, min_fraction))
            inst.append(labels_to_grid(ids_map, input_hw, grid_hw, patch, -1, min_fraction))
            cls_of.append(classes)
        return cls(np.stack(sem), np.stack(inst), cls_of)

    @classmethod
    def from_label_maps(
        cls, semantic, input_hw, grid_hw, instances=None, patch=None, ignore: int | None = 255, min_fraction=0.5
    ) -> "GridTruth":
        """From label maps: per image a semantic map ``[H, W]`` (``ignore`` = unlabelled, e.g. VOC's 255)
        and optionally an instance id map ``[H, W]`` (0 = background, ``ignore`` pixels skipped; VOC's
        ``SegmentationObject``); an object's class is the most frequent semantic label under it. Without
        instance maps every patch's instance is -1 and no image has objects."""
        if instances is not None and len(instances) != len(semantic):
            raise ValueError(f"got {len(semantic)} semantic maps but {len(instances)} instance maps")
        sem, inst, cls_of = [], [], []
        for b, s in enumerate(semantic):
            s = _np(s)
            sem.append(labels_to_grid(s, input_hw, grid_hw, patch, ignore, min_fraction))
            if instances is None or instances[b] is None:
                inst.append(np.full_like(sem[-1], -1))
                cls_of.append(np.zeros(1, np.int64))
                continue
            ids_map = _np(instances[b]).astype(np.int64)
            if ids_map.shape != s.shape:
                raise ValueError(f"image {b}: instance map {ids_map.shape} and semantic map {s.shape} differ")
            if ignore is not None:
                ids_map = np.where(ids_map == ignore, -1, ids_map)
            inst.append(labels_to_grid(ids_map, input_hw, grid_hw, patch, -1, min_fraction))
            cls_of.append(_instance_classes(ids_map, s, ignore))
        return cls(np.stack(sem), np.stack(inst), cls_of)
