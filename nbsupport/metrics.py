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
