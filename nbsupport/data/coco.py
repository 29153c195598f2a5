"""COCO-format annotations: instance masks, semantic masks, captions, and a checked reader for
pseudo-mask files (MaskCut / CutLER JSON).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.images import load_image


def _read_json(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path} is not a text (JSON) file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object, not a {type(data).__name__}")
    return data


class CocoInstances:
    """COCO instance annotations through pycocotools (RLE, uncompressed RLE and polygons).

    ``image_root`` defaults to ``<folder of ann_file>/images`` (the synthetic layout); for real COCO pass
    e.g. ``coco/val2017``. Masks come in annotation order.
    """

    def __init__(self, ann_file, image_root=None, data: dict | None = None):
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        if data is None:
            data = _read_json(self.ann_file, "COCO instances")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{self.ann_file} is not a COCO instances file: no {key!r} list")
        bad = [a.get("id") for a in data["annotations"] if not {"image_id", "category_id", "segmentation"} <= set(a)]
        if bad:
            raise ValueError(f"{self.ann_file}: annotations {bad[:5]} lack image_id, category_id or segmentation")
        self.coco = COCO()
        self.coco.dataset = data
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            self.coco.createIndex()
        self.image_root = Path(image_root) if image_root is not None else self.ann_file.parent / "images"
        self.image_ids = sorted(self.coco.imgs)
        self.categories = {c["id"]: c["name"] for c in data["categories"]}

    @classmethod
    def from_data(cls, data: dict, image_root, source: str = "<in memory>") -> CocoInstances:
        """The same view of a COCO instances dict built in memory (e.g. VOC's instance PNGs as COCO,
        :func:`nbsupport.data.instances.instance_dataset`); ``source`` names it in errors."""
        return cls(source, image_root, data=data)

    def __len__(self):
        return len(self.image_ids)

    def image_info(self, image_id) -> dict:
        try:
            return self.coco.imgs[image_id]
        except KeyError:
            raise KeyError(
                f"image id {image_id!r} is not in {self.ann_file} ({len(self.image_ids)} images, "
                f"ids {self.image_ids[:3]}...)"
            ) from None

    def image_path(self, image_id) -> Path:
        return self.image_root / self.image_info(image_id)["file_name"]

    def load(self, image_id) -> Image.Image:
        return load_image(self.image_path(image_id))

    def annotations(self, image_id) -> list[dict]:
        self.image_info(image_id)
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))

    def instance_masks(self, image_id) -> np.ndarray:
        """bool ``[N, H, W]`` in annotation order (``annToMask``: polygons, RLE, uncompressed RLE)."""
        info = self.image_info(image_id)
        anns = self.annotations(image_id)
        if not anns:
            return np.zeros((0, info["height"], info["width"]), bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy= notice
            return np.stack([self.coco.annToMask(a).astype(bool) for a in anns])

    def category_ids(self, image_id) -> list[int]:
        return [a["category_id"] for a in self.annotations(image_id)]

    def boxes(self, image_id) -> np.ndarray:
        """float ``[N, 4]`` xywh, as stored."""
        return np.array([a["bbox"] for a in self.annotations(image_id)], dtype=float).reshape(-1, 4)

    def semantic_mask(self, image_id) -> np.ndarray:
        """int32 ``[H, W]``: 0 background, else the category id (later instances drawn on top)."""
        info = self.image_info(image_id)
        sem = np.zeros((info["height"], info["width"]), np.int32)
        for m, c in zip(self.instance_masks(image_id), self.category_ids(image_id)):
            sem[m] = c
        return sem


class CocoCaptions:
    """COCO captions file: ``.image_ids`` (sorted), ``captions(image_id) -> list[str]``."""

    def __init__(self, ann_file):
        self.ann_file = Path(ann_file)
        data = _read_json(self.ann_file, "COCO captions")
        if not isinstance(data.get("annotations"), list):
            raise ValueError(f"{ann_file} is not a COCO captions file: no 'annotations' list")
        self._caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            if "image_id" not in a or "caption" not in a:
                raise ValueError(f"{ann_file}: caption annotation {a.get('id')!r} lacks image_id or caption")
            self._caps.setdefault(a["image_id"], []).append(a["caption"])
        self.image_ids = sorted({im["id"] for im in data.get("images", [])} | set(self._caps))

    def __len__(self):
        return len(self.image_ids)

    def captions(self, image_id) -> list[str]:
        return list(self._caps.get(image_id, []))


def read_coco_json(path) -> dict:
    """A COCO instances dict from ``path`` with a clear error for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    text = path.read_text()
    if not text.strip():
        raise ValueError(
            f"annotation file {path} is empty (0 bytes): expected a COCO instances JSON "
            "(MaskCut writes one with `python -m nbsupport maskcut`)"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"annotation file {path} is not a COCO instances file (no 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [{"id": 1, "name": "fg", "supercategory": "fg"}])
    return data
