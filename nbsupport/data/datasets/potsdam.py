"""Potsdam-3 as STEGO reads it (mhamilton723/STEGO ``src/data.py`` class ``Potsdam``), on IIC's tiles of the
ISPRS Potsdam orthophotos: ``imgs/<id>.mat`` (key ``img``, uint8 H x W x 4 = RGB + infrared) and
``gt/<id>.mat`` (key ``gt``, 0 road (impervious surface), 1 building, 2 low vegetation, 3 tree, 4 car,
5 clutter), grouped into 3 classes: {road, car} -> 0, {building, clutter} -> 1, {low vegetation, tree} -> 2.
The image is the RGB part (STEGO drops the infrared channel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError, SegmentationDataset, read_split
from nbsupport.data.images import ImageLoadError

# STEGO's ``get_class_labels("potsdam")``
CLASS_NAMES = ("roads and cars", "buildings and clutter", "trees and vegetation")
FINE_NAMES = ("road", "building", "low vegetation", "tree", "car", "clutter")  # IIC's gt values 0..5
FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}  # STEGO's fine_to_coarse (its 255 -> -1 is our 255)

# STEGO's split names -> the split files that make them
SPLIT_FILES = {
    "train": ("labelled_train.txt",),
    "unlabelled_train": ("unlabelled_train.txt",),
    "val": ("labelled_test.txt",),
    "train+val": ("labelled_train.txt", "labelled_test.txt"),
    "all": ("all.txt",),
}
UNLABELLED_SPLITS = ("unlabelled_train", "all")  # tiles without gt/<id>.mat are expected here


def _lut() -> np.ndarray:
    lut = np.full(256, -1, np.int64)
    for fine, coarse in FINE_TO_COARSE.items():
        lut[fine] = coarse
    lut[IGNORE] = IGNORE
    return lut


def _read_mat(path: Path, key: str) -> np.ndarray:
    """The array under ``key`` of a MATLAB file, or :class:`ImageLoadError` naming the file."""
    from scipy.io import loadmat

    if not path.is_file():
        raise ImageLoadError(path, "file does not exist")
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises ValueError, MatReadError, OSError, ... for a broken file
        raise ImageLoadError(path, f"unreadable .mat file ({type(e).__name__}: {e})") from None
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ImageLoadError(path, f"no {key!r} array in the .mat file (found {found})")
    return np.asarray(mat[key])


class Potsdam3(SegmentationDataset):
    """Potsdam-3 (STEGO/HP): ``ds[i] -> (RGB image, class mask)``, 3 classes.

    ``root`` is the ``potsdam`` folder; ``split`` is one of STEGO's names: ``train`` (labelled_train.txt),
    ``val`` (labelled_test.txt), ``train+val``, ``unlabelled_train`` (unlabelled_train.txt) or ``all``
    (all.txt). In ``unlabelled_train`` and ``all`` a tile without ``gt/<id>.mat`` gets an all-255 mask
    (STEGO fills such tiles with ones, i.e. "buildings and clutter"); in the labelled splits it is an error.
    """

    name = "potsdam3"
    classes = CLASS_NAMES
    LAYOUT = (
        "potsdam/{imgs/<id>.mat (img: H x W x 4 uint8), gt/<id>.mat (gt: H x W, 0..5), "
        "labelled_train.txt, labelled_test.txt, unlabelled_train.txt, all.txt}"
    )
    lut = _lut()

    def __init__(self, root, split: str = "val"):
        super().__init__(root, split)
        if split not in SPLIT_FILES:
            raise ValueError(f"{self.name}: split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        for name in SPLIT_FILES[split]:
            self.ids += read_split(self.root / name, self.LAYOUT)
        for image_id in self.ids:
            needed = [self.image_path(image_id)] + ([] if split in UNLABELLED_SPLITS else [self.label_path(image_id)])
            for path in needed:
                if not path.is_file():
                    raise DatasetLayoutError(
                        f"{self.name}: {path} (listed in {', '.join(SPLIT_FILES[split])}) not found; "
                        f"expected layout: {self.LAYOUT}"
                    )

    def image_path(self, image_id: str) -> Path:
        return self.root / "imgs" / f"{image_id}.mat"

    def label_path(self, image_id: str) -> Path:
        return self.root / "gt" / f"{image_id}.mat"

    def image_array(self, image_id: str) -> np.ndarray:
        """The stored tile, uint8 ``[H, W, 4]`` (RGB + infrared)."""
        path = self.image_path(image_id)
        img = _read_mat(path, "img")
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise ImageLoadError(path, f"'img' must be H x W x 4 (RGB + IR) or H x W x 3, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ImageLoadError(path, f"'img' must be uint8 (IIC's tiles are), got {img.dtype}")
        return img

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.image_array(self.ids[i])[..., :3]), "RGB")

    def raw_label(self, image_id: str) -> np.ndarray:
        path = self.label_path(image_id)
        if not path.is_file() and self.split in UNLABELLED_SPLITS:
            return np.full(self.image_array(image_id).shape[:2], IGNORE, np.int64)
        gt = _read_mat(path, "gt")
        if gt.ndim != 2 or not np.issubdtype(gt.dtype, np.integer):
            raise ImageLoadError(path, f"'gt' must be an H x W integer array, got {gt.dtype} {gt.shape}")
        return gt.astype(np.int64)

    def label_source(self, image_id: str) -> str:
        path = self.label_path(image_id)
        return str(path) if path.is_file() else f"{path} (absent: unlabelled tile)"

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        out = super().to_classes(raw)
        if (out < 0).any():
            bad = sorted(set(np.unique(raw[out < 0]).tolist()))[:5]
            raise LabelError(f"raw label values {bad} are not Potsdam classes (0..5, 255 ignore)")
        return out


DATASETS = {"potsdam3": Potsdam3}


# -- fixture


def _tile(rng, h: int, w: int) -> np.ndarray:
    """Low vegetation with a road band, a building block with clutter on it, a tree (ellipse), a car."""
    gt = np.full((h, w), 2, np.int32)
    gt[h // 2 - 2 : h // 2 + 2] = 0
    y0, x0 = int(rng.integers(0, h // 4)), int(rng.integers(0, w // 3))
    gt[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    gt[y0 + 1 : y0 + 3, x0 + 1 : x0 + 3] = 5
    yy, xx = np.mgrid[:h, :w]
    cy, cx = int(rng.integers(3 * h // 4 - 1, h - 3)), int(rng.integers(w // 2, w - 4))
    gt[((yy - cy) / 3) ** 2 + ((xx - cx) / 3) ** 2 <= 1] = 3
    gt[h // 2 - 1 : h // 2 + 1, 2:6] = 4
    return gt


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny ``potsdam`` tree under ``base``: 6 tiles as IIC writes them (``imgs/<n>.mat`` uint8 H x W x 4
    with an infrared channel unlike the RGB, ``gt/<n>.mat`` int32 0..5), 2 labelled train, 2 labelled test
    (one portrait), 2 unlabelled train tiles without gt, and the four split files (ids in a shuffled order,
    as IIC's random names are).

    Returns ``root``, ``ids`` (split file -> ids in file order), ``gt`` (id -> planted 0..5 map), ``rgbir``
    (id -> the stored H x W x 4 array) and ``sizes`` (id -> (H, W)).
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root = Path(base) / "potsdam"
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    sizes = {"5": (20, 20), "731": (16, 24), "12": (20, 20), "3080": (28, 18), "44": (16, 16), "901": (18, 22)}
    files = {
        "labelled_train.txt": ["731", "5"],
        "labelled_test.txt": ["3080", "12"],
        "unlabelled_train.txt": ["901", "44"],
    }
    files["all.txt"] = ["5", "44", "731", "12", "901", "3080"]
    labelled = files["labelled_train.txt"] + files["labelled_test.txt"]
    colours = rng.integers(30, 226, (6, 3))
    gts, rgbir = {}, {}
    for image_id, (h, w) in sizes.items():
        gt = _tile(rng, h, w)
        rgb = np.clip(colours[gt] + rng.integers(-8, 9, (h, w, 3)), 0, 255)
        ir = 255 - rgb[..., 0:1]  # the infrared channel: the red one inverted
        rgbir[image_id] = np.concatenate([rgb, ir], axis=2).astype(np.uint8)
        savemat(str(root / "imgs" / f"{image_id}.mat"), {"img": rgbir[image_id]})
        if image_id in labelled:
            gts[image_id] = gt
            savemat(str(root / "gt" / f"{image_id}.mat"), {"gt": gt})
    for name, ids in files.items():
        (root / name).write_text("".join(i + "\n" for i in ids))
    return {"root": root, "ids": files, "gt": gts, "rgbir": rgbir, "sizes": sizes}
