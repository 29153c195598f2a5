"""Robust image loading and the dataset layouts the notebooks read (image folders, COCO, VOC).

Every loader either returns an RGB image or raises :class:`ImageLoadError` naming the file and the
reason; batch helpers skip such files and report them instead of crashing a long job.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ImageLoadError(ValueError):
    """An image that cannot be used; ``.path`` is the file."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        super().__init__(f"cannot use image {self.path}: {reason}")


def load_image(path, min_size: int = 1) -> Image.Image:
    """An RGB PIL image with EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images are converted; alpha is composited on white. The file
    is fully decoded here, so truncated or corrupt files fail now with :class:`ImageLoadError`, as do
    missing files, non-images and images smaller than ``min_size`` pixels on a side.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "file does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = (255 * (arr - arr.min()) / max(arr.max() - arr.min(), 1)).astype(np.uint8)
                im = Image.fromarray(arr).convert("RGB")
            elif im.mode != "RGB":
                im = im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"corrupt or truncated image ({e})") from None
    if min(im.size) < min_size:
        raise ImageLoadError(path, f"{im.size[0]}x{im.size[1]} px is smaller than the minimum {min_size} px")
    return im


def image_to_tensor(img, size=None, patch: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised float tensor ``[3, H, W]``.

    ``size``: int -> ``size x size`` ignoring aspect (LANCZOS, as MaskCut does); ``(H, W)`` -> that;
    None -> unchanged. ``patch``: crop bottom/right to a multiple of the patch size.
    """
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"array images must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        img = Image.fromarray(img)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if patch:
        h, w = arr.shape[0] // patch * patch, arr.shape[1] // patch * patch
        if h == 0 or w == 0:
            raise ValueError(f"image of {arr.shape[1]}x{arr.shape[0]} px is smaller than one {patch}-px patch")
        arr = arr[:h, :w]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def denormalize(t: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Inverse of :func:`image_to_tensor` for plotting: ``[3, H, W]`` or ``[B, 3, H, W]`` -> ``[..., H, W, 3]``
    floats in [0, 1]."""
    t = t.detach().cpu().float()
    x = t * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).movedim(-3, -1).numpy()


def list_images(folder, recursive: bool = True) -> list[Path]:
    """Sorted image files of a folder (by extension, case-insensitive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    it = folder.rglob("*") if recursive else folder.glob("*")
    files = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return files


def load_images(paths, size=None, patch: int | None = None):
    """Load a batch, skipping unusable files.

    Returns ``(images [B, 3, H, W], kept paths, failures [(path, message)])``; failures are also
    reported with ``warnings.warn``. With ``size=None`` all images must share one size.
    """
    tensors, kept, failures = [], [], []
    for p in paths:
        try:
            tensors.append(image_to_tensor(load_image(p, min_size=patch or 1), size, patch))
            kept.append(Path(p))
        except (ImageLoadError, ValueError) as e:
            failures.append((Path(p), str(e)))
    if failures:
        warnings.warn(f"skipped {len(failures)} unusable image(s): " + "; ".join(m for _, m in failures))
    batch = torch.stack(tensors) if tensors else torch.empty(0, 3, 0, 0)
    return batch, kept, failures


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder (or a list of paths) for DataLoader-driven batch jobs.

    An item is ``dict(image, path, orig_size=(H, W), index)``; an unusable file gives
    ``dict(error, path, index)`` so :func:`collate_skip_bad` can drop and report it.
    """

    def __init__(self, root_or_paths, size=None, patch: int | None = None):
        if isinstance(root_or_paths, (str, Path)):
            self.paths = list_images(root_or_paths)
        else:
            self.paths = [Path(p) for p in root_or_paths]
        self.size, self.patch = size, patch

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[i]
        try:
            im = load_image(p, min_size=self.patch or 1)
            return {"image": image_to_tensor(im, self.size, self.patch), "path": str(p),
                    "orig_size": (im.height, im.width), "index": i}
        except (ImageLoadError, ValueError) as e:
            return {"error": str(e), "path": str(p), "index": i}


def collate_skip_bad(batch):
    """Collate for :class:`ImageFolderDataset`: returns ``(batch dict or None, failures [(path, msg)])``."""
    good = [b for b in batch if "error" not in b]
    failures = [(b["path"], b["error"]) for b in batch if "error" in b]
    if not good:
        return None, failures
    out = {"image": torch.stack([b["image"] for b in good]), "path": [b["path"] for b in good],
           "orig_size": [b["orig_size"] for b in good], "index": [b["index"] for b in good]}
    return out, failures


def _read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path} is not valid JSON: {e}") from None


class CocoInstances:
    """COCO instance annotations through pycocotools (RLE and polygons)."""

    def __init__(self, ann_file, image_root=None):
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        data = _read_json(self.ann_file)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.ann_file} is not a COCO instances file: no {key!r} list")
        self.coco = COCO()
        self.coco.dataset = data
        import contextlib
        import io

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            self.coco.createIndex()
        self.image_root = Path(image_root) if image_root else self.ann_file.parent / "images"
        self.image_ids = sorted(self.coco.imgs)
        self.categories = {c["id"]: c["name"] for c in data["categories"]}

    def __len__(self):
        return len(self.image_ids)

    def image_info(self, image_id) -> dict:
        return self.coco.imgs[image_id]

    def image_path(self, image_id) -> Path:
        return self.image_root / self.coco.imgs[image_id]["file_name"]

    def load(self, image_id) -> Image.Image:
        return load_image(self.image_path(image_id))

    def annotations(self, image_id) -> list[dict]:
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))

    def instance_masks(self, image_id) -> np.ndarray:
        """bool ``[N, H, W]`` in annotation order."""
        info = self.coco.imgs[image_id]
        anns = self.annotations(image_id)
        if not anns:
            return np.zeros((0, info["height"], info["width"]), bool)
        return np.stack([self.coco.annToMask(a).astype(bool) for a in anns])

    def category_ids(self, image_id) -> list[int]:
        return [a["category_id"] for a in self.annotations(image_id)]

    def boxes(self, image_id) -> np.ndarray:
        """``[N, 4]`` xywh."""
        return np.array([a["bbox"] for a in self.annotations(image_id)], dtype=float).reshape(-1, 4)

    def semantic_mask(self, image_id) -> np.ndarray:
        """int32 ``[H, W]``: 0 background, else the category id (later instances drawn on top)."""
        masks = self.instance_masks(image_id)
        info = self.coco.imgs[image_id]
        sem = np.zeros((info["height"], info["width"]), np.int32)
        for m, c in zip(masks, self.category_ids(image_id)):
            sem[m] = c
        return sem


class CocoCaptions:
    """COCO captions file: ``captions(image_id) -> list[str]``."""

    def __init__(self, ann_file):
        data = _read_json(ann_file)
        if "annotations" not in data:
            raise ValueError(f"{ann_file} is not a COCO captions file: no 'annotations' list")
        self._caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            self._caps.setdefault(a["image_id"], []).append(a["caption"])
        self.image_ids = sorted({im["id"] for im in data.get("images", [])} | set(self._caps))

    def captions(self, image_id) -> list[str]:
        return list(self._caps.get(image_id, []))


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


class VocSegmentation:
    """PASCAL VOC segmentation layout: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 =
    ignore), ``SegmentationObject/``, ``ImageSets/Segmentation/<split>.txt``."""

    def __init__(self, root, split: str = "val"):
        self.root = Path(root)
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise FileNotFoundError(f"{ids_file} not found: is {self.root} a VOC root (VOCdevkit/VOC2012)?")
        self.ids = [l.strip() for l in ids_file.read_text().splitlines() if l.strip()]

    def __len__(self):
        return len(self.ids)

    def load(self, image_id):
        """``(PIL image, semantic int64 [H, W], instance int64 [H, W] or None)``."""
        img = load_image(self.root / "JPEGImages" / f"{image_id}.jpg")
        sem = np.array(Image.open(self.root / "SegmentationClass" / f"{image_id}.png"), dtype=np.int64)
        obj_path = self.root / "SegmentationObject" / f"{image_id}.png"
        inst = np.array(Image.open(obj_path), dtype=np.int64) if obj_path.is_file() else None
        return img, sem, inst
