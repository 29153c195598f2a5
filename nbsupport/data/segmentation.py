"""Images with semantic ground truth at a model's input size, from the synthetic world or a real benchmark
(PASCAL VOC, Pascal Context, COCO-Object, ADE20K, ...): the one input of the GroupViT analyses (thesis 4.6
zero-shot segmentation, 4.7 entropy maps, 5.4 visual grouping vs visual-text alignment), so notebooks and
benchmarks read scenes and labels the same way.

Pixels are kept as uint8 and normalised per batch when read (``data.images[a:b]``): VOC train + val at
448 px is ~1.7 GB as bytes instead of ~7 GB as floats, with the same numbers as ``image_to_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nbsupport.data.datasets.base import IGNORE, SegmentationDataset
from nbsupport.data.datasets.registry import DATASETS
from nbsupport.data.datasets.voc import PascalVOC
from nbsupport.data.images import IMAGENET_MEAN, IMAGENET_STD
from nbsupport.data.scenes import synthetic_class_names, synthetic_coco


class NormalizedImages:
    """ImageNet-normalised float32 images ``[n, 3, S, S]`` over uint8 ``pixels``, normalised when read:
    ``x[i]`` / ``x[a:b]`` give tensors (``(p / 255 - mean) / std``, bit for bit what
    :func:`~nbsupport.data.images.image_to_tensor` gives), so a loop over batches never holds the whole set
    as floats. ``len``, ``shape``, ``ndim``, iteration and ``.to`` work as on a tensor; torch functions and
    other tensor methods get the whole normalised tensor (:meth:`tensor`)."""

    def __init__(self, pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be uint8 [n, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels
        self._mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def _normalise(self, p: torch.Tensor) -> torch.Tensor:
        return (p.to(torch.float32) / 255.0 - self._mean) / self._std

    def __getitem__(self, idx) -> torch.Tensor:
        return self._normalise(self.pixels[idx])

    def __len__(self) -> int:
        return len(self.pixels)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    @property
    def ndim(self) -> int:
        return 4

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def tensor(self) -> torch.Tensor:
        """All images as one normalised float tensor (``n`` x 3 x S x S x 4 bytes)."""
        return self._normalise(self.pixels)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.tensor().to(*args, **kwargs)

    def __repr__(self) -> str:
        return f"NormalizedImages(n={len(self)}, shape={tuple(self.shape)}, stored as uint8)"

    def __getattr__(self, name):  # other tensor methods (.float(), .mean(), ...) on the whole set
        if name.startswith("_") or name == "pixels":
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(a):
            if isinstance(a, NormalizedImages):
                return a.tensor()
            if isinstance(a, (list, tuple)):
                return type(a)(unwrap(b) for b in a)
            return a

        return func(*unwrap(tuple(args)), **{k: unwrap(v) for k, v in (kwargs or {}).items()})


@dataclass
class SegmentationSet:
    """``pixels [n, 3, S, S]`` uint8 (read normalised through :attr:`images`), ``semantic [n, S, S]`` int64
    (0 = background, ``i`` = ``class_names[i - 1]``, 255 = ignore), the object ``class_names`` and
    ``background_names`` (scene backgrounds scored as extra classes that map to 0; empty for real data),
    ``source`` for titles. ``has_background``: False for a dataset without a background class (Pascal
    Context-59, ADE20K): its classes are shifted to ``1..C`` and label 0 never occurs. ``dataset``: the real
    dataset the images came from (None for the synthetic world), read again by :meth:`full_resolution` for
    protocols scored at the original resolution."""

    pixels: torch.Tensor
    semantic: torch.Tensor
    class_names: list[str]
    background_names: list[str] = field(default_factory=list)
    source: str = ""
    has_background: bool = True
    dataset: SegmentationDataset | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def images(self) -> NormalizedImages:
        """The images ``[n, 3, S, S]`` ImageNet-normalised, normalised per index or slice."""
        return NormalizedImages(self.pixels)

    @property
    def n_classes(self) -> int:
        """Labels including background 0: ``len(class_names) + 1``."""
        return len(self.class_names) + 1

    @property
    def label_names(self) -> list[str]:
        """Name of every label ``0 .. n_classes - 1`` (``"background"`` first)."""
        return ["background", *self.class_names]

    def full_resolution(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``i`` at its original size: ``(image [3, H, W]`` ImageNet-normalised as :attr:`images`,
        ``semantic [H, W]`` int64 with this set's labels)``, read again from :attr:`dataset` (the original
        resolution GroupViT's evaluation scores against); the synthetic world's scenes are rendered at the set's
        size, so they are their own full resolution."""
        if not 0 <= int(i) < len(self):
            raise IndexError(f"image {i} of a set of {len(self)}")
        if self.dataset is None:
            return self.images[int(i)], self.semantic[int(i)]
        img, mask = self.dataset[int(i)]
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return NormalizedImages(pixels[None])[0], torch.from_numpy(_labels(mask, self.has_background))


def _labels(mask: np.ndarray, has_background: bool) -> np.ndarray:
    """A dataset's class ids as a set's labels: unchanged with a background class, else ``0..C-1 -> 1..C``
    (255 kept), so label 0 keeps meaning background."""
    mask = np.asarray(mask).astype(np.int64)
    return mask if has_background else np.where(mask == IGNORE, IGNORE, mask + 1)


def resize_labels(semantic: np.ndarray, size: int) -> np.ndarray:
    """Label map ``[H, W]`` -> ``[size, size]`` int64 by nearest neighbour (labels are never blended)."""
    semantic = np.asarray(semantic)
    if semantic.shape == (size, size):
        return semantic.astype(np.int64)
    if semantic.min() < 0 or semantic.max() > 255:
        raise ValueError(f"labels must lie in 0..255 to be resized, got {semantic.min()}..{semantic.max()}")
    im = Image.fromarray(semantic.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(im).astype(np.int64)


def image_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """uint8 ``[3, size, size]`` of an RGB image, LANCZOS-resized as :func:`~nbsupport.data.images.image_to_tensor`
    resizes it (its normalisation of these bytes gives exactly that function's tensor)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def open_dataset(dataset, split: str = "val", root=None) -> SegmentationDataset:
    """A :class:`~nbsupport.data.datasets.base.SegmentationDataset` from what :func:`segmentation_set` takes:
    the object itself, a name of :data:`DATASETS` with its ``root``, or a path (a PASCAL VOC root,
    ``VOCdevkit/VOC2012``, as before names existed)."""
    if isinstance(dataset, SegmentationDataset):
        return dataset
    if isinstance(dataset, str) and dataset in DATASETS:
        if root is None:
            raise ValueError(f"dataset {dataset!r} needs root= (the folder of its official layout)")
        return DATASETS[dataset](root, split)
    if isinstance(dataset, str) and not Path(dataset).expanduser().exists() and "/" not in dataset:
        raise ValueError(f"unknown dataset {dataset!r}: names are {sorted(DATASETS)} (or pass a dataset object)")
    if isinstance(dataset, (str, Path)) and root is None:
        return PascalVOC(dataset, split)
    raise ValueError(
        f"dataset must be None (synthetic), a SegmentationDataset, one of {sorted(DATASETS)} with root=, or a "
        f"VOC root path; got {dataset!r}" + (f" with root={root!r}" if root is not None else "")
    )


def segmentation_set(
    dataset=None, n_images: int = 8, size: int = 128, seed: int = 0, split: str = "val", root=None
) -> SegmentationSet:
    """The first ``n_images`` images of ``split`` with their semantic ground truth, resized to ``size x size``.

    ``dataset=None``: the synthetic world through :func:`~nbsupport.data.scenes.synthetic_coco` (scenes
    rendered at ``size`` px from ``scene_rng(seed, split, i)``; classes ``"striped triangle"`` ... in id
    order, backgrounds as extra names). Otherwise a real dataset (:func:`open_dataset`): a name of
    :data:`DATASETS` (``"voc"``, ``"voc_aug"``, ``"context"``, ``"context59"``, ``"coco_object"``,
    ``"ade20k"``) with ``root``, a dataset object, or a VOC root path; images LANCZOS- and labels
    nearest-resized, 255 kept as ignore, the dataset's class names without background (GroupViT's names:
    VOC's "table", "plant", "monitor"); the set keeps the dataset for :meth:`SegmentationSet.full_resolution`."""
    if int(n_images) < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images!r}")
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    n_images, size = int(n_images), int(size)
    has_background = True
    if dataset is None:
        coco = synthetic_coco(n_images, seed=seed, size=size, split=split)
        ids = coco.image_ids[:n_images]
        pixels = [image_pixels(coco.load(i), size) for i in ids]
        semantic = [resize_labels(coco.semantic_mask(i), size) for i in ids]
        names, backgrounds = synthetic_class_names("name")
        source = f"synthetic {split} (seed {seed})"
    else:
        ds = open_dataset(dataset, split, root)
        if n_images > len(ds):
            raise ValueError(
                f"{n_images} images asked for, but {ds.name} split {ds.split!r} of {ds.root} has {len(ds)}"
            )
        has_background = bool(ds.classes) and ds.classes[0] == "background"
        pixels, semantic = [], []
        for i in range(n_images):
            img, mask = ds[i]
            pixels.append(image_pixels(img, size))
            semantic.append(resize_labels(_labels(mask, has_background), size))
        names = list(ds.classes[1:] if has_background else ds.classes)
        backgrounds = []
        source = f"{ds.name} {ds.split}"
    sem = torch.from_numpy(np.stack(semantic))
    bad = sem[(sem != IGNORE) & ((sem < 0) | (sem > len(names)))]
    if bad.numel():
        raise ValueError(f"{source}: labels {sorted(set(bad.tolist()))[:5]} outside 0..{len(names)} (and 255)")
    return SegmentationSet(
        torch.stack(pixels),
        sem,
        list(names),
        list(backgrounds),
        source,
        has_background,
        None if dataset is None else ds,
    )
