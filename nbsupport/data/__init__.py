"""Datasets and loaders: robust image reading, image folders, COCO, captions, the synthetic world, and the
real benchmarks in their official layouts (:mod:`nbsupport.data.datasets`: VOC, Pascal Context, COCO-Object,
ADE20K, ...)."""

from __future__ import annotations

from .captions import CaptionImages
from .coco import CocoCaptions, CocoInstances, read_coco_json
from .datasets.ade20k import ADE20K, ADE20K_CLASSES
from .datasets.coco_object import COCO_OBJECT_CLASSES, COCOObject
from .datasets.voc import (
    CONTEXT59_CLASSES,
    CONTEXT_CLASSES,
    VOC_CLASSES,
    VOC_DEVKIT_CLASSES,
    PascalContext,
    PascalContext59,
    PascalVOC,
    PascalVOCAug,
    voc_colormap,
)
from .images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageLoadError,
    collate_skip_bad,
    denormalize,
    image_to_tensor,
    list_images,
    load_image,
    load_images,
    resolve_image_path,
)
from .scenes import synthetic_captions, synthetic_class_names, synthetic_coco, synthetic_scenes

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CaptionImages",
    "COCO_OBJECT_CLASSES",
    "COCOObject",
    "CocoCaptions",
    "CocoInstances",
    "collate_skip_bad",
    "CONTEXT59_CLASSES",
    "CONTEXT_CLASSES",
    "denormalize",
    "IMAGE_EXTENSIONS",
    "image_to_tensor",
    "ImageFolderDataset",
    "ImageLoadError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "list_images",
    "load_image",
    "load_images",
    "PascalContext",
    "PascalContext59",
    "PascalVOC",
    "PascalVOCAug",
    "read_coco_json",
    "resolve_image_path",
    "synthetic_captions",
    "synthetic_class_names",
    "synthetic_coco",
    "synthetic_scenes",
    "VOC_CLASSES",
    "voc_colormap",
    "VOC_DEVKIT_CLASSES",
]
