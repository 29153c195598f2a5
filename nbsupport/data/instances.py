"""Images with instance masks and classes, whatever the source: the input of the instance-level studies
(notebooks 01, 02, 05, 06: object descriptors, correspondences between objects of a class, MaskCut's mask
AP).

Every source comes as a :class:`~nbsupport.data.coco.CocoInstances` (``image_ids``, ``load``,
``instance_masks``, ``category_ids``, ``semantic_mask``, the COCO dict for pycocotools), so the studies are
written once: the synthetic world (:func:`~nbsupport.data.scenes.synthetic_coco`), COCO 2017 in its
official layout, and PASCAL VOC's ``SegmentationObject`` instances turned into COCO annotations.

What a study must not judge is one rule for every source (:func:`ignore_mask`): COCO's crowd regions
(``iscrowd`` annotations: many objects under one mask, no instance) and VOC's 255 void band (kept in the
converted image record as ``"void"``, an RLE). :func:`object_annotations` are the instances proper (crowd
left out), :func:`instance_map` draws them as one id map with the ignored pixels at -1, and
:func:`describe_dataset` names the data for figure titles.
"""

from __future__ import annotations

import warnings
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
    1..20); the 255 void band belongs to no instance and is kept in the image record as ``"void"`` (an RLE,
    read by :func:`ignore_mask`; pycocotools ignores the key). Images without an instance PNG are skipped.
    ``n_images``: only the first ones of the split (the conversion reads every PNG)."""
    from pycocotools import mask as mask_utils

    ds = PascalVOC(root, split)
    images, anns = [], []
    for i, image_id in enumerate(ds.ids[:n_images]):
        img, sem, inst = ds.load_with_instances(i)
        if inst is None:
            continue
        k = len(images) + 1
        void = mask_utils.encode(np.asfortranarray(((inst == IGNORE) | (sem == IGNORE)).astype(np.uint8)))
        images.append(
            {
                "id": k,
                "file_name": f"{image_id}.jpg",
                "height": img.height,
                "width": img.width,
                "voc_id": image_id,
                "void": {"size": [int(v) for v in void["size"]], "counts": void["counts"].decode("ascii")},
            }
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
    name: str | None, root=None, split: str = "val", n_images: int | None = 64, seed: int = 0, size: int = 128
) -> CocoInstances:
    """The images with instances a study runs on: ``name=None`` -> the synthetic world's ``split``
    (``n_images`` scenes at ``size`` px, ``seed``); ``"coco"`` / ``"voc"`` -> that dataset under ``root``
    (:data:`INSTANCE_LAYOUTS`; VOC converts only its first ``n_images``, None = all; ``seed`` and ``size``
    are the synthetic world's)."""
    if name is None:
        from nbsupport.data.scenes import synthetic_coco

        if n_images is None:
            raise ValueError("the synthetic world has no fixed size: give n_images (None = all needs a real dataset)")
        return synthetic_coco(n_images=n_images, seed=seed, size=size, split=split)
    if name not in INSTANCE_LAYOUTS:
        raise ValueError(f"instance dataset {name!r}: one of {sorted(INSTANCE_LAYOUTS)} or None (synthetic world)")
    if root is None:
        raise ValueError(f"dataset {name!r} needs dataset_root (layout: {INSTANCE_LAYOUTS[name]})")
    return coco_instances(root, split) if name == "coco" else voc_instances(root, split, n_images)


def describe_dataset(name: str | None, split: str = "val", seed: int = 0) -> str:
    """The data of a study in a few words, for figure titles: ``"synthetic val (seed 0)"``,
    ``"coco val2017"``, ``"voc val"`` (any other name: ``"<name> <split>"``)."""
    if name is None:
        return f"synthetic {split} (seed {seed})"
    return f"coco {split}2017" if name == "coco" else f"{name} {split}"


def object_annotations(coco, image_id) -> list[dict]:
    """The annotations of one image that are objects: every one but COCO's crowd regions (``iscrowd``)."""
    return [a for a in coco.annotations(image_id) if not a.get("iscrowd", 0)]


def object_category_ids(coco, image_id) -> list[int]:
    """The category of each object of one image (:func:`object_annotations`' order)."""
    return [a["category_id"] for a in object_annotations(coco, image_id)]


def _quiet(decode, *args) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy= notice
        return decode(*args).astype(bool)


def _ann_mask(coco, ann) -> np.ndarray:
    return _quiet(coco.coco.annToMask, ann)


def ignore_mask(coco, image_id) -> np.ndarray:
    """bool ``[H, W]``: the pixels of one image no study judges: its crowd regions and, for VOC
    (:func:`voc_instances`), the void band of the image record (``"void"`` RLE)."""
    from pycocotools import mask as mask_utils

    info = coco.image_info(image_id)
    out = np.zeros((int(info["height"]), int(info["width"])), bool)
    void = info.get("void")
    if void is not None:
        rle = dict(void)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        m = _quiet(mask_utils.decode, rle)
        if m.shape != out.shape:
            raise ValueError(f"image {image_id}: void mask {m.shape} does not match the image record {out.shape}")
        out |= m
    for a in coco.annotations(image_id):
        if a.get("iscrowd", 0):
            out |= _ann_mask(coco, a)
    return out


def instance_map(coco, image_id) -> tuple[np.ndarray, np.ndarray]:
    """The objects of one image as an id map: ``(ids [H, W] int64, classes [K + 1] int64)``. ``ids``: 0 =
    background, ``k`` = the ``k``-th object of :func:`object_annotations`, -1 = ignored (:func:`ignore_mask`)
    where no object covers the pixel; ``classes[k]``: the category of object ``k`` (``classes[0] = 0``).
    Where objects overlap the smaller one is drawn on top (objects painted from the largest area to the
    smallest, ties in annotation order), as COCO-Object's rasterisation does, so a small object on a large
    one stays visible (the synthetic world's masks never overlap)."""
    info = coco.image_info(image_id)
    ids = np.zeros((int(info["height"]), int(info["width"])), np.int64)
    ids[ignore_mask(coco, image_id)] = -1
    anns = object_annotations(coco, image_id)
    masks = [_ann_mask(coco, a) for a in anns]
    for k in sorted(range(len(masks)), key=lambda k: (-int(masks[k].sum()), k)):
        ids[masks[k]] = k + 1
    return ids, np.array([0, *(a["category_id"] for a in anns)], np.int64)


def semantic_labels(coco, image_id, ignore: int = IGNORE) -> np.ndarray:
    """int64 ``[H, W]``: 0 background, the category id of the object on top (:func:`instance_map`), and
    ``ignore`` on ignored pixels (crowd, VOC void); -1 suits label maps where "unknown" is negative."""
    ids, classes = instance_map(coco, image_id)
    return np.where(ids < 0, ignore, classes[np.maximum(ids, 0)])
