"""Images with instance masks and classes, whatever the source: the input of the instance-level studies
(notebooks 01, 02, 05, 06: object descriptors, correspondences between objects of a class, MaskCut's mask
AP).

Every source comes as a :class:`~nbsupport.data.coco.CocoInstances` (``image_ids``, ``load``,
``instance_masks``, ``category_ids``, ``semantic_mask``, the COCO dict for pycocotools), so the studies are
written once: the synthetic world (:func:`~nbsupport.data.scenes.synthetic_coco`), COCO 2017 in its
official layout, and PASCAL VOC's ``SegmentationObject`` instances turned into COCO annotations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nbsupport.data.coco import CocoInstances
from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError
from nbsupport.data.datasets.voc import PascalVOC

#: ``dataset`` names of :func:`instance_dataset` -> the layout its ``root`` must have.
INSTANCE_LAYOUTS = {
    "coco": "coco/{annotations/instances_<split>2017.json, <split>2017/*.jpg}",
    "voc": "VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationObject, ImageSets/Segmentation/<split>.txt}",
}


def coco_instances(root, split: str = "val") -> CocoInstances:
    """COCO 2017 instances in the official layout: ``root/annotations/instances_<split>2017.json`` with the
    images in ``root/<split>2017/``."""
    root = Path(root).expanduser()
    ann = root / "annotations" / f"instances_{split}2017.json"
    images = root / f"{split}2017"
    for p in (ann, images):
        if not p.exists():
            raise DatasetLayoutError(f"coco: {p} not found; expected layout: {INSTANCE_LAYOUTS['coco']}")
    return CocoInstances(ann, images)


def voc_instances(root, split: str = "val", n_images: int | None = None) -> CocoInstances:
    """PASCAL VOC 2012's object annotations as COCO: every ``SegmentationObject`` number of an image is one
    instance (RLE), its category the majority class of ``SegmentationClass`` under it (GroupViT's names, ids
    1..20); the 255 void band belongs to no instance. Images without an instance PNG are skipped.
    ``n_images``: only the first ones of the split (the conversion reads every PNG)."""
    from pycocotools import mask as mask_utils

    ds = PascalVOC(root, split)
    images, anns = [], []
    for i, image_id in enumerate(ds.ids[:n_images]):
        img, sem, inst = ds.load_with_instances(i)
        if inst is None:
            continue
        k = len(images) + 1
        images.append(
            {"id": k, "file_name": f"{image_id}.jpg", "height": img.height, "width": img.width, "voc_id": image_id}
        )
        for obj in sorted(set(np.unique(inst).tolist()) - {0, IGNORE}):
            m = inst == obj
            classes = sem[m][(sem[m] != 0) & (sem[m] != IGNORE)]
            if not len(classes):
                continue
            cat = int(np.bincount(classes).argmax())
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": k,
                    "category_id": cat,
                    "iscrowd": 0,
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                }
            )
    cats = [{"id": c, "name": ds.classes[c], "supercategory": "voc"} for c in range(1, ds.num_classes)]
    data = {
        "images": images,
        "annotations": anns,
        "categories": cats,
        "info": {"description": f"PASCAL VOC 2012 {split} instances ({ds.root})"},
    }
    return CocoInstances.from_data(data, ds.root / "JPEGImages", source=f"{ds.root} (SegmentationObject, {split})")


def instance_dataset(
    name: str | None, root=None, split: str = "val", n_images: int = 64, seed: int = 0, size: int = 128
) -> CocoInstances:
    """The images with instances a study runs on: ``name=None`` -> the synthetic world's ``split``
    (``n_images`` scenes at ``size`` px, ``seed``); ``"coco"`` / ``"voc"`` -> that dataset under ``root``
    (:data:`INSTANCE_LAYOUTS`)."""
    if name is None:
        from nbsupport.data.scenes import synthetic_coco

        return synthetic_coco(n_images=n_images, seed=seed, size=size, split=split)
    if name not in INSTANCE_LAYOUTS:
        raise ValueError(f"instance dataset {name!r}: one of {sorted(INSTANCE_LAYOUTS)} or None (synthetic world)")
    if root is None:
        raise ValueError(f"dataset {name!r} needs dataset_root (layout: {INSTANCE_LAYOUTS[name]})")
    return coco_instances(root, split) if name == "coco" else voc_instances(root, split, n_images)
