"""What every semantic-segmentation dataset of the real path shares: its items, its checks, its errors.

A dataset reads one benchmark in its official folder layout with the label map of the protocol that uses
it (GroupViT's for VOC / Context / COCO-Object / ADE20K, STEGO's for COCO-Stuff-27 / Cityscapes-27 /
Potsdam-3): ``ds[i] -> (PIL RGB image, int64 mask [H, W])`` with class ids ``0 .. C-1`` and
``255 = ignore``, ``ds.classes`` (names in id order, background first where the protocol has one),
``ds.ids`` (image ids in split order), ``ds.name``. Bad input raises one error that names the file and
what is wrong, so a long evaluation never dies on an anonymous ``IndexError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nbsupport.data.images import ImageLoadError, load_image

IGNORE = 255


class DatasetLayoutError(FileNotFoundError):
    """A dataset root that is not in the official layout: the message names the missing file or folder
    and the layout that was expected."""


class LabelError(ValueError):
    """A label file that does not fit its image (size) or the protocol's label map (values)."""


def read_label_png(path: Path) -> np.ndarray:
    """Label indices ``[H, W]`` (int64) of a palette (``P``) or grey (``L``/``I``) PNG, as stored: palette
    PNGs keep their indices, never their colours."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "label file does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise ImageLoadError(path, f"label PNG must be single-channel (palette or grey), got mode {im.mode}")
            return np.array(im, dtype=np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"unreadable label image ({e})") from None


def lookup_table(mapping: dict[int, int], size: int = 256, default: int = IGNORE) -> np.ndarray:
    """A label map as a lookup table ``[size]``: ``lut[raw] = mapped``, every raw value not in ``mapping``
    -> ``default`` (the ignore label)."""
    lut = np.full(size, default, np.int64)
    for raw, mapped in mapping.items():
        lut[int(raw)] = int(mapped)
    return lut


def read_split(path: Path, layout: str) -> list[str]:
    """Image ids of a split file (one per line, blank lines skipped); a missing file is a
    :class:`DatasetLayoutError` naming it and the ``layout``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"split file {path} not found; expected layout: {layout}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetLayoutError(f"split file {path} lists no images")
    return ids


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of every real segmentation dataset: ``ds[i] -> (PIL RGB image, int64 mask [H, W])``.

    Subclasses set ``name``, ``classes`` and ``LAYOUT`` (one line naming the folders, used in errors), fill
    ``self.ids`` in ``__init__`` and implement :meth:`image_path` and :meth:`raw_label` (the label map of
    the file as stored); :meth:`to_classes` maps it to class ids (default: a lookup table ``self.lut`` when
    set, else identity). :meth:`__getitem__` checks that the mask has the image's size and that every value
    is a class id or 255, naming the file otherwise.
    """

    name: str = ""
    classes: tuple[str, ...] = ()
    LAYOUT: str = ""
    lut: np.ndarray | None = None

    def __init__(self, root, split: str = "val"):
        self.root = Path(root).expanduser()
        self.split = split
        self.ids: list[str] = []
        if not self.root.is_dir():
            raise DatasetLayoutError(
                f"{self.name}: dataset root {self.root} is not a folder; expected layout: {self.LAYOUT}"
            )

    # -- what a subclass provides
    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def label_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def raw_label(self, image_id: str) -> np.ndarray:
        """The label map as stored in the file (before the protocol's mapping)."""
        return read_label_png(self.label_path(image_id))

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        if self.lut is None:
            return raw.astype(np.int64)
        if raw.min() < 0 or raw.max() >= len(self.lut):
            bad = sorted(set(np.unique(raw[(raw < 0) | (raw >= len(self.lut))]).tolist()))[:5]
            raise LabelError(f"raw label values {bad} are outside the label map (0..{len(self.lut) - 1})")
        return self.lut[raw]

    # -- the dataset
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
        )

    def load_image(self, i: int) -> Image.Image:
        return load_image(self.image_path(self.ids[i]))

    def load_mask(self, i: int, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The class-id mask of item ``i`` (int64 ``[H, W]``, 255 = ignore), checked against the label map
        and, when given, the image size ``size_hw``."""
        image_id = self.ids[i]
        where = self.label_source(image_id)
        try:
            mask = self.to_classes(self.raw_label(image_id))
        except LabelError as e:
            raise LabelError(f"{where}: {e}") from None
        if size_hw is not None and tuple(mask.shape) != tuple(size_hw):
            raise LabelError(
                f"{where}: labels are {mask.shape[1]}x{mask.shape[0]} px but the image "
                f"{self.image_path(image_id)} is {size_hw[1]}x{size_hw[0]}"
            )
        bad = (mask != IGNORE) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            vals = sorted(set(np.unique(mask[bad]).tolist()))[:5]
            raise LabelError(f"{where}: class ids {vals} outside 0..{self.num_classes - 1} (and {IGNORE} = ignore)")
        return mask

    def label_source(self, image_id: str) -> str:
        """Where the labels of ``image_id`` come from (a path, or a description), for error messages."""
        return str(self.label_path(image_id))

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} images")
        i %= len(self)
        img = self.load_image(i)
        return img, self.load_mask(i, (img.height, img.width))
