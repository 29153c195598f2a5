"""The one MaskCut pipeline: images -> backbone keys -> patch masks -> pixel masks -> COCO -> mask AP.

The command line (``python -m nbsupport maskcut``), notebooks 05 and 06 and the backbone benchmarks all
run MaskCut through these functions, so the reference protocol (square resize to ``size``, last-block
keys, ``n_masks`` cuts, nearest upsampling, optional CRF, masks in the original frame) exists once.
"""

from __future__ import annotations

import numpy as np
import torch

from nbsupport.analysis import metrics
from nbsupport.data.images import image_to_tensor
from nbsupport.maskcut.coco import coco_annotations, coco_json
from nbsupport.maskcut.cut import maskcut, resolve_tau
from nbsupport.maskcut.refine import pixel_masks
from nbsupport.maskcut.solver import SolverStats
from nbsupport.models.backbones import describe
from nbsupport.models.features import extract


def masks_from_features(
    feats: torch.Tensor,
    image_hws,
    input_hw,
    n_masks: int = 3,
    tau=0.15,
    images=None,
    crf: bool = False,
    stats: SolverStats | None = None,
) -> list[np.ndarray]:
    """Pixel masks ``[n_masks, H, W]`` per image from patch features ``[B, h, w, D]`` of model inputs of
    size ``input_hw``; ``image_hws``: each image's original ``(H, W)``. ``images``: the inputs resized to
    ``input_hw`` (uint8 ``[H, W, 3]``), needed only with ``crf``. ``tau`` must already be a number or
    ``"median"`` (see :func:`~nbsupport.maskcut.resolve_tau`). ``stats``: a :class:`SolverStats` that
    records the eigen-solves."""
    if crf and images is None:
        raise ValueError("crf=True needs the images resized to input_hw")
    pm = maskcut(feats, n_masks, tau, solver="auto", stats=stats).cpu().numpy()
    return [
        pixel_masks(m, tuple(hw), tuple(input_hw), images[k] if crf else None, crf=crf)
        for k, (m, hw) in enumerate(zip(pm, image_hws))
    ]


def image_masks(
    model,
    images,
    size: int = 480,
    n_masks: int = 3,
    tau="auto",
    crf: bool = False,
    device=None,
    stats: SolverStats | None = None,
) -> list[np.ndarray]:
    """MaskCut's pixel masks ``[n_masks, H, W]`` (bool, empty where a pass was rejected) for PIL images, as
    the reference makes them: each image resized to ``size x size``, last-block keys of ``model``, the
    original frame restored. ``tau``: a number, ``"median"`` or ``"auto"`` (:func:`resolve_tau`)."""
    if not images:
        return []
    device = device or next(model.parameters()).device
    x = torch.stack([image_to_tensor(im, size) for im in images]).to(device)
    feats = extract(model, x, "key", -1)
    resized = [np.asarray(im.resize((size, size))) for im in images] if crf else None
    return masks_from_features(
        feats,
        [(im.height, im.width) for im in images],
        (size, size),
        n_masks,
        resolve_tau(tau, model),
        resized,
        crf,
        stats=stats,
    )


def iter_masks(
    model,
    coco,
    ids=None,
    size: int = 480,
    n_masks: int = 3,
    tau="auto",
    crf: bool = False,
    batch_size: int = 8,
    device=None,
    progress: bool = False,
    stats: SolverStats | None = None,
):
    """:func:`image_masks` for the images ``ids`` (default: all) of a :class:`~nbsupport.data.CocoInstances`,
    in batches of ``batch_size``, one ``(image_id, masks [n_masks, H, W])`` at a time: what a whole split
    (COCO val2017, 5,000 images) is scored from without holding every mask."""
    ids = list(coco.image_ids if ids is None else ids)
    chunks = range(0, len(ids), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="maskcut", unit="batch")
    for s in chunks:
        chunk = ids[s : s + batch_size]
        pils = [coco.load(i) for i in chunk]
        yield from zip(chunk, image_masks(model, pils, size, n_masks, tau, crf, device, stats=stats))


def dataset_masks(
    model,
    coco,
    ids=None,
    size: int = 480,
    n_masks: int = 3,
    tau="auto",
    crf: bool = False,
    batch_size: int = 8,
    device=None,
    progress: bool = False,
    stats: SolverStats | None = None,
) -> dict[int, np.ndarray]:
    """:func:`image_masks` for the images ``ids`` (default: all) of a :class:`~nbsupport.data.CocoInstances`,
    in batches of ``batch_size``: ``{image_id: masks [n_masks, H, W]}``."""
    return dict(iter_masks(model, coco, ids, size, n_masks, tau, crf, batch_size, device, progress, stats))


def to_coco(coco, masks_by_id: dict) -> dict:
    """A class-agnostic COCO instances dict of MaskCut masks (the pseudo-labels CutLER trains on): the image
    records of ``coco`` for the ids in ``masks_by_id``, one annotation per non-empty mask, score 1."""
    images, anns = [], []
    for i, m in masks_by_id.items():
        images.append(coco.image_info(i))
        anns += coco_annotations(m, i)
    return coco_json(images, anns)


def _recall(coco, image_id, masks: np.ndarray) -> float:
    """Recall at IoU 0.5 of one image's ground-truth objects (crowd regions are no instance to find)."""
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in coco.annotations(image_id)], bool)
    gt = coco.instance_masks(image_id)[~crowd]
    return metrics.mask_recall(gt, masks[masks.any(axis=(1, 2))] if len(masks) else masks)


def score(coco, masks_by_id) -> dict:
    """Class-agnostic mask AP / AP50 (pycocotools, percent) of MaskCut masks against ``coco``'s ground truth
    on the images in ``masks_by_id`` (every mask scored 1, as MaskCut gives no score; crowd regions are
    pycocotools' ignore regions), the mean recall of ground-truth objects at IoU 0.5 (crowd regions left
    out), and the number of masks. ``masks_by_id``: ``{image_id: masks [n, H, W]}`` or any iterable of
    ``(image_id, masks)`` pairs (:func:`iter_masks`: scored one image at a time, the masks not kept)."""
    pairs = masks_by_id.items() if isinstance(masks_by_id, dict) else masks_by_id
    ids, dets, recalls = [], [], []
    for i, m in pairs:
        ids.append(i)
        dets += coco_annotations(m, i)
        recalls.append(_recall(coco, i, m))
    gt = {
        **coco.coco.dataset,
        "images": [coco.image_info(i) for i in ids],
        "annotations": [a for i in ids for a in coco.annotations(i)],
    }
    ap = metrics.coco_ap(gt, coco_json([], dets)["annotations"], "segm")
    return {
        "mask AP": ap["AP"],
        "mask AP50": ap["AP50"],
        "recall@0.5": float(np.nanmean(recalls)) if not np.all(np.isnan(recalls)) else float("nan"),
        "masks": len(dets),
    }


def score_models(
    models: dict,
    coco,
    ids=None,
    size: int = 480,
    n_masks: int = 3,
    tau="auto",
    crf: bool = False,
    batch_size: int = 8,
    device=None,
    stats: SolverStats | None = None,
    progress: bool = False,
):
    """MaskCut against ground truth for several backbones (e.g. a model and its random-init floor):
    :func:`iter_masks` into :func:`score` per entry of ``models`` (``{tag: backbone}``), one image at a time.
    One DataFrame row per tag: model, backbone, tau (as resolved for that backbone), mask AP, mask AP50,
    recall@0.5, masks."""
    import pandas as pd

    rows = []
    for tag, m in models.items():
        masks = iter_masks(m, coco, ids, size, n_masks, tau, crf, batch_size, device, progress, stats)
        rows.append({"model": tag, "backbone": describe(m), "tau": resolve_tau(tau, m), **score(coco, masks)})
    return pd.DataFrame(rows, columns=["model", "backbone", "tau", "mask AP", "mask AP50", "recall@0.5", "masks"])
