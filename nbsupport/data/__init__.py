"""Robust image loading and the dataset layouts the notebooks read (image folders, COCO, VOC).

Every loader either returns an RGB image or raises :class:`ImageLoadError` naming the file and the
reason; batch helpers skip such files and report them instead of crashing a long job.
"""
from __future__ import annotations

import contextlib
import io
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
    """An image that cannot be used; ``.path`` is the file, ``.reason`` why (both in the message)."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot use image {self.path}: {reason}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16-bit scaled by 1/257, 32-bit int / float
    stretched min-max, everything else through Pillow's converter."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = 255 * (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    if im.mode == "LAB":  # Pillow has no direct LAB -> RGB path
        from skimage.color import lab2rgb

        lab = np.asarray(im, dtype=np.float64)
        lab = np.stack([lab[..., 0] * 100 / 255, lab[..., 1] - 128, lab[..., 2] - 128], -1)
        return Image.fromarray((lab2rgb(lab) * 255).round().astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path, min_size: int = 1) -> Image.Image:
    """An RGB PIL image with its EXIF orientation applied.

    Grayscale, palette, CMYK, 16-bit and float images are converted; alpha is composited on white.
    The file is fully decoded here, so truncated or corrupt files fail now rather than deep in a
    batch job. Missing files, non-images, undecodable or too-large files and images smaller than
    ``min_size`` pixels on either side raise :class:`ImageLoadError` naming the file and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    if not path.is_file():
        raise ImageLoadError(path, "file does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im.load()
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    except Exception as e:  # any other decoder failure still names the file
        raise ImageLoadError(path, f"cannot decode ({type(e).__name__}: {e})") from None
    if min(im.size) < min_size:
        raise ImageLoadError(path, f"{im.size[0]}x{im.size[1]} px is smaller than the minimum {min_size} px")
    return im


def _size_hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    else:
        try:
            hw = tuple(int(x) for x in size)
        except (TypeError, ValueError):
            hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be None, a positive int or an (H, W) pair, got {size!r}")
    return hw


def image_to_tensor(img, size=None, patch: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised float tensor ``[3, H, W]`` from a PIL image or a uint8 array ``[H, W, 3]`` (or ``[H, W]``).

    ``size``: int -> ``size x size`` ignoring the aspect ratio (LANCZOS, as MaskCut does); ``(H, W)`` ->
    that; None -> unchanged. ``patch``: crop bottom/right to a multiple of the patch size (ValueError
    naming the image size if it is smaller than one patch). Then ``(x / 255 - mean) / std``.
    """
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
            raise ValueError(f"array images must be uint8 [H, W, 3] or [H, W], got {img.dtype} {img.shape}")
        img = Image.fromarray(img).convert("RGB")
    elif isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = _to_rgb(img)
    else:
        raise TypeError(f"img must be a PIL image or a uint8 numpy array, got {type(img).__name__}")
    hw = _size_hw(size)
    if hw is not None and (img.height, img.width) != hw:
        img = img.resize((hw[1], hw[0]), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if patch:
        if int(patch) < 1:
            raise ValueError(f"patch must be a positive int, got {patch!r}")
        h, w = arr.shape[0] // patch * patch, arr.shape[1] // patch * patch
        if h == 0 or w == 0:
            raise ValueError(f"image of {arr.shape[1]}x{arr.shape[0]} px (W x H) is smaller than one {patch}-px patch")
        arr = arr[:h, :w]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def denormalize(t, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Inverse of :func:`image_to_tensor` for plotting: ``[3, H, W]`` or ``[B, 3, H, W]`` (tensor or
    array) -> float ``[..., H, W, 3]`` clipped to [0, 1]."""
    t = torch.as_tensor(t).detach().cpu().float()
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"denormalize expects [3, H, W] or [B, 3, H, W], got {tuple(t.shape)}")
    x = t * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).movedim(-3, -1).numpy()


def list_images(folder, recursive: bool = True) -> list[Path]:
    """Sorted image files of a folder (jpg/jpeg/png/bmp/tif/tiff/webp, case-insensitive; hidden files
    such as ``._x.jpg`` skipped). FileNotFoundError when the folder is missing or holds no images."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {folder} {what}")
    it = folder.rglob("*") if recursive else folder.glob("*")
    files = sorted(p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}"
                                + ("" if recursive else " (not searching subfolders)"))
    return files


def load_images(paths, size=None, patch: int | None = None):
    """Load a batch, skipping unusable files.

    Returns ``(images [B, 3, H, W], kept paths, failures [(path, message)])``; failures are also
    reported with one ``warnings.warn``. With ``size=None`` all usable images must share one size
    (ValueError listing the sizes otherwise: pass ``size``).
    """
    tensors, kept, failures = [], [], []
    for p in paths:
        try:
            tensors.append(image_to_tensor(load_image(p, min_size=patch or 1), size, patch))
            kept.append(Path(p))
        except ValueError as e:  # ImageLoadError, or too small for one patch
            failures.append((Path(p), str(e)))
    if failures:
        warnings.warn(f"skipped {len(failures)} unusable image(s): " + "; ".join(m for _, m in failures), stacklevel=2)
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)} (H, W): pass size= to resize them")
    batch = torch.stack(tensors) if tensors else torch.empty(0, 3, 0, 0)
    return batch, kept, failures


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder (or a list of paths) for DataLoader-driven batch jobs.

    An item is ``dict(image [3, H, W], path, orig_size=(H, W), index)``; an unusable file gives
    ``dict(error, path, index)`` instead of raising, so :func:`collate_skip_bad` can drop and report it.
    """

    def __init__(self, root_or_paths, size=None, patch: int | None = None):
        if isinstance(root_or_paths, (str, Path)):
            self.paths = list_images(root_or_paths)
        else:
            self.paths = [Path(p) for p in root_or_paths]
        self.size, self.patch = _size_hw(size), patch

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[i]
        try:
            im = load_image(p, min_size=self.patch or 1)
            return {"image": image_to_tensor(im, self.size, self.patch), "path": str(p),
                    "orig_size": (im.height, im.width), "index": i}
        except ValueError as e:
            return {"error": str(e), "path": str(p), "index": i}


def collate_skip_bad(batch):
    """``collate_fn`` for :class:`ImageFolderDataset`: ``(batch dict or None when nothing was usable,
    failures [(path, message)])``; the dict holds ``image [B, 3, H, W]`` and lists ``path``,
    ``orig_size``, ``index``."""
    good = [b for b in batch if "error" not in b]
    failures = [(b["path"], b["error"]) for b in batch if "error" in b]
    if not good:
        return None, failures
    shapes = {tuple(b["image"].shape) for b in good}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different sizes {sorted(shapes)}: give the dataset a size")
    out = {"image": torch.stack([b["image"] for b in good]), "path": [b["path"] for b in good],
           "orig_size": [b["orig_size"] for b in good], "index": [b["index"] for b in good]}
    return out, failures


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

    def __init__(self, ann_file, image_root=None):
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
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

    def __len__(self):
        return len(self.image_ids)

    def image_info(self, image_id) -> dict:
        try:
            return self.coco.imgs[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.ann_file} ({len(self.image_ids)} images, "
                           f"ids {self.image_ids[:3]}...)") from None

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


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
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
            raise FileNotFoundError(f"{ids_file} not found: is {self.root} a VOC root (VOCdevkit/VOC2012)?"
                                    + (f" splits there: {have}" if have else ""))
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
            raise ImageLoadError(sem_path, f"labels are {sem.shape[1]}x{sem.shape[0]} px but the image is "
                                           f"{img.width}x{img.height}")
        return img, sem, inst
