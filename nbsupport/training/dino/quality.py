"""How much a backbone has learned, measured on the synthetic world: class separability of patch keys,
MaskCut AP, best-buddy precision, with a ground-truth ceiling and a hand-made texture reference.
"""

from __future__ import annotations

import numpy as np
import torch

from nbsupport.analysis import grid_truth
from nbsupport.data.scenes import synthetic_coco


def _maskcut_ap(coco, feats: torch.Tensor, size: int, tau) -> dict:
    """Class-agnostic COCO mask AP of 3 MaskCut masks per image from patch features ``[B, h, w, D]`` (one
    per ``coco.image_ids``, in order) against ``coco``'s ground truth, images ``size x size``."""
    from nbsupport.maskcut import pipeline

    masks = pipeline.masks_from_features(feats, [(size, size)] * len(feats), (size, size), 3, tau)
    r = pipeline.score(coco, dict(zip(coco.image_ids, masks)))
    return {"AP": r["mask AP"], "AP50": r["mask AP50"]}


def _class_separability(coco, feats: torch.Tensor, seed: int) -> dict:
    """Same- vs different-class cosine similarity of object patches (``feats [B, h, w, D]``, one grid per
    ``coco.image_ids``): ROC AUC and distribution overlap, 20000 seeded pairs of each kind."""
    from nbsupport.analysis import affinity

    sem = np.stack([grid_truth.labels_on_grid(coco.semantic_mask(i), feats.shape[1:3]) for i in coco.image_ids])
    sep = affinity.separability(*affinity.patch_pairs(feats, sem, "cosine", 20000, seed))
    return {"patch AUC": sep["auc"], "overlap": sep["overlap"]}


def backbone_quality(model, size: int = 128, n_images: int = 200, tau="median", seed: int = 0) -> dict:
    """How much a backbone has learned, on ``n_images`` synthetic validation scenes (``seed``) at ``size`` px
    (three measures): ``patch AUC`` / ``overlap`` of same- vs different-class last-block key
    cosine similarities (objects only); class-agnostic MaskCut (3 masks, ``tau``) ``mask AP`` / ``mask AP50``
    against the ground truth; ``BB precision``: the fraction of salient best-buddy pairs (last-block keys,
    CLS saliency > 0.05) between consecutive scenes sharing a class that land on the same class."""
    from nbsupport.analysis import correspondences as cc
    from nbsupport.data.images import image_to_tensor
    from nbsupport.models import features

    coco = synthetic_coco(n_images, seed, size, "val")
    ids = coco.image_ids
    imgs = torch.stack([image_to_tensor(coco.load(i), size) for i in ids])
    p = model.nbs_info["patch_size"]
    keys = torch.cat([features.extract(model, imgs[i : i + 16], "key", -1) for i in range(0, len(imgs), 16)])
    sep = _class_separability(coco, keys, seed)
    ap = _maskcut_ap(coco, keys, size, tau)
    # best buddies between consecutive scenes that share a class
    precs, desc = [], {}  # an image's descriptors serve both pairs it is in
    for a, b in zip(ids[:-1], ids[1:]):
        if not set(coco.category_ids(a)) & set(coco.category_ids(b)):
            continue
        for i in (a, b):
            if i not in desc:
                desc[i] = cc.descriptors(model, imgs[i - 1], -1, "key", False, p)
        res = cc.match(desc[a], desc[b], (size, size), (size, size), size, p, p, n_pairs=0, thresh=0.05)
        pa, pb = cc.all_salient_points(res, p, p, size, (size, size), (size, size))
        if len(pa):
            precs.append(cc.pair_precision(pa, pb, coco.semantic_mask(a), coco.semantic_mask(b)))
    return {
        **sep,
        "mask AP": ap["AP"],
        "mask AP50": ap["AP50"],
        "BB precision": float(np.mean(precs)) if precs else float("nan"),
    }


def maskcut_ceiling(
    size: int = 128, n_images: int = 200, tau="median", seed: int = 0, patch: int = 8, noise: float = 0.1
) -> dict:
    """MaskCut mask AP / AP50 on ground-truth features: one-hot semantic class per ``patch`` cell (background
    its own class) plus ``noise`` x N(0, 1), seeded. About the best any backbone's keys can give in
    :func:`backbone_quality` (the grid, not the features, limits it: ~24 AP50 at 64 px, ~67 at 128 px)."""
    from nbsupport.data.synthetic import CLASSES

    coco = synthetic_coco(n_images, seed, size, "val")
    g = size // patch
    sem = np.stack([grid_truth.labels_on_grid(coco.semantic_mask(i), (g, g), min_fraction=0.0) for i in coco.image_ids])
    feats = np.eye(len(CLASSES) + 1)[sem] + noise * np.random.default_rng(seed).standard_normal(
        sem.shape + (len(CLASSES) + 1,)
    )
    ap = _maskcut_ap(coco, torch.tensor(feats, dtype=torch.float32), size, tau)
    return {"mask AP": ap["AP"], "mask AP50": ap["AP50"]}


def fft_texture(grey: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """Hand-made colour- and phase-invariant texture descriptor ``[B, h, w, patch**2]`` of grey images
    ``[B, H, W]``: per ``patch`` x ``patch`` cell, the magnitudes of the 2-D FFT of its values after
    subtracting the cell's mean and dividing by its std."""
    cells = grey.unfold(1, patch, patch).unfold(2, patch, patch)  # [B, h, w, p, p]
    cells = cells - cells.mean((-1, -2), keepdim=True)
    cells = cells / (cells.std((-1, -2), keepdim=True) + 1e-3)
    return torch.fft.fft2(cells).abs().flatten(-2)


def texture_reference(size: int = 128, n_images: int = 200, seed: int = 0, patch: int = 8) -> dict:
    """The class AUC of :func:`backbone_quality` for :func:`fft_texture` of the scenes' grey levels. No
    learning: it shows how much class information a single cell holds on this world (about 0.67 on the
    200 seed-0 scenes at 128 px, where random keys give 0.5), i.e. that a +0.15 AUC target over random keys is
    reachable by a patch feature (``benchmarks/patch_probes.py`` adds a supervised twin)."""
    coco = synthetic_coco(n_images, seed, size, "val")
    grey = torch.stack(
        [torch.from_numpy(np.asarray(coco.load(i), dtype=np.float32).mean(-1) / 255) for i in coco.image_ids]
    )
    return _class_separability(coco, fft_texture(grey, patch), seed)
