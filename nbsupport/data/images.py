"""Robust image loading and the dataset layouts the notebooks read (image folders, COCO, VOC).

Every loader either returns an RGB image or raises :class:`ImageLoadError` naming the file and the
reason; batch helpers skip such files and report them instead of crashing a long job.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nbsupport.core.paths import data_dir, project_root

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


def resolve_image_path(path) -> Path:
    """Where a user-given image name points: ``path`` as given (``~`` expanded) when it exists, else
    relative to the repository root, else a name in ``data/samples/``; unchanged when none exists (so
    :func:`load_image` names the missing file)."""
    p = Path(path).expanduser()
    for cand in (p, project_root() / path, data_dir() / "samples" / path):
        if cand.exists():
            return cand
    return Path(path)


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
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}"
            + ("" if recursive else " (not searching subfolders)")
        )
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
            return {
                "image": image_to_tensor(im, self.size, self.patch),
                "path": str(p),
                "orig_size": (im.height, im.width),
                "index": i,
            }
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
    out = {
        "image": torch.stack([b["image"] for b in good]),
        "path": [b["path"] for b in good],
        "orig_size": [b["orig_size"] for b in good],
        "index": [b["index"] for b in good],
    }
    return out, failures
