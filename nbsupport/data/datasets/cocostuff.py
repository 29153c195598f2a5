"""COCO-Stuff-27 as STEGO reads it (mhamilton723/STEGO ``src/data.py`` class ``Coco``): the 164k
stuffthingmaps (182 fine ids) mapped to 27 coarse classes, 12 thing + 15 stuff supercategories.

Which image list each split uses follows STEGO's ``ContrastiveSegDataset`` for ``cocostuff27``:
``train`` reads ``curated/train2017/Coco164kFull_Stuff_Coarse.txt`` (IIC's curated list) and ``val`` reads
``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt`` (IIC's subset 7, about 2,175 images): STEGO and HP report
their COCO-Stuff-27 numbers on that list. ``image_list=`` names another file of the same folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError, SegmentationDataset, read_split

# STEGO's ``get_class_labels("cocostuff27")`` in id order; it names the thing and the stuff supercategory
# "food" (2, 14) and "furniture" (3, 15) alike.
STEGO_CLASS_NAMES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip

# The names ``ds.classes`` uses: STEGO's, with its two repeated stuff names suffixed "-stuff" (as STEGO's own
# cocostuff3 names are: "ground-stuff", ...) so that a table keyed by name keeps all 27 rows.
CLASS_NAMES = tuple(
    n + "-stuff" if i >= 12 and n in STEGO_CLASS_NAMES[:12] else n for i, n in enumerate(STEGO_CLASS_NAMES)
)

NUM_THINGS = 12  # coarse ids 0..11 are thing supercategories, 12..26 stuff (STEGO's first_stuff_index)

# STEGO's fine_to_coarse, as runs: (first fine id, last fine id, coarse id). Fine id = COCO-Stuff label - 1
# (0 person ... 90 toothbrush, 91 banner ... 181 wood); the unused COCO ids in 0..90 are mapped too.
_THING_RUNS = (
    (0, 0, 9), (1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10), (43, 50, 5), (51, 60, 2),
    (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4),
)  # fmt: skip
_STUFF = (  # coarse id of fine ids 91..181, in order
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13,
    13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16,
    21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22,
    14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24,
)  # fmt: skip
FINE_TO_COARSE: dict[int, int] = {f: c for lo, hi, c in _THING_RUNS for f in range(lo, hi + 1)}
FINE_TO_COARSE.update({91 + i: c for i, c in enumerate(_STUFF)})

_SPLIT_DIRS = {"train": ("train2017",), "val": ("val2017",), "train+val": ("train2017", "val2017")}
FULL_LIST = "Coco164kFull_Stuff_Coarse.txt"
SUBSET7_LIST = "Coco164kFull_Stuff_Coarse_7.txt"


def _lut() -> np.ndarray:
    """Fine id -> coarse id; 255 (unlabeled) -> 255; every other value -> -1 (not a stuffthingmaps id)."""
    lut = np.full(256, -1, np.int64)
    for fine, coarse in FINE_TO_COARSE.items():
        lut[fine] = coarse
    lut[IGNORE] = IGNORE
    return lut


class CocoStuff27(SegmentationDataset):
    """COCO-Stuff-27 (STEGO/HP): ``ds[i] -> (image, coarse mask)``, 27 classes, 255 = unlabeled.

    ``root`` is the ``cocostuff`` folder; ``split`` is ``train``, ``val`` or ``train+val`` (STEGO's); the image
    list is STEGO's choice (``train``: the full curated list, ``val``: subset 7) unless ``image_list`` names a
    file in ``curated/<split dir>/``. ``ds.ids`` are ``<split dir>/<image id>`` in list order.
    """

    name = "cocostuff27"
    classes = CLASS_NAMES
    LAYOUT = (
        "cocostuff/{images/{train2017,val2017}/*.jpg, annotations/{train2017,val2017}/*.png (stuffthingmaps), "
        f"curated/{{train2017,val2017}}/{{{FULL_LIST},{SUBSET7_LIST}}}}}"
    )
    lut = _lut()

    def __init__(self, root, split: str = "val", image_list: str | None = None):
        super().__init__(root, split)
        if split not in _SPLIT_DIRS:
            raise ValueError(f"{self.name}: split must be one of {sorted(_SPLIT_DIRS)}, got {split!r}")
        self.image_list = image_list or (SUBSET7_LIST if split == "val" else FULL_LIST)
        for split_dir in _SPLIT_DIRS[split]:
            listed = read_split(self.root / "curated" / split_dir / self.image_list, self.LAYOUT)
            self.ids += [f"{split_dir}/{i}" for i in listed]
        for image_id in self.ids:
            for path in (self.image_path(image_id), self.label_path(image_id)):
                if not path.is_file():
                    raise DatasetLayoutError(
                        f"{self.name}: {path} (listed in {self.image_list}) not found; expected layout: {self.LAYOUT}"
                    )

    def image_path(self, image_id: str) -> Path:
        split_dir, stem = image_id.split("/")
        return self.root / "images" / split_dir / f"{stem}.jpg"

    def label_path(self, image_id: str) -> Path:
        split_dir, stem = image_id.split("/")
        return self.root / "annotations" / split_dir / f"{stem}.png"

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        out = super().to_classes(raw)
        if (out < 0).any():
            bad = sorted(set(np.unique(raw[out < 0]).tolist()))[:5]
            raise LabelError(f"raw label values {bad} are not stuffthingmaps ids (0..181 fine, 255 unlabeled)")
        return out


DATASETS = {"cocostuff27": CocoStuff27}


# -- fixture


def _paint(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB image whose regions are the label map's: one colour per label value (at least 40 apart in some
    channel when the map has at most 20 values), slight noise."""
    values = np.unique(labels)
    colours = np.zeros((256, 3), np.int64)
    chosen: list[np.ndarray] = []
    for v in values:
        for _ in range(200):
            c = rng.integers(30, 226, 3)
            if len(values) > 20 or all(np.abs(c - o).max() >= 40 for o in chosen):
                break
        chosen.append(c)
        colours[v] = c
    noise = rng.integers(-8, 9, (*labels.shape, 3))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)


def _scene(rng, h: int, w: int, background: int, things: tuple[int, int]) -> np.ndarray:
    """A stuff background with a rectangle and an ellipse of two thing/stuff ids and an unlabeled bottom row."""
    lab = np.full((h, w), background, np.uint8)
    y0, x0 = int(rng.integers(1, h // 3)), int(rng.integers(1, w // 3))
    lab[y0 : y0 + h // 3, x0 : x0 + w // 3] = things[0]
    yy, xx = np.mgrid[:h, :w]
    cy, cx = int(rng.integers(h // 2, h - h // 5)), int(rng.integers(w // 2, w - w // 5))
    lab[((yy - cy) / (h / 6)) ** 2 + ((xx - cx) / (w / 6)) ** 2 <= 1] = things[1]
    lab[-1, :] = IGNORE
    return lab


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny ``cocostuff`` tree under ``base``: 3 train and 4 val images (one portrait, one a mosaic of all
    182 fine ids), stuffthingmaps PNGs (grey, 255 unlabeled), both curated lists of ``val2017`` (subset 7 = 3
    of the 4 images, not in sorted order) and the full list of ``train2017``.

    Returns ``root`` (what :class:`CocoStuff27` takes), ``ids`` (split -> ids in the order ``ds.ids`` must
    give), ``fine`` (id -> the planted fine label map), ``sizes`` (id -> (H, W)), ``mosaic`` (the id holding
    every fine id in 3 x 3 cells, 14 a row from 0, the last row unlabeled).
    """
    rng = np.random.default_rng(seed)
    root = Path(base) / "cocostuff"
    scenes = {
        "train2017": {
            "000000000009": (24, 32, 148, (0, 2)),  # road; person, car
            "000000000025": (30, 20, 123, (17, 105)),  # grass, portrait; horse, clouds
            "000000000030": (28, 28, 170, (61, 97)),  # wall-brick; chair, cabinet
        },
        "val2017": {
            "000000000139": (30, 40, 100, (62, 72)),  # carpet; couch, tv
            "000000000285": (36, 24, 154, (21, 134)),  # sea, portrait; bear, mountain
            "000000000724": (28, 36, 156, (12, 147)),  # sky-other; stop sign, river
        },
    }
    fine: dict[str, np.ndarray] = {}
    for split_dir, items in scenes.items():
        for stem, (h, w, bg, things) in items.items():
            fine[f"{split_dir}/{stem}"] = _scene(rng, h, w, bg, things)
    mosaic = np.full((14 * 3, 14 * 3), IGNORE, np.uint8)  # 196 cells: 0..181, then 14 unlabeled
    for f in range(182):
        r, c = divmod(f, 14)
        mosaic[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = f
    fine["val2017/000000000632"] = mosaic
    for image_id, lab in fine.items():
        split_dir, stem = image_id.split("/")
        for sub in ("images", "annotations"):
            (root / sub / split_dir).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_paint(lab, rng)).save(root / "images" / split_dir / f"{stem}.jpg", quality=95)
        Image.fromarray(lab, "L").save(root / "annotations" / split_dir / f"{stem}.png")
    lists = {
        ("train2017", FULL_LIST): ["000000000009", "000000000025", "000000000030"],
        ("val2017", FULL_LIST): ["000000000139", "000000000285", "000000000632", "000000000724"],
        ("val2017", SUBSET7_LIST): ["000000000632", "000000000139", "000000000285"],
    }
    for (split_dir, name), stems in lists.items():
        (root / "curated" / split_dir).mkdir(parents=True, exist_ok=True)
        (root / "curated" / split_dir / name).write_text("".join(s + "\n" for s in stems))
    ids = {
        "train": [f"train2017/{s}" for s in lists["train2017", FULL_LIST]],
        "val": [f"val2017/{s}" for s in lists["val2017", SUBSET7_LIST]],
        "val_full": [f"val2017/{s}" for s in lists["val2017", FULL_LIST]],
    }
    return {
        "root": root,
        "ids": ids,
        "fine": fine,
        "sizes": {k: v.shape for k, v in fine.items()},
        "mosaic": "val2017/000000000632",
    }
