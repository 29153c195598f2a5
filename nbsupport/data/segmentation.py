"""Images with semantic ground truth at a model's input size, from the synthetic world or PASCAL VOC: the one
input of the GroupViT analyses (thesis 4.6 zero-shot segmentation, 4.7 entropy maps, 5.4 visual grouping vs
visual-text alignment), so notebooks and benchmarks read scenes and labels the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nbsupport.data.images import image_to_tensor
from nbsupport.data.scenes import synthetic_class_names, synthetic_coco
from nbsupport.data.voc import VOC_CLASSES, VOC_IGNORE, VocSegmentation


@dataclass
class SegmentationSet:
    """``images [n, 3, S, S]`` (ImageNet-normalised), ``semantic [n, S, S]`` int64 (0 = background, ``i`` =
    ``class_names[i - 1]``, 255 = ignore), the object ``class_names`` and ``background_names`` (scene
    backgrounds scored as extra classes that map to 0; empty for VOC), ``source`` for titles."""

    images: torch.Tensor
    semantic: torch.Tensor
    class_names: list[str]
    background_names: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_classes(self) -> int:
        """Labels including background 0: ``len(class_names) + 1``."""
        return len(self.class_names) + 1

    @property
    def label_names(self) -> list[str]:
        """Name of every label ``0 .. n_classes - 1`` (``"background"`` first)."""
        return ["background", *self.class_names]


def resize_labels(semantic: np.ndarray, size: int) -> np.ndarray:
    """Label map ``[H, W]`` -> ``[size, size]`` int64 by nearest neighbour (labels are never blended)."""
    semantic = np.asarray(semantic)
    if semantic.shape == (size, size):
        return semantic.astype(np.int64)
    if semantic.min() < 0 or semantic.max() > 255:
        raise ValueError(f"labels must lie in 0..255 to be resized, got {semantic.min()}..{semantic.max()}")
    im = Image.fromarray(semantic.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(im).astype(np.int64)


def segmentation_set(
    dataset=None, n_images: int = 8, size: int = 128, seed: int = 0, split: str = "val"
) -> SegmentationSet:
    """The first ``n_images`` images of ``split`` with their semantic ground truth, resized to ``size x size``.

    ``dataset=None``: the synthetic world through :func:`~nbsupport.data.scenes.synthetic_coco` (scenes
    rendered at ``size`` px from ``scene_rng(seed, split, i)``; classes ``"striped triangle"`` ... in id
    order, backgrounds as extra names). A path: a PASCAL VOC root (``VOCdevkit/VOC2012``) read by
    :class:`~nbsupport.data.voc.VocSegmentation`, images LANCZOS- and labels nearest-resized, 255 kept as
    ignore, classes :data:`~nbsupport.data.voc.VOC_CLASSES` without background."""
    if int(n_images) < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images!r}")
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    n_images, size = int(n_images), int(size)
    if dataset is None:
        coco = synthetic_coco(n_images, seed=seed, size=size, split=split)
        ids = coco.image_ids[:n_images]
        images = [image_to_tensor(coco.load(i), size) for i in ids]
        semantic = [resize_labels(coco.semantic_mask(i), size) for i in ids]
        names, backgrounds = synthetic_class_names("name")
        source = f"synthetic {split} (seed {seed})"
    else:
        voc = VocSegmentation(dataset, split)
        if n_images > len(voc):
            raise ValueError(f"{n_images} images asked for, but VOC split {split!r} of {dataset} has {len(voc)}")
        images, semantic = [], []
        for i in voc.ids[:n_images]:
            img, sem, _ = voc.load(i)
            images.append(image_to_tensor(img, size))
            semantic.append(resize_labels(sem, size))
        names, backgrounds = list(VOC_CLASSES[1:]), []
        source = f"VOC {split}"
    sem = torch.from_numpy(np.stack(semantic))
    bad = sem[(sem != VOC_IGNORE) & ((sem < 0) | (sem > len(names)))]
    if bad.numel():
        raise ValueError(f"{source}: labels {sorted(set(bad.tolist()))[:5]} outside 0..{len(names)} (and 255)")
    return SegmentationSet(torch.stack(images), sem, list(names), list(backgrounds), source)
