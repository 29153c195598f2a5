"""Detections of a trained CutLER model as COCO results (RLE masks, scores)."""

from __future__ import annotations

import numpy as np
import torch

from nbsupport.training.cutler.data import collate

# --------------------------------------------------------------------------------------------------
# Prediction


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mu

    r = mu.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


@torch.no_grad()
def predict(
    model,
    dataset,
    device="cpu",
    batch_size: int = 2,
    detections: int | None = None,
    mask_thresh: float = 0.5,
    progress: bool = False,
) -> list[dict]:
    """COCO result dicts (``image_id``, ``category_id`` 1, ``bbox`` xywh, ``segmentation`` RLE, ``score``)
    for every readable image of ``dataset`` (a :class:`~nbsupport.training.cutler.data.PseudoMaskDataset`, e.g. with
    ``train=False``). ``detections`` overrides the model's per-image cap (30 for self-training)."""
    m = getattr(model, "module", model)
    saved = m.roi_heads.detections_per_img
    if detections is not None:
        m.roi_heads.detections_per_img = int(detections)
    m.eval().to(device)
    results = []
    idx = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        idx = tqdm(idx, desc="predict", unit="batch")
    try:
        for s in idx:
            images, targets = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            if not images:
                continue
            outs = m([im.to(device) for im in images])
            for t, o in zip(targets, outs):
                masks = (o["masks"][:, 0] > mask_thresh).cpu().numpy()
                for b, sc, mk in zip(o["boxes"].cpu().tolist(), o["scores"].cpu().tolist(), masks):
                    results.append(
                        {
                            "image_id": t["image_id"],
                            "category_id": 1,
                            "score": float(sc),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "segmentation": _rle(mk),
                        }
                    )
    finally:
        m.roi_heads.detections_per_img = saved
    return results


def top_masks(
    predictions: list[dict], image_id: int, shape, min_score: float = 0.5, max_masks: int = 5, fallback: int = 3
) -> np.ndarray:
    """The masks a figure shows for one image: bool ``[N, H, W]`` of its detections scoring ``>= min_score``
    (best first, at most ``max_masks``), or its ``fallback`` best when none does (thesis Fig 1)."""
    from pycocotools import mask as mu

    dets = sorted((d for d in predictions if d["image_id"] == image_id), key=lambda d: -d["score"])
    keep = [d for d in dets if d["score"] >= min_score][:max_masks] or dets[:fallback]
    if not keep:
        return np.zeros((0, *shape), bool)
    rles = [dict(d["segmentation"], counts=d["segmentation"]["counts"].encode("ascii")) for d in keep]
    return np.stack([mu.decode(r).astype(bool) for r in rles])
