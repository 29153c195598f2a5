"""Cityscapes-27 as STEGO reads it (mhamilton723/STEGO ``src/data.py`` class ``CityscapesSeg``): the fine
``gtFine_labelIds`` maps with ``labelId - 7`` as the class (labelIds 7 road .. 33 bicycle -> 0 .. 26) and the
void labelIds 0..6 ignored. These are the 27 "category" classes of cityscapesScripts' ``labels.py`` with
``ignoreInEval`` ones kept, not the 19-class benchmark (trainIds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError, SegmentationDataset

# STEGO's ``get_class_labels("cityscapes")``: labelIds 7..33 in order.
CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip

FIRST_NONVOID = 7  # STEGO's first_nonvoid: labelIds 0..6 (unlabeled, ego vehicle, ..., ground) are void
MAX_LABEL_ID = 33  # cityscapesScripts' labelIds run 0..33 (license plate, id -1, is not drawn in the PNG)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val")


def _lut() -> np.ndarray:
    """labelId -> class id (labelId - 7), void labelIds 0..6 -> 255, values above 33 -> -1 (not a labelId)."""
    lut = np.full(256, -1, np.int64)
    lut[:FIRST_NONVOID] = IGNORE
    lut[FIRST_NONVOID : MAX_LABEL_ID + 1] = np.arange(MAX_LABEL_ID + 1 - FIRST_NONVOID)
    return lut


class Cityscapes27(SegmentationDataset):
    """Cityscapes-27 (STEGO/HP): ``ds[i] -> (image, class mask)``, 27 classes, 255 = void.

    ``root`` is the ``cityscapes`` folder; ``split`` is ``train`` or ``val`` (fine annotations). ``ds.ids`` are
    ``<city>/<city>_<seq>_<frame>``, sorted by city then file name (torchvision's reader, which STEGO wraps,
    takes the folder order, which differs between file systems).
    """

    name = "cityscapes27"
    classes = CLASS_NAMES
    LAYOUT = (
        f"cityscapes/{{leftImg8bit/{{train,val}}/<city>/*{IMAGE_SUFFIX}, gtFine/{{train,val}}/<city>/*{LABEL_SUFFIX}}}"
    )
    lut = _lut()

    def __init__(self, root, split: str = "val"):
        super().__init__(root, split)
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}")
        image_dir, label_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetLayoutError(f"{self.name}: folder {folder} not found; expected layout: {self.LAYOUT}")
        for city in sorted(p for p in image_dir.iterdir() if p.is_dir()):
            stems = sorted(f.name[: -len(IMAGE_SUFFIX)] for f in city.glob(f"*{IMAGE_SUFFIX}"))
            self.ids += [f"{city.name}/{s}" for s in stems]
        if not self.ids:
            raise DatasetLayoutError(f"{self.name}: no *{IMAGE_SUFFIX} images under {image_dir}/<city>/")
        missing = [self.label_path(i) for i in self.ids if not self.label_path(i).is_file()]
        if missing:
            raise DatasetLayoutError(
                f"{self.name}: {len(missing)} images have no label file, e.g. {missing[0]}; "
                f"expected layout: {self.LAYOUT}"
            )

    def image_path(self, image_id: str) -> Path:
        return self.root / "leftImg8bit" / self.split / f"{image_id}{IMAGE_SUFFIX}"

    def label_path(self, image_id: str) -> Path:
        return self.root / "gtFine" / self.split / f"{image_id}{LABEL_SUFFIX}"

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        out = super().to_classes(raw)
        if (out < 0).any():
            bad = sorted(set(np.unique(raw[out < 0]).tolist()))[:5]
            raise LabelError(f"raw label values {bad} are not Cityscapes labelIds (0..{MAX_LABEL_ID})")
        return out


DATASETS = {"cityscapes27": Cityscapes27}


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


def _street(rng, h: int, w: int) -> np.ndarray:
    """Sky over building over road, a car (rectangle) and a person (ellipse), ego vehicle at the bottom and
    an out-of-roi left column: labelIds 23, 11, 7, 26, 24, 1, 3."""
    lab = np.full((h, w), 7, np.uint8)
    lab[: h // 4] = 23
    lab[h // 4 : h // 2] = 11
    y0, x0 = int(rng.integers(h // 2, h - h // 3)), int(rng.integers(1, w // 2))
    lab[y0 : y0 + h // 5, x0 : x0 + w // 4] = 26
    yy, xx = np.mgrid[:h, :w]
    cy, cx = int(rng.integers(h // 2, h - h // 4)), int(rng.integers(w // 2 + 2, w - 3))
    lab[((yy - cy) / (h / 8)) ** 2 + ((xx - cx) / 2.5) ** 2 <= 1] = 24
    lab[-2:] = 1
    lab[:, 0] = 3
    return lab


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny ``cityscapes`` tree under ``base``: 3 train images in 2 cities, 4 val images in 3 cities (one
    portrait, one a mosaic of every labelId 0..33 in 3 x 3 cells), grey ``*_gtFine_labelIds.png`` maps and,
    for one image, the ``_gtFine_color.png`` / ``_gtFine_instanceIds.png`` files that must not be read.

    Returns ``root``, ``ids`` (split -> ids in the order ``ds.ids`` must give), ``label_ids`` (id -> the
    planted labelId map), ``sizes`` (id -> (H, W)) and ``mosaic`` (the id holding labelIds 0..33, row-major).
    """
    rng = np.random.default_rng(seed)
    root = Path(base) / "cityscapes"
    sizes = {  # written in this (unsorted) order
        "train": {"bochum/bochum_000000_000313": (16, 32), "aachen/aachen_000001_000019": (20, 30),
                  "aachen/aachen_000000_000019": (18, 36)},
        "val": {"munster/munster_000000_000019": None, "lindau/lindau_000000_000019": (32, 18),
                "frankfurt/frankfurt_000000_000576": (16, 32), "frankfurt/frankfurt_000000_000294": (20, 40)},
    }  # fmt: skip
    label_ids: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    for split, items in sizes.items():
        for image_id, hw in items.items():
            if hw is None:
                lab = np.zeros((6, 17 * 3), np.uint8)
                for v in range(MAX_LABEL_ID + 1):
                    r, c = divmod(v, 17)
                    lab[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = v
            else:
                lab = _street(rng, *hw)
            label_ids[split][image_id] = lab
            for sub, suffix in (("leftImg8bit", IMAGE_SUFFIX), ("gtFine", LABEL_SUFFIX)):
                path = root / sub / split / f"{image_id}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_paint(lab, rng) if sub == "leftImg8bit" else lab).save(path)
    decoy = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294"
    Image.fromarray(_paint(label_ids["val"]["frankfurt/frankfurt_000000_000294"], rng)).save(
        f"{decoy}_gtFine_color.png"
    )
    Image.fromarray(np.full((20, 40), 26001, np.uint16)).save(f"{decoy}_gtFine_instanceIds.png")
    return {
        "root": root,
        "ids": {split: sorted(items) for split, items in label_ids.items()},
        "label_ids": {k: v for items in label_ids.values() for k, v in items.items()},
        "sizes": {k: v.shape for items in label_ids.values() for k, v in items.items()},
        "mosaic": "munster/munster_000000_000019",
    }
