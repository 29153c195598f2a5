"""COCO-Object as GroupViT evaluates it: COCO 2017 val, 81 classes = background + the 80 thing categories in
category-id order (NVlabs/GroupViT ``segmentation/datasets/coco_object.py``, its names).

Two label sources, one class map (0 background, ``k`` = the ``k``-th thing category by id):

- ``"groupvit_png"``: the semantic PNGs GroupViT's ``convert_dataset/convert_coco_object.py`` writes from
  COCO-Stuff-164k (``annotations/val2017/<stem>_instanceTrainIds.png``, grey 0..80: the 80 things keep their
  order, every stuff class and the unlabelled 255 become background 0). When they are there they are read,
  so the numbers follow GroupViT's protocol exactly.
- ``"instances_json"``: otherwise the instance masks of ``annotations/instances_val2017.json`` (polygons,
  RLE, uncompressed RLE, through pycocotools) are rasterised: crowd regions first as 255 (ignored, as
  COCO-Stuff's tools treat crowd as void), then the other instances from the largest area to the smallest
  (ties by annotation id), so a small object on a large one stays visible. Close to GroupViT's PNGs
  but not identical (COCO-Stuff resolved overlaps by hand): ``ds.label_source_kind`` says which was used.

Root: the COCO folder holding ``annotations/`` and ``val2017/`` (GroupViT's tree, ``images/val2017/``, works
too). Ids: COCO image ids (int) in ascending order; file names from the JSON.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.coco import CocoInstances
from nbsupport.data.datasets.base import (
    IGNORE,
    DatasetLayoutError,
    LabelError,
    SegmentationDataset,
    read_label_png,
)
from nbsupport.data.datasets.voc import FIXTURE_SIZES, write_fixture_jpeg

# GroupViT's COCO-Object classes: background + the 80 COCO things in category-id order.
COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO's 80 thing category ids (1..90 without the 10 unused ids); class k + 1 is COCO_THING_IDS[k].
COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

PNG_SUFFIX = "_instanceTrainIds.png"
LABEL_SOURCES = ("auto", "groupvit_png", "instances_json")


class COCOObject(SegmentationDataset):
    """COCO-Object (GroupViT's protocol): ``ds[i] -> (image, mask)`` with 0 = background, 1..80 = the thing
    classes, 255 = ignore. ``labels``: ``"auto"`` (GroupViT's PNGs when present, else the JSON),
    ``"groupvit_png"`` or ``"instances_json"``; ``split``: ``val`` (default, 5,000 images) or ``train``."""

    name = "coco_object"
    classes = COCO_OBJECT_CLASSES
    LAYOUT = (
        "coco/{annotations/instances_<split>2017.json, <split>2017/*.jpg} and optionally GroupViT's "
        "coco/annotations/<split>2017/*_instanceTrainIds.png (images also under coco/images/<split>2017/)"
    )

    def __init__(self, root, split: str | None = None, labels: str = "auto"):
        super().__init__(root, split or "val")
        if self.split not in ("val", "train"):
            raise ValueError(f"coco_object: split must be 'val' or 'train', got {self.split!r}")
        if labels not in LABEL_SOURCES:
            raise ValueError(f"coco_object: labels must be one of {LABEL_SOURCES}, got {labels!r}")
        folder = f"{self.split}2017"
        self.json_path = self.root / "annotations" / f"instances_{folder}.json"
        self.png_dir = self.root / "annotations" / folder
        has_png = self.png_dir.is_dir() and next(self.png_dir.glob(f"*{PNG_SUFFIX}"), None) is not None
        if labels == "auto":
            labels = "groupvit_png" if has_png else "instances_json"
        if labels == "groupvit_png" and not has_png:
            raise DatasetLayoutError(f"coco_object: no *{PNG_SUFFIX} files in {self.png_dir}; expected: {self.LAYOUT}")
        if labels == "instances_json" and not self.json_path.is_file():
            raise DatasetLayoutError(
                f"coco_object: {self.json_path} not found (and no GroupViT label PNGs in {self.png_dir}); "
                f"expected layout: {self.LAYOUT}"
            )
        self.label_source_kind = labels
        candidates = [self.root / folder, self.root / "images" / folder]
        self.image_dir = next((d for d in candidates if d.is_dir()), None)
        if self.image_dir is None:
            raise DatasetLayoutError(
                f"coco_object: no image folder {candidates[0]} (or {candidates[1]}); expected layout: {self.LAYOUT}"
            )
        self._coco = None
        if self.json_path.is_file():
            self._coco = CocoInstances(self.json_path, self.image_dir)
            self._check_categories()
            self.ids = list(self._coco.image_ids)
            self._files = {i: self._coco.image_info(i)["file_name"] for i in self.ids}
        else:  # GroupViT's PNGs without the JSON: the image folder lists the split (as mmseg does)
            stems = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
            if not stems:
                raise DatasetLayoutError(f"coco_object: no .jpg images in {self.image_dir}")
            self.ids = [int(s) if s.isdigit() else s for s in stems]
            self._files = {i: f"{s}.jpg" for i, s in zip(self.ids, stems)}

    def _check_categories(self) -> None:
        have = tuple(sorted(self._coco.categories))
        if have != COCO_THING_IDS:
            extra, missing = sorted(set(have) - set(COCO_THING_IDS)), sorted(set(COCO_THING_IDS) - set(have))
            raise DatasetLayoutError(
                f"coco_object: {self.json_path} does not hold COCO's 80 thing categories "
                f"(unexpected ids {extra[:5]}, missing ids {missing[:5]})"
            )
        self._class_of = {cat: k + 1 for k, cat in enumerate(COCO_THING_IDS)}

    def image_path(self, image_id) -> Path:
        return self.image_dir / self._files[image_id]

    def label_path(self, image_id) -> Path:
        if self.label_source_kind == "groupvit_png":
            return self.png_dir / f"{Path(self._files[image_id]).stem}{PNG_SUFFIX}"
        return self.json_path

    def label_source(self, image_id) -> str:
        if self.label_source_kind == "groupvit_png":
            return str(self.label_path(image_id))
        return f"{self.json_path} (image id {image_id})"

    def raw_label(self, image_id) -> np.ndarray:
        if self.label_source_kind == "groupvit_png":
            return read_label_png(self.label_path(image_id))
        return self.rasterise(image_id)

    def rasterise(self, image_id) -> np.ndarray:
        """Class ids ``[H, W]`` int64 of one image from the instances JSON: crowd regions 255, then the
        other instances painted from the largest to the smallest (ties: annotation id), background 0."""
        info = self._coco.image_info(image_id)
        hw = (int(info["height"]), int(info["width"]))
        sem = np.zeros(hw, np.int64)
        things = []
        for a in self._coco.annotations(image_id):
            if a["category_id"] not in self._class_of:
                raise LabelError(f"annotation {a.get('id')} has category {a['category_id']}, not a COCO thing")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy= notice
                    m = self._coco.coco.annToMask(a).astype(bool)
            except Exception as e:  # malformed polygons / RLE from pycocotools
                raise LabelError(
                    f"annotation {a.get('id')}: unreadable segmentation ({type(e).__name__}: {e})"
                ) from None
            if m.shape != hw:
                raise LabelError(
                    f"annotation {a.get('id')}: mask is {m.shape[1]}x{m.shape[0]} px but the image record says "
                    f"{hw[1]}x{hw[0]}"
                )
            if a.get("iscrowd", 0):
                sem[m] = IGNORE
            else:
                things.append((-int(m.sum()), int(a.get("id", 0)), m, self._class_of[a["category_id"]]))
        for _, _, m, cls in sorted(things, key=lambda t: t[:2]):
            sem[m] = cls
        return sem


DATASETS = {"coco_object": COCOObject}


# ---------------------------------------------------------------------------------------------- fixtures
COCO_FIXTURE_VAL = (632, 139, 724, 285)  # JSON order (unsorted); the reader lists them ascending
COCO_FIXTURE_TRAIN = (9, 25, 30)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask: run lengths (zeros first) in column-major order."""
    flat = np.asarray(mask, bool).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def _rect_poly(y0, x0, y1, x1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_fixture(base, seed: int = 0, groupvit_labels: bool = False) -> dict:
    """A tiny COCO 2017 tree under ``base/coco`` (official names): ``annotations/instances_val2017.json`` (the
    80 categories; 4 val images listed unsorted, ids :data:`COCO_FIXTURE_VAL`), ``val2017/*.jpg``, and the
    captions files ``annotations/captions_{train,val}2017.json`` with ``train2017/*.jpg`` (ids
    :data:`COCO_FIXTURE_TRAIN`, 2 captions each) for the GroupViT fine-tuning reader.

    Planted (positions drawn from ``seed``): image 139 a large L-shaped polygon "person" (class 1) under a
    small compressed-RLE "toothbrush" (80) listed first, so area order matters; image 285 (portrait) a crowd
    "person" in uncompressed RLE (255) partly covered by a two-part polygon "dog" (category 18, class 17); image 632 a
    rectangle "stop sign" (12, after the gap at id 12); image 724 nothing (all background).
    ``groupvit_labels``: also write GroupViT's ``annotations/val2017/<stem>_instanceTrainIds.png`` (grey):
    the same classes with void -> 0 as its conversion writes them, plus a 6-px "toothbrush" square in the
    top-left of image 724 so a test can tell the sources apart.

    Returns ``{"root", "val_ids" (ascending), "train_ids", "files": {id: file_name}, "sizes": {id: (H, W)},
    "masks": {id: class ids from the JSON}, "png_masks": {id: class ids of the PNGs} (when written),
    "objects": {id: [(class, (y0, x0, y1, x1))]}, "captions": {id: [str]}}``.
    """
    rng = np.random.default_rng(seed)
    root = Path(base) / "coco"
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    sizes = {632: FIXTURE_SIZES[2], 139: FIXTURE_SIZES[0], 724: FIXTURE_SIZES[3], 285: FIXTURE_SIZES[1]}
    files = {i: f"{i:012d}.jpg" for i in COCO_FIXTURE_VAL + COCO_FIXTURE_TRAIN}
    masks, objects, anns = {}, {}, []

    def add(image_id, cat, seg, m, crowd=0):
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        anns.append(
            {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": seg,
             "area": int(m.sum()), "bbox": bbox, "iscrowd": crowd}
        )  # fmt: skip

    def jitter(lo, hi):
        return int(rng.integers(lo, hi + 1))

    # 139 (48 x 64): L-shaped polygon person; a small RLE toothbrush inside it, listed first
    h, w = sizes[139]
    y0, x0, y1, x1 = jitter(3, 6), jitter(3, 6), h - jitter(3, 6), w - jitter(3, 6)
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    person = np.zeros((h, w), bool)
    person[y0:ym, x0:x1] = True
    person[ym:y1, x0:xm] = True
    small = np.zeros((h, w), bool)
    sy, sx = jitter(y0 + 2, ym - 8), jitter(x0 + 2, xm - 8)
    small[sy : sy + 6, sx : sx + 6] = True
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(small.astype(np.uint8)))
    add(139, 90, {"size": rle["size"], "counts": rle["counts"].decode("ascii")}, small)
    add(139, 1, [[x0, y0, x1, y0, x1, ym, xm, ym, xm, y1, x0, y1]], person)
    masks[139] = np.where(small, 80, np.where(person, 1, 0))
    objects[139] = [(1, (y0, x0, ym, x1)), (1, (ym, x0, y1, xm)), (80, (sy, sx, sy + 6, sx + 6))]

    # 285 (64 x 48, portrait): crowd of people (uncompressed RLE), a dog in two polygon parts over part of it
    h, w = sizes[285]
    crowd = np.zeros((h, w), bool)
    cy0, cy1 = jitter(2, 5), jitter(28, 34)
    crowd[cy0:cy1, 2 : w - 2] = True
    add(285, 1, _uncompressed_rle(crowd), crowd, crowd=1)
    dy0 = jitter(cy1 - 10, cy1 - 6)
    part_a, part_b = (dy0, 6, h - 6, 20), (dy0, 26, h - 6, w - 6)
    dog = np.zeros((h, w), bool)
    for ya, xa, yb, xb in (part_a, part_b):
        dog[ya:yb, xa:xb] = True
    add(285, 18, [_rect_poly(*part_a), _rect_poly(*part_b)], dog)
    masks[285] = np.where(dog, 17, np.where(crowd, IGNORE, 0))
    objects[285] = [(17, part_a), (17, part_b), (IGNORE, (cy0, 2, dy0, w - 2))]

    # 632 (40 x 56): a stop sign (category 13 -> class 12, the id after the first gap)
    h, w = sizes[632]
    box = (jitter(4, 8), jitter(4, 10), h - jitter(4, 8), w - jitter(4, 10))
    sign = np.zeros((h, w), bool)
    sign[box[0] : box[2], box[1] : box[3]] = True
    add(632, 13, [_rect_poly(*box)], sign)
    masks[632] = np.where(sign, 12, 0)
    objects[632] = [(12, box)]

    masks[724] = np.zeros(sizes[724], np.int64)  # no annotations
    objects[724] = []

    scene_value = {0: 0, IGNORE: 1, 1: 15, 80: 40, 17: 23, 12: 59}  # class -> fixture colour index
    for n, i in enumerate(COCO_FIXTURE_VAL):
        scene = np.vectorize(scene_value.get)(masks[i]).astype(np.uint8)
        write_fixture_jpeg(root / "val2017" / files[i], scene, seed * 1000 + 200 + n)
    images = [{"id": i, "file_name": files[i], "height": sizes[i][0], "width": sizes[i][1]} for i in COCO_FIXTURE_VAL]
    cats = [
        {"id": c, "name": COCO_OBJECT_CLASSES[k + 1], "supercategory": "thing"} for k, c in enumerate(COCO_THING_IDS)
    ]
    (ann_dir / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )

    out = {
        "root": root,
        "val_ids": sorted(COCO_FIXTURE_VAL),
        "train_ids": list(COCO_FIXTURE_TRAIN),
        "files": files,
        "sizes": dict(sizes),
        "masks": {i: m.astype(np.int64) for i, m in masks.items()},
        "objects": objects,
    }
    if groupvit_labels:
        png = {i: np.where(m == IGNORE, 0, m).astype(np.int64) for i, m in out["masks"].items()}
        png[724][:6, :6] = 80
        for i, m in png.items():
            path = ann_dir / "val2017" / f"{Path(files[i]).stem}{PNG_SUFFIX}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8), "L").save(path)
        out["png_masks"] = png

    # captions (COCO captions layout) for nbsupport.data.captions / nbsupport.data.coco
    words = {1: "person", 17: "dog", 12: "stop sign", 80: "toothbrush"}
    captions = {
        139: ["a person holding a toothbrush", "someone with a small toothbrush"],
        285: ["a dog in front of a crowd of people", "two dogs near many people"],
        632: ["a red stop sign", "a stop sign on a plain background"],
        724: ["an empty plain scene", "nothing but a flat colour"],
    }
    for n, i in enumerate(COCO_FIXTURE_TRAIN):
        hw = FIXTURE_SIZES[n]
        cls = sorted(words)[int(rng.integers(len(words)))]
        scene = np.zeros(hw, np.uint8)
        scene[hw[0] // 4 : 3 * hw[0] // 4, hw[1] // 4 : 3 * hw[1] // 4] = scene_value[cls]
        write_fixture_jpeg(root / "train2017" / files[i], scene, seed * 1000 + 300 + n)
        sizes[i] = hw
        captions[i] = [f"a {words[cls]} in the middle", f"one {words[cls]} on a plain background"]
    for split, ids in (("train", COCO_FIXTURE_TRAIN), ("val", COCO_FIXTURE_VAL)):
        imgs = [{"id": i, "file_name": files[i], "height": sizes[i][0], "width": sizes[i][1]} for i in ids]
        caps = [{"image_id": i, "caption": c} for i in ids for c in captions[i]]
        for k, c in enumerate(caps):
            c["id"] = 1000 * (split == "val") + k + 1
        (ann_dir / f"captions_{split}2017.json").write_text(json.dumps({"images": imgs, "annotations": caps}))
    out["sizes"], out["captions"] = dict(sizes), captions
    return out
