"""Images with captions (COCO captions layout) as a torch dataset, for GroupViT training."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F


# ============================================================================================== data
def default_image_root(ann_file) -> Path:
    """The image folder of a captions file: ``images/`` beside it (the synthetic world's layout) or, for COCO's
    official ``<coco>/annotations/captions_<split>.json``, ``<coco>/<split>`` (e.g. ``train2017/``)."""
    ann_file = Path(ann_file)
    beside = ann_file.parent / "images"
    m = re.fullmatch(r"captions_(\w+)\.json", ann_file.name)
    if not beside.is_dir() and m and ann_file.parent.name == "annotations":
        official = ann_file.parent.parent / m.group(1)
        if official.is_dir():
            return official
    return beside


class CaptionImages(torch.utils.data.Dataset):
    """Images with captions from a COCO captions file (``{"images": [{id, file_name}], "annotations":
    [{image_id, caption}]}``, as COCO's ``captions_train2017.json`` and the synthetic world write it).
    ``image_root``: default :func:`default_image_root`. Item: ``(image [3, S, S] ImageNet-normalised, captions
    list[str])``; ``preload`` keeps decoded tensors (small datasets); ``augment="crop"`` adds a random resized
    crop (scale 0.6-1)."""

    def __init__(self, ann_file, image_root=None, image_size: int = 224, preload: bool = False, augment: str = "none"):
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"captions file {ann_file} not found")
        data = json.loads(ann_file.read_text())
        if "images" not in data or "annotations" not in data:
            raise ValueError(f"{ann_file} is not a COCO captions file (needs 'images' and 'annotations')")
        if augment not in ("none", "crop"):
            raise ValueError(f"augment must be 'none' or 'crop', got {augment!r}")
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        self.images = [im for im in data["images"] if im["id"] in caps]
        self.captions = [caps[im["id"]] for im in self.images]
        self.root = Path(image_root) if image_root else default_image_root(ann_file)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} of {ann_file} not found: pass image_root")
        self.size, self.augment = int(image_size), augment
        self._cache = [self._load(i) for i in range(len(self.images))] if preload else None

    def __len__(self):
        return len(self.images)

    def _load(self, i):
        from nbsupport.data.images import image_to_tensor, load_image

        return image_to_tensor(load_image(self.root / self.images[i]["file_name"]), self.size)

    def __getitem__(self, i):
        x = self._cache[i] if self._cache is not None else self._load(i)
        if self.augment == "crop":
            s = self.size
            scale = random.uniform(0.6, 1.0)
            c = max(8, int(round(s * math.sqrt(scale))))
            y0, x0 = random.randint(0, s - c), random.randint(0, s - c)
            x = F.interpolate(x[None, :, y0 : y0 + c, x0 : x0 + c], size=(s, s), mode="bilinear", align_corners=False)[
                0
            ]
        return x, self.captions[i]


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
