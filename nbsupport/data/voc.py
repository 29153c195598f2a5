"""PASCAL VOC segmentation in its official layout (palette PNG labels, 255 = ignore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.images import ImageLoadError, load_image

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


VOC_IGNORE = 255


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC label palette ``[n, 3]`` uint8 (bits of the label spread over R, G, B)."""
    cmap = np.zeros((n, 3), np.uint8)
    for label in range(n):
        c, r, g, b = label, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[label] = (r, g, b)
    return cmap


def _read_label_png(path: Path) -> np.ndarray:
    """Label indices ``[H, W]`` int64 from a VOC palette PNG (or a colour-coded RGB one)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L"):
                return np.array(im, dtype=np.int64)
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"unreadable label image ({e})") from None
    lut = {tuple(c): k for k, c in enumerate(voc_colormap())}
    codes, inv = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    missing = [tuple(c) for c in codes if tuple(c) not in lut]
    if missing:
        raise ImageLoadError(path, f"RGB label colours {missing[:3]} are not in the VOC palette")
    return np.array([lut[tuple(c)] for c in codes], np.int64)[inv.reshape(-1)].reshape(rgb.shape[:2])


class VocSegmentation:
    """PASCAL VOC segmentation layout: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 =
    ignore), ``SegmentationObject/`` (optional), ``ImageSets/Segmentation/<split>.txt``."""

    def __init__(self, root, split: str = "val"):
        self.root = Path(root)
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            have = sorted(p.stem for p in (self.root / "ImageSets" / "Segmentation").glob("*.txt"))
            raise FileNotFoundError(
                f"{ids_file} not found: is {self.root} a VOC root (VOCdevkit/VOC2012)?"
                + (f" splits there: {have}" if have else "")
            )
        self.split = split
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]

    def __len__(self):
        return len(self.ids)

    def load(self, image_id):
        """``(PIL image, semantic int64 [H, W] with 255 = ignore, instance int64 [H, W] or None)``."""
        img = load_image(self.root / "JPEGImages" / f"{image_id}.jpg")
        sem_path = self.root / "SegmentationClass" / f"{image_id}.png"
        if not sem_path.is_file():
            raise ImageLoadError(sem_path, "label file does not exist")
        sem = _read_label_png(sem_path)
        obj_path = self.root / "SegmentationObject" / f"{image_id}.png"
        inst = _read_label_png(obj_path) if obj_path.is_file() else None
        if sem.shape != (img.height, img.width):
            raise ImageLoadError(
                sem_path, f"labels are {sem.shape[1]}x{sem.shape[0]} px but the image is {img.width}x{img.height}"
            )
        return img, sem, inst
