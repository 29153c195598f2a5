"""The ImageNet train folder as CutLER's MaskCut reads it, and CutLER's released pseudo-labels.

MaskCut (facebookresearch/CutLER ``maskcut/maskcut.py``) walks ``imagenet/train/<wnid>/*.JPEG`` and names
each image ``<wnid>/<file>`` in its COCO JSON; detectron2 reads those names relative to ``imagenet/train``
(CutLER's ``builtin.py``: annotations in ``imagenet/annotations/imagenet_train_fixsize480_tau0.15_N3.json``).

Its image records swap width and height (``create_image_info`` is given ``(height, width)`` where it
documents ``(width, height)``); CutLER's ``check_image_size`` swaps them back when the loaded image
disagrees. :func:`fix_swapped_sizes` does the same from the RLE sizes (``[height, width]``, written from the
masks themselves) or, for a record without RLE, from the image file.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from nbsupport.data.coco import read_coco_json
from nbsupport.data.datasets.base import DatasetLayoutError, LabelError
from nbsupport.data.images import IMAGE_EXTENSIONS, load_image

PSEUDO_LABEL_FILE = "imagenet_train_fixsize480_tau0.15_N3.json"
LAYOUT = f"imagenet/{{train/<wnid>/<wnid>_<n>.JPEG, annotations/{PSEUDO_LABEL_FILE}}}"
_WNID = re.compile(r"n\d{8}")
_EXIF_ORIENTATION = 0x0112


class ImageNetFolder:
    """ImageNet images in class folders: ``ds.files`` (``<wnid>/<file>``, the names CutLER's JSON uses), in a
    fixed order (wnids sorted, files sorted within a wnid, as MaskCut sorts them), ``ds.labels`` (the wnid
    of each file), ``ds.wnids``, ``ds[i] -> (PIL RGB image, wnid)``.

    ``root`` is the ``imagenet`` folder; ``split`` the folder of class folders (``train``). ``image_root`` is
    what a CutLER JSON's ``file_name`` is relative to; ``pseudo_label_path`` where CutLER keeps its labels.
    """

    def __init__(self, root, split: str = "train"):
        self.root = Path(root).expanduser()
        self.split = split
        self.image_root = self.root / split
        if not self.image_root.is_dir():
            raise DatasetLayoutError(f"ImageNet: folder {self.image_root} not found; expected layout: {LAYOUT}")
        folders = sorted(p for p in self.image_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        odd = [p.name for p in folders if not _WNID.fullmatch(p.name)]
        if odd:
            raise DatasetLayoutError(
                f"ImageNet: {self.image_root} holds folders that are not WordNet ids (n + 8 digits): {odd[:5]}; "
                f"expected layout: {LAYOUT}"
            )
        self.wnids = [p.name for p in folders]
        self.files: list[str] = []
        self.labels: list[str] = []
        for folder in folders:
            names = sorted(
                f.name
                for f in folder.iterdir()
                if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
            )
            self.files += [f"{folder.name}/{n}" for n in names]
            self.labels += [folder.name] * len(names)
        if not self.files:
            raise DatasetLayoutError(f"ImageNet: no images in {self.image_root}/<wnid>/; expected layout: {LAYOUT}")
        self.class_index = {w: i for i, w in enumerate(self.wnids)}

    @property
    def pseudo_label_path(self) -> Path:
        return self.root / "annotations" / PSEUDO_LABEL_FILE

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageNetFolder(root={str(self.root)!r}, split={self.split!r}, wnids={len(self.wnids)}, n={len(self)})"

    def path(self, i: int) -> Path:
        return self.image_root / self.files[i]

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"ImageNet {self.split}: index {i} out of range for {len(self)} images")
        return load_image(self.path(i)), self.labels[i]


class SizeFix(NamedTuple):
    """What :func:`fix_swapped_sizes` returns: the fixed COCO dict and its counts."""

    data: dict
    fixed: int  # image records whose width and height were swapped back
    checked: int  # records whose size an RLE or the image file confirmed (after the fix)
    unverified: int  # records with neither an RLE nor a readable image: left as they were
    conflicts: int = 0  # records whose sizes fit neither way (strict=False only): left as they were


def _file_size_hw(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image file as :func:`load_image` will return it (EXIF rotation applied), from its
    header; None when it cannot be opened."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                w, h = h, w
    except (OSError, ValueError, SyntaxError):
        return None
    return h, w


def _as_int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _true_size(im: dict, sizes: set, image_root, where: str) -> tuple[tuple[int, int] | None, str]:
    """The true (H, W) of an image record and where it came from; a :class:`LabelError` when its RLEs
    disagree."""
    if len(sizes) > 1:
        raise LabelError(f"{where}: its annotations' RLE sizes disagree: {sorted(sizes)} (H, W)")
    if sizes:
        return next(iter(sizes)), "RLE size"
    if image_root is not None:
        return _file_size_hw(Path(image_root) / str(im.get("file_name"))), f"image file under {image_root}"
    return None, ""


def fix_swapped_sizes(data: dict, image_root=None, source: str = "pseudo-label file", strict: bool = True) -> SizeFix:
    """``data`` (a COCO dict) with each image record's ``width`` / ``height`` set to its true size.

    The true size is the RLE ``size`` of the image's annotations (all must agree), else the image file under
    ``image_root`` (when given). A record whose ``(height, width)`` is the true size transposed is swapped
    back (CutLER's released file: every non-square image). A record that fits neither way, or whose RLEs
    disagree, is a :class:`LabelError` naming ``source``, the image id and the sizes (as CutLER's loader
    raises); with ``strict=False`` it is left as it was and counted in ``conflicts`` (for readers that drop
    such items themselves). ``data`` is not modified: fixed records are copies; annotations are shared.
    """
    rle_sizes: dict = {}
    for a in data.get("annotations", []):
        seg = a.get("segmentation")
        if isinstance(seg, dict) and "size" in seg:
            rle_sizes.setdefault(a.get("image_id"), set()).add(tuple(_as_int(s) for s in seg["size"]))
    images, fixed, checked, unverified, conflicts = [], 0, 0, 0, 0
    for im in data.get("images", []):
        where = f"{source}: image {im.get('id')} ({im.get('file_name')})"
        try:
            true_hw, what = _true_size(im, rle_sizes.get(im.get("id"), set()), image_root, where)
            stated = (_as_int(im.get("height")), _as_int(im.get("width")))
            if true_hw is not None and true_hw not in (stated, stated[::-1]):
                raise LabelError(
                    f"{where}: the record says {stated[1]}x{stated[0]} (W x H) but its {what} is "
                    f"{true_hw[1]}x{true_hw[0]}, in neither order"
                )
        except LabelError:
            if strict:
                raise
            conflicts += 1
            images.append(im)
            continue
        if true_hw is None:
            unverified += 1
            images.append(im)
            continue
        if stated == true_hw:
            images.append(im)
        else:
            images.append({**im, "height": true_hw[0], "width": true_hw[1]})
            fixed += 1
        checked += 1
    return SizeFix({**data, "images": images}, fixed, checked, unverified, conflicts)


def read_pseudo_labels(path, image_root=None, strict: bool = True) -> SizeFix:
    """A COCO pseudo-label JSON (CutLER's released file, or MaskCut's) read with
    :func:`nbsupport.data.coco.read_coco_json`, its image sizes fixed by :func:`fix_swapped_sizes`; a
    ``RuntimeWarning`` says how many records were fixed (and left in conflict) when there were any."""
    res = fix_swapped_sizes(read_coco_json(path), image_root, source=str(path), strict=strict)
    if res.fixed or res.conflicts:
        n = len(res.data["images"])
        msg = f"{path}: swapped width/height back in {res.fixed} of {n} image records (CutLER's layout)"
        if res.conflicts:
            msg += f"; {res.conflicts} records fit their masks in neither order and were left as they were"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return res


# -- fixture


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny ``imagenet`` tree under ``base``: ``train/n01440764`` (2 images, one portrait) and
    ``train/n01443537`` (2 images, one square) with ImageNet's file names, each a coloured shape on a
    textured background, and ``annotations/imagenet_train_fixsize480_tau0.15_N3.json`` written as CutLER's
    MaskCut writes it: image records with width and height swapped, one or two RLE masks per image (the
    planted shapes) with their true sizes.

    Returns ``root``, ``json`` (the pseudo-label file), ``files`` (in ``ImageNetFolder`` order), ``labels``,
    ``sizes`` (file -> true (H, W)), ``masks`` (file -> bool [N, H, W] as written) and ``swapped`` (how many
    records a fix must swap back: the non-square images).
    """
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    root = Path(base) / "imagenet"
    sizes = {
        "n01440764/n01440764_10026.JPEG": (30, 40),
        "n01440764/n01440764_10027.JPEG": (36, 24),
        "n01443537/n01443537_10007.JPEG": (32, 32),
        "n01443537/n01443537_10014.JPEG": (28, 44),
    }
    out = {"root": root, "json": root / "annotations" / PSEUDO_LABEL_FILE, "files": list(sizes), "sizes": sizes}
    out["labels"] = [f.split("/")[0] for f in sizes]
    out["masks"], out["swapped"] = {}, sum(h != w for h, w in sizes.values())
    coco = {
        "info": {"description": "ImageNet-1K: pseudo-masks with MaskCut (nbsupport fixture)"},
        "licenses": [{"id": 1, "name": "Apache License"}],
        "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}],
        "images": [],
        "annotations": [],
    }
    for image_id, (name, (h, w)) in enumerate(sizes.items(), start=1):
        yy, xx = np.mgrid[:h, :w]
        cy, cx = int(rng.integers(h // 3, h - h // 3)), int(rng.integers(w // 3, w - w // 3))
        masks = [((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 4)) ** 2 <= 1]
        if image_id == 1:
            masks.append((yy < 6) & (xx < 8))
        img = np.broadcast_to(rng.integers(40, 100, 3), (h, w, 3)) + rng.integers(-10, 11, (h, w, 3))
        for k, m in enumerate(masks):
            img = np.where(m[..., None], rng.integers(150, 256, 3) - 20 * k, img)
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "train" / name, "JPEG", quality=95)
        out["masks"][name] = np.stack(masks)
        coco["images"].append({"id": image_id, "file_name": name, "width": h, "height": w, "license": 1})
        for m in masks:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": int(m.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "width": w,
                    "height": h,
                }
            )
    out["json"].parent.mkdir(parents=True, exist_ok=True)
    out["json"].write_text(json.dumps(coco))
    return out
