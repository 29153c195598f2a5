"""Confusion matrices, Hungarian matching of clusters to classes and the scores of a probe.

A cluster probe (STEGO, HP, Leopart, CrOC) predicts K cluster ids per pixel; its score needs a one-to-one
map from clusters to classes. Two criteria are in use and they give different numbers:

- ``"count"`` (STEGO / HP): maximise the number of pixels on the matched diagonal, Hungarian on the
  ``[classes, clusters]`` confusion counts;
- ``"iou"`` (Leopart / CrOC): maximise the sum of the matched IoUs, Hungarian on the IoU of every
  (class, cluster) pair.

Accuracy and mIoU always come from one dataset-wide confusion matrix (pixels labelled ``ignore`` never
count), as all four papers compute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

IGNORE = 255
CRITERIA = ("count", "iou")


def confusion(pred, target, n_pred: int, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """``[n_classes, n_pred]`` int64 counts, rows ground truth, columns prediction (cluster or class id).

    ``pred`` and ``target`` have the same shape (numpy or torch, any integer type); pixels whose target is
    ``ignore`` are skipped; other targets must lie in ``0..n_classes-1`` and predictions in ``0..n_pred-1``.
    Counts on the tensors' device (one ``bincount``), returned as numpy."""
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long().to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.numel()} pixels, target {t.numel()}")
    keep = t != ignore
    p, t = p[keep], t[keep]
    if t.numel():
        if int(t.min()) < 0 or int(t.max()) >= n_classes:
            raise ValueError(f"targets outside 0..{n_classes - 1} (and {ignore}): {int(t.min())}..{int(t.max())}")
        if int(p.min()) < 0 or int(p.max()) >= n_pred:
            raise ValueError(f"predictions outside 0..{n_pred - 1}: {int(p.min())}..{int(p.max())}")
    counts = torch.bincount(t * n_pred + p, minlength=n_classes * n_pred)
    return counts.reshape(n_classes, n_pred).cpu().numpy().astype(np.int64)


def pair_iou(conf: np.ndarray) -> np.ndarray:
    """IoU of every (class, cluster) pair of a ``[classes, clusters]`` confusion: ``n_gc / (n_g + n_c - n_gc)``
    (0 where both are empty)."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, conf / union, 0.0)


def hungarian_match(conf: np.ndarray, criterion: str = "count") -> np.ndarray:
    """The cluster matched to each class: ``match[g] = c`` (-1 for a class left without a cluster when
    there are fewer clusters than classes), by ``scipy.optimize.linear_sum_assignment`` maximising the
    matched pixel counts (``"count"``, STEGO/HP) or the matched IoUs (``"iou"``, Leopart/CrOC)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown matching criterion {criterion!r}: use one of {CRITERIA}")
    conf = np.asarray(conf)
    gain = conf.astype(np.float64) if criterion == "count" else pair_iou(conf)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    match = np.full(conf.shape[0], -1, dtype=np.int64)
    match[rows] = cols
    return match


def matched_confusion(conf: np.ndarray, match: np.ndarray) -> np.ndarray:
    """``[classes, classes]`` confusion after renaming each matched cluster to its class; pixels of
    clusters matched to no class become an extra last column (they count against accuracy and recall, not
    as any class's prediction)."""
    conf = np.asarray(conf)
    n_classes, n_clusters = conf.shape
    out = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    owner = np.full(n_clusters, n_classes, dtype=np.int64)
    for g, c in enumerate(match):
        if c >= 0:
            owner[c] = g
    np.add.at(out.T, owner, conf.T)
    return out


@dataclass(frozen=True)
class Scores:
    """Pixel accuracy and mIoU (both in %) of a ``[classes, classes(+1)]`` confusion, and the IoU per class
    (NaN for a class absent from both ground truth and prediction; mIoU is the mean over the others)."""

    accuracy: float
    miou: float
    iou: np.ndarray
    n_pixels: int


def scores(conf: np.ndarray) -> Scores:
    """:class:`Scores` of a confusion whose column ``g`` is the prediction of class ``g`` (an extra last
    column, from :func:`matched_confusion`, holds unmatched pixels)."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    tp = np.diag(conf[:, :n])
    total = conf.sum()
    union = conf.sum(1) + conf[:, :n].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    acc = float(tp.sum() / total * 100) if total else float("nan")
    miou = float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")
    return Scores(acc, miou, iou, int(total))


def match_and_score(conf: np.ndarray, criterion: str = "count") -> tuple[Scores, np.ndarray]:
    """Hungarian matching of a ``[classes, clusters]`` confusion by ``criterion``, then its scores:
    ``(scores, match)``."""
    match = hungarian_match(conf, criterion)
    return scores(matched_confusion(conf, match)), match
