"""Datasets and loaders: robust image reading, image folders, COCO, PASCAL VOC, captions, the synthetic world."""

from __future__ import annotations

from .captions import CaptionImages
from .coco import CocoCaptions, CocoInstances, read_coco_json
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
from .voc import VOC_CLASSES, VOC_IGNORE, VocSegmentation, voc_colormap

__all__ = [
    "CaptionImages",
    "CocoCaptions",
    "CocoInstances",
    "collate_skip_bad",
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
    "read_coco_json",
    "resolve_image_path",
    "synthetic_captions",
    "synthetic_class_names",
    "synthetic_coco",
    "synthetic_scenes",
    "VOC_CLASSES",
    "voc_colormap",
    "VOC_IGNORE",
    "VocSegmentation",
]
