"""Evaluation metrics shared by the notebooks.

``coco_ap``: class-agnostic COCO AP for pseudo-masks and detectors (CutLER evaluates this way: every
ground-truth instance becomes one "object" class), through pycocotools.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def class_agnostic(gt: dict) -> dict:
    """A copy of a COCO instances dict with every annotation in one category ``{"id": 1, "name": "fg"}``."""
    out = copy.deepcopy(gt)
    for a in out["annotations"]:
        a["category_id"] = 1
        a.setdefault("iscrowd", 0)
    out["categories"] = [{"id": 1, "name": "fg", "supercategory": "fg"}]
    return out


def coco_ap(gt, detections: list[dict], iou_type: str = "segm", max_dets: int = 100) -> dict:
    """Class-agnostic COCO metrics (AP, AP50, ..., AR100) of ``detections`` (COCO result dicts with
    ``image_id``, ``segmentation`` or ``bbox``, ``score``) against ground truth ``gt`` (path or dict).
    Values are percentages, as in the CutLER and thesis tables. Images without detections count as misses."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else gt
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    coco_gt = COCO()
    coco_gt.dataset = class_agnostic(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    if not detections:
        return {k: 0.0 for k in AP_NAMES}
    dets = [dict(d, category_id=1) for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(max(v, 0.0)) * 100 for k, v in zip(AP_NAMES, ev.stats)}


def _bool_array(m) -> np.ndarray:
    if hasattr(m, "detach"):  # a torch tensor, on any device
        m = m.detach().cpu().numpy()
    return np.asarray(m).astype(bool, copy=False)


def mask_iou(a, b) -> float:
    """Intersection over union of two masks of the same shape (bool, or anything nonzero = inside; numpy
    or torch). Two empty masks are identical, so their IoU is 1.0 (the union is empty, the masks agree
    everywhere); an empty mask against a non-empty one is 0.0. MaskCut's rejection rule and CRF check, the
    prompt-patch sweep and the label-map mIoU of :mod:`nbsupport.analysis.affinity` all use this one."""
    a, b = _bool_array(a), _bool_array(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def mask_recall(gt_masks: np.ndarray, pred_masks: np.ndarray, iou: float = 0.5) -> float:
    """Fraction of ground-truth masks ``[G, H, W]`` matched by some predicted mask ``[P, H, W]`` at IoU >= ``iou``."""
    if len(gt_masks) == 0:
        return float("nan")
    if len(pred_masks) == 0:
        return 0.0
    g = gt_masks.reshape(len(gt_masks), -1).astype(np.float64)
    p = pred_masks.reshape(len(pred_masks), -1).astype(np.float64)
    inter = g @ p.T
    union = g.sum(1)[:, None] + p.sum(1)[None, :] - inter
    return float(((inter / np.maximum(union, 1)) >= iou).any(1).mean())


def confusion_matrix(pred, gt, n_classes: int, ignore: int = 255) -> np.ndarray:
    """``[n_classes, n_classes]`` counts (rows: ground truth, columns: prediction); ``ignore`` pixels skipped."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    keep = gt != ignore
    pred, gt = pred[keep], gt[keep]
    if pred.size and (pred.max() >= n_classes or gt.max() >= n_classes or pred.min() < 0 or gt.min() < 0):
        raise ValueError(f"labels outside 0..{n_classes - 1}")
    return np.bincount(gt * n_classes + pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class from a confusion matrix; NaN for classes absent from both GT and prediction."""
    tp = np.diag(conf).astype(float)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def miou(conf: np.ndarray, include_background: bool = True) -> float:
    """Mean IoU over the classes that occur (class 0 = background, counted as in VOC when asked)."""
    ious = iou_per_class(conf)
    if not include_background:
        ious = ious[1:]
    return float(np.nanmean(ious)) * 100 if np.isfinite(ious).any() else float("nan")


def iou_disparity(conf_a: np.ndarray, conf_b: np.ndarray, names=None):
    """Per-class IoU of two models and their difference ``b - a`` (thesis Fig 21-22), sorted by the
    difference; a pandas DataFrame."""
    import pandas as pd

    a, b = iou_per_class(conf_a) * 100, iou_per_class(conf_b) * 100
    names = list(names) if names is not None else [str(i) for i in range(len(a))]
    df = pd.DataFrame({"class": names, "iou_a": a, "iou_b": b, "difference": b - a})
    return df.sort_values("difference", ascending=False, na_position="last").reset_index(drop=True)
