"""MaskCut masks as COCO annotations (RLE, class-agnostic category ``fg``) and the merge of shard outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nbsupport.core.io import atomic_write_json


def coco_annotations(
    masks: np.ndarray, image_id: int, start_id: int = 1, category_id: int = 1, scores=None
) -> list[dict]:
    """COCO annotations of non-empty pixel masks ``[n, H, W]``: RLE with ASCII counts, bbox and area from the
    RLE, and a ``score``: 1.0 by default (MaskCut gives no score; the order is the pass order, as the
    maintainers advise for AP, CutLER issue #18), or ``scores [n]`` (e.g. MaskCut's ``1 - Ncut / 2``)."""
    from pycocotools import mask as mask_utils

    if scores is not None and len(scores) != len(masks):
        raise ValueError(f"{len(scores)} scores for {len(masks)} masks")
    anns = []
    for k, m in enumerate(masks):
        if not m.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append(
            {
                "id": start_id + len(anns),
                "image_id": int(image_id),
                "category_id": category_id,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "score": 1.0 if scores is None else float(scores[k]),
            }
        )
    return anns


CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]


def coco_json(images: list[dict], annotations: list[dict]) -> dict:
    """A COCO instances dict with the single class-agnostic category ``fg``; annotation ids renumbered."""
    anns = [dict(a, id=k + 1) for k, a in enumerate(annotations)]
    return {
        "info": {"description": "MaskCut pseudo-masks (nbsupport)"},
        "images": images,
        "annotations": anns,
        "categories": CATEGORIES,
    }


def merge(paths, out) -> dict:
    """Join shard outputs: images by id (no duplicates allowed), annotations renumbered; ``out`` written
    atomically."""
    images, anns, seen = [], [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        for im in d["images"]:
            if im["id"] in seen:
                raise ValueError(f"image id {im['id']} appears in more than one shard ({p})")
            seen.add(im["id"])
            images.append(im)
        anns.extend(d["annotations"])
    images.sort(key=lambda r: r["id"])
    anns.sort(key=lambda a: (a["image_id"], a["id"]))
    result = coco_json(images, anns)
    atomic_write_json(out, result)
    return result
