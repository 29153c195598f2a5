"""ADE20K (the SceneParsing challenge release, ``ADEChallengeData2016``) as mmsegmentation reads it: 150
classes, grey PNGs where 0 = "other" (ignored: 255) and ``k`` = class ``k - 1`` (``reduce_zero_label``), names
from mmseg's ``ADE20KDataset`` (its trailing space in "bed " removed).

Layout: ``ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}``; ``split``
``"train"`` -> ``training`` (20,210 images), ``"val"`` -> ``validation`` (2,000). There is no split file:
as mmseg does, the ids are the image file names of the folder, sorted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nbsupport.data.datasets.base import DatasetLayoutError, SegmentationDataset
from nbsupport.data.datasets.voc import (
    FIXTURE_SIZES,
    checked_lookup,
    plant_shapes,
    reduce_zero_label_table,
    save_label_png,
    write_fixture_jpeg,
)

# mmsegmentation's ADE20KDataset classes (150, in label order), "bed " without its trailing space.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

SPLIT_FOLDERS = {"train": "training", "val": "validation"}


class ADE20K(SegmentationDataset):
    """ADE20K-150 (root ``ADEChallengeData2016``): ``ds[i] -> (image, mask)`` with class ids 0..149 and 255
    where the annotation says 0 ("other"); ``split`` ``"train"`` / ``"val"`` (or the folder names)."""

    name = "ade20k"
    classes = ADE20K_CLASSES
    LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}"
    lut = reduce_zero_label_table(150)

    def __init__(self, root, split: str | None = None):
        split = split or "val"
        folder = SPLIT_FOLDERS.get(split, split)
        if folder not in SPLIT_FOLDERS.values():
            raise ValueError(f"ade20k: split must be one of {sorted(SPLIT_FOLDERS)}, got {split!r}")
        super().__init__(root, split)
        self.folder = folder
        self.image_dir = self.root / "images" / folder
        self.label_dir = self.root / "annotations" / folder
        for d in (self.image_dir, self.label_dir):
            if not d.is_dir():
                raise DatasetLayoutError(f"ade20k: folder {d} not found; expected layout: {self.LAYOUT}")
        self.ids = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
        if not self.ids:
            raise DatasetLayoutError(f"ade20k: no .jpg images in {self.image_dir}; expected layout: {self.LAYOUT}")

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        return checked_lookup(raw, self.lut, "ADE20K: 0 other -> 255, 1..150 -> 0..149, 255")


DATASETS = {"ade20k": ADE20K}


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny ``base/ADEChallengeData2016`` (official names ``ADE_train_00000001.jpg`` ...): 3 training and 4
    validation images (sizes of :data:`~nbsupport.data.datasets.voc.FIXTURE_SIZES`, one portrait), each two
    shapes of raw classes 1..150 on raw 0 ("other"); the first validation image also has a strip of raw 150
    ("flag", class 149) along its bottom. Grey PNGs as released.

    Returns ``{"root", "splits": {"train": ids, "val": ids}, "raw": {id: raw labels}, "masks": {id: class
    ids (0 -> 255, k -> k - 1, by hand)}, "objects": {id: [(raw value, box, kind)]}, "sizes": {id: (H, W)}}``.
    """
    rng = np.random.default_rng(seed)
    root = Path(base) / "ADEChallengeData2016"
    out = {"root": root, "splits": {}, "raw": {}, "masks": {}, "objects": {}, "sizes": {}}
    n = 0
    for split, folder, prefix, count in (("train", "training", "ADE_train", 3), ("val", "validation", "ADE_val", 4)):
        ids = [f"{prefix}_{k:08d}" for k in range(1, count + 1)]
        out["splits"][split] = ids
        for image_id in ids:
            hw = FIXTURE_SIZES[n % len(FIXTURE_SIZES)]
            scene, labels, _, objects = plant_shapes(rng, hw, rng.choice(np.arange(1, 151), 2, replace=False), band=0)
            if image_id == "ADE_val_00000001":
                scene[-3:] = labels[-3:] = 150
            write_fixture_jpeg(root / "images" / folder / f"{image_id}.jpg", scene, seed * 1000 + 400 + n)
            save_label_png(root / "annotations" / folder / f"{image_id}.png", labels, palette=False)
            raw = labels.astype(np.int64)
            out["raw"][image_id], out["objects"][image_id], out["sizes"][image_id] = raw, objects, hw
            out["masks"][image_id] = np.where(raw == 0, 255, raw - 1)
            n += 1
    return out
