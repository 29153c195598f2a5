"""MMC protocol (a): zero-shot segmentation from one prompting patch, ``cos(prompt, patch) > t``.

A patch inside an object is the prompt; every patch whose cosine similarity to it exceeds ``t`` is the
predicted object, scored by IoU against the object and averaged over objects (mIoU), for each ``t`` of a
sweep; "opt" is the best single threshold (MMC Table 1). Two scorings:

* on the **patch grid** (:func:`threshold_sweep_miou`): object masks brought onto the grid by the
  majority rule, the prompt the patch deepest inside that mask (notebook 01's thesis setting);
* on the **pixels** of the image (:func:`pixel_threshold_sweep`, MMC's setting as this study reads it):
  the similarity map is upsampled to the image (:func:`upsample_map`) and thresholded there, the prompt is
  the patch holding the object's most interior pixel (:func:`pixel_prompt_point`), ignored pixels (COCO
  crowd, VOC void) count for neither side.

MMC does not state its prompt rule, layer or mIoU aggregation; the rules here are ours and say so.
:data:`MMC_TABLE1` holds the published numbers this study is compared with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis.affinity import _cos_rows, _grid, _np, _t
from nbsupport.analysis.metrics import mask_iou

#: MMC Table 1 (zero-shot segmentation from a prompting patch on COCO, ViT-B/16, 480 x 480 input): mIoU in
#: percent per threshold and at the best one ("opt"), for DINO and for a random-init ViT (the floor).
MMC_TABLE1 = {
    "DINO ViT-B/16": {0.1: 33.3, 0.2: 35.1, 0.3: 33.0, 0.4: 28.2, "opt": 35.1},
    "random init ViT-B/16": {0.1: 16.8, 0.2: 16.6, 0.3: 16.2, 0.4: 15.5, "opt": 16.8},
}

#: MMC's setting of that table, in the words of :func:`~nbsupport.analysis.affinity_protocols.sweep_setting`.
MMC_SETTING = {
    "backbone": "DINO ViT-B/16",
    "input": "480 x 480",
    "token grid": "30 x 30",
    "features": "tokens after the final LayerNorm, last block",
    "IoU": "pixels (similarity upsampled to the image)",
    "data": "coco val2017",
    "prompt patch": "not stated",
    "mIoU": "not stated",
}


# ----------------------------------------------------------------------------------------------------
# On the patch grid


def similarity_map(feats, query) -> torch.Tensor:
    """Cosine similarity ``[h, w]`` of every patch of ``feats [h, w, D]`` to a query: a patch index
    ``(y, x)`` (tuple or list of two ints) or a vector ``[D]`` (tensor or array)."""
    f = _grid(feats)
    h, w, D = f.shape
    if isinstance(query, (tuple, list)) and len(query) == 2 and all(np.ndim(v) == 0 for v in query):
        y, x = int(query[0]), int(query[1])
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"query patch {(y, x)} is outside the {h}x{w} grid")
        q = f[y, x]
    else:
        q = _t(query).to(f.device)
        if q.shape != (D,):
            raise ValueError(f"query must be a (y, x) patch or a [{D}] vector, got shape {tuple(q.shape)}")
    return _cos_rows(f, q.expand_as(f))


def prompt_patch_segment(feats, yx, t: float) -> torch.Tensor:
    """MMC zero-shot segmentation from one prompting patch: bool ``[h, w]``, ``cos(f[y, x], patch) > t``
    (strict; the prompt patch itself is always in the mask)."""
    return similarity_map(feats, tuple(int(v) for v in yx)) > t


def sample_prompt_points(mask, mode: str = "center", rng=0) -> tuple[int, int]:
    """The prompting patch ``(y, x)`` of a bool mask ``[h, w]`` on the patch grid.

    ``center``: the patch deepest inside the mask, i.e. the argmax of the Euclidean distance transform
    of the mask with everything outside the grid counted as background (ties: lowest row-major index);
    deterministic. ``random``: a uniformly drawn patch of the mask (``rng``: seed or Generator).
    ValueError on an empty mask. MMC does not state its prompt rule; ``center`` is ours."""
    from scipy import ndimage

    m = _np(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be [h, w], got shape {m.shape}")
    if not m.any():
        raise ValueError("cannot pick a prompt point in an empty mask")
    if mode == "center":
        d = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(d)), m.shape)
    elif mode == "random":
        ys, xs = np.nonzero(m)
        k = np.random.default_rng(rng).integers(len(ys))
        y, x = ys[k], xs[k]
    else:
        raise ValueError(f"mode must be 'center' or 'random', got {mode!r}")
    return int(y), int(x)


def threshold_sweep_miou(feats_list, masks_list, ts=(0.1, 0.2, 0.3, 0.4), mode: str = "center", rng=0):
    """MMC Table 1 protocol (prompt-patch zero-shot segmentation with a threshold sweep).

    ``feats_list``: per image a grid ``[h, w, D]`` (or a ``[B, h, w, D]`` batch); ``masks_list``: per image
    bool ``[K, h, w]``, one mask per ground-truth object (or class region) on the same patch grid (see
    :func:`~nbsupport.analysis.grid_truth.masks_on_grid`): the patch-level IoU of the thesis setting;
    :func:`pixel_threshold_sweep` scores on the image's pixels instead. For each non-empty mask: the prompt patch is picked by
    :func:`sample_prompt_points` (``mode="center"``: the patch deepest inside the mask — MMC omits its
    rule, this is ours; ``"random"``: one seeded generator for the whole sweep), the mask ``cos > t`` is
    computed for each ``t`` and scored by IoU against the object mask.

    Returns a DataFrame with one row per object (columns image, object, y, x and one column per ``t``);
    ``df.attrs["thresholds"]`` holds ``ts``. :func:`sweep_summary` turns it into ``{t: mIoU, "opt": best}``
    where mIoU is the mean over all objects and "opt" the mIoU of the best single threshold, as in MMC."""
    import pandas as pd

    ts = list(ts)
    g = np.random.default_rng(rng)
    feats_list, masks_list = list(feats_list), list(masks_list)
    if len(feats_list) != len(masks_list):
        raise ValueError(f"got {len(feats_list)} feature grids but {len(masks_list)} mask stacks")
    rows = []
    for b, (f, masks) in enumerate(zip(feats_list, masks_list)):
        f = _grid(f)
        masks = _np(masks).astype(bool)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape[1:] != tuple(f.shape[:2]):
            raise ValueError(
                f"image {b}: masks {masks.shape} are not [K, h, w] on the {tuple(f.shape[:2])} feature grid"
            )
        for k, m in enumerate(masks):
            if not m.any():
                continue
            y, x = sample_prompt_points(m, mode, g)
            sim = similarity_map(f, (y, x)).cpu().numpy()
            rows.append({"image": b, "object": k, "y": y, "x": x, **{t: mask_iou(sim > t, m) for t in ts}})
    df = pd.DataFrame(rows, columns=["image", "object", "y", "x", *ts])
    df.attrs["thresholds"] = ts
    return df


def sweep_summary(df, ts=None) -> dict:
    """``{t: mIoU over objects}`` plus ``"opt"`` (the best threshold's mIoU) from
    :func:`threshold_sweep_miou`'s table."""
    if ts is None:
        ts = df.attrs.get("thresholds") or [c for c in df.columns if c not in ("image", "object", "y", "x")]
    out = {t: float(df[t].mean()) if len(df) else float("nan") for t in ts}
    vals = [v for v in out.values() if not np.isnan(v)]
    out["opt"] = max(vals) if vals else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------
# On the pixels of the image


def upsample_map(sim, out_hw, coverage=(1.0, 1.0), mode: str = "bilinear") -> torch.Tensor:
    """A patch map ``[h, w]`` on the pixels ``out_hw = (H, W)`` of the image it came from -> float ``[H, W]``.

    The grid covers the top-left ``coverage = (fy, fx)`` of the image (1 when the model input is a whole
    number of patches; else ``h * patch / input height`` and so on): that part is resized to
    ``round(H * fy) x round(W * fx)`` pixels, and the pixels the model never saw take the value of the
    nearest covered pixel. ``mode``: ``"bilinear"`` (patch values at the patch centres, ``align_corners``
    False) or ``"nearest"`` (every pixel takes the value of the patch it lies in)."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    s = _t(sim)
    if s.dim() != 2:
        raise ValueError(f"sim must be a patch map [h, w], got shape {tuple(s.shape)}")
    H, W = (int(v) for v in out_hw)
    fy, fx = (float(v) for v in coverage)
    if not (0 < fy <= 1 and 0 < fx <= 1):
        raise ValueError(f"coverage must be two fractions in (0, 1], got {coverage}")
    hc, wc = max(1, min(H, round(H * fy))), max(1, min(W, round(W * fx)))
    kw = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(s[None, None], size=(hc, wc), mode=mode, **kw)
    if (hc, wc) != (H, W):
        up = F.pad(up, (0, W - wc, 0, H - hc), mode="replicate")
    return up[0, 0]


def pixel_prompt_point(mask, grid_hw, input_hw=None, patch=None) -> tuple[int, int]:
    """The prompting patch ``(y, x)`` of an object given on the image's pixels.

    ``mask``: bool ``[H, W]`` in the image's own frame. Its most interior pixel (the argmax of the Euclidean
    distance transform, everything outside the image counted as background; ties: lowest row-major index)
    is mapped into the model input ``input_hw`` (default: the mask's size; the image is resized to it,
    aspect ignored) and the patch holding it is returned, clipped to ``grid_hw``. ``patch``: the patch side
    in input pixels, an int or ``(ph, pw)`` (default ``input // grid``). Works for objects too small to own a patch by the
    majority rule. ValueError on an empty mask."""
    from scipy import ndimage

    m = _np(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {m.shape}")
    if not m.any():
        raise ValueError("cannot pick a prompt point in an empty mask")
    h, w = (int(v) for v in grid_hw)
    ih, iw = (int(v) for v in (input_hw if input_hw is not None else m.shape))
    if patch is None:
        ph, pw = ih // h, iw // w
    else:
        ph, pw = (int(patch), int(patch)) if np.ndim(patch) == 0 else (int(patch[0]), int(patch[1]))
    d = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), m.shape)
    yi, xi = (y + 0.5) * ih / m.shape[0], (x + 0.5) * iw / m.shape[1]  # pixel centre in the input frame
    return int(min(h - 1, yi // ph)), int(min(w - 1, xi // pw))


def pixel_threshold_sweep(
    feats_list,
    masks_list,
    ts=(0.1, 0.2, 0.3, 0.4),
    input_hw=None,
    patch: int | None = None,
    valid_list=None,
    mode: str = "bilinear",
):
    """The prompt-patch threshold sweep scored on pixels: the masks are upsampled to the image.

    ``feats_list``: per image a grid ``[h, w, D]``; ``masks_list``: per image bool ``[K, H, W]``, its objects
    at the image's own resolution (every image its own size); ``input_hw``: the model input the image was
    resized to (default: the image's size); ``patch``: the patch side in input pixels (default
    ``input // grid``); ``valid_list``: per image bool ``[H, W]``, the pixels that are judged (None: all;
    COCO crowd and VOC void are not). For every object with a valid pixel: the prompt patch
    (:func:`pixel_prompt_point`), its similarity map upsampled to ``[H, W]`` (:func:`upsample_map`,
    ``mode``), thresholded at each ``t`` and scored by IoU against the object on the valid pixels.

    Returns :func:`threshold_sweep_miou`'s table (image, object, y, x, one IoU column per ``t``), ready for
    :func:`sweep_summary`."""
    import pandas as pd

    ts = list(ts)
    feats_list, masks_list = list(feats_list), list(masks_list)
    valid_list = [None] * len(masks_list) if valid_list is None else list(valid_list)
    if not (len(feats_list) == len(masks_list) == len(valid_list)):
        raise ValueError(
            f"got {len(feats_list)} feature grids, {len(masks_list)} mask stacks, {len(valid_list)} valid masks"
        )
    rows = []
    for b, (f, masks, valid) in enumerate(zip(feats_list, masks_list, valid_list)):
        f = _grid(f)
        masks = torch.as_tensor(_np(masks).astype(bool))
        if masks.dim() == 2:
            masks = masks[None]
        if masks.dim() != 3:
            raise ValueError(f"image {b}: masks must be [K, H, W], got shape {tuple(masks.shape)}")
        H, W = masks.shape[1:]
        ok = torch.ones(H, W, dtype=torch.bool) if valid is None else torch.as_tensor(_np(valid).astype(bool))
        if ok.shape != (H, W):
            raise ValueError(f"image {b}: valid mask {tuple(ok.shape)} differs from the masks' {(H, W)}")
        in_hw = (H, W) if input_hw is None else tuple(int(v) for v in input_hw)
        h, w = f.shape[:2]
        ph, pw = (int(patch), int(patch)) if patch is not None else (in_hw[0] // h, in_hw[1] // w)
        coverage = (min(1.0, h * ph / in_hw[0]), min(1.0, w * pw / in_hw[1]))
        masks, ok = masks.to(f.device), ok.to(f.device)
        fn = F.normalize(f, dim=-1, eps=1e-12)  # once per image: every prompt's map is one product
        for k, m in enumerate(masks):
            m = m & ok
            if not m.any():
                continue
            y, x = pixel_prompt_point(m.cpu().numpy(), (h, w), in_hw, (ph, pw))
            up = upsample_map((fn * fn[y, x]).sum(-1), (H, W), coverage, mode)  # similarity_map(f, (y, x))
            ious = {}
            for t in ts:
                pred = (up > t) & ok
                ious[t] = float((pred & m).sum() / (pred | m).sum())  # m is not empty
            rows.append({"image": b, "object": k, "y": y, "x": x, **ious})
    df = pd.DataFrame(rows, columns=["image", "object", "y", "x", *ts])
    df.attrs["thresholds"] = ts
    return df
