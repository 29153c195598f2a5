"""Every real segmentation dataset by name: ``segmentation_dataset(name, root, split)``.

Names and protocols: ``voc`` (21), ``voc_aug`` (trainaug), ``context`` (60, GroupViT's Pascal Context),
``context59``, ``coco_object`` (81, as GroupViT converts COCO), ``ade20k`` (150, zero label reduced) for
GroupViT's zero-shot evaluation; ``cocostuff27``, ``cityscapes27``, ``potsdam3`` (STEGO's label maps) for the
frozen-feature probes.
"""

from __future__ import annotations

from nbsupport.data.datasets.ade20k import DATASETS as _ADE20K
from nbsupport.data.datasets.base import SegmentationDataset
from nbsupport.data.datasets.cityscapes import DATASETS as _CITYSCAPES
from nbsupport.data.datasets.coco_object import DATASETS as _COCO_OBJECT
from nbsupport.data.datasets.cocostuff import DATASETS as _COCOSTUFF
from nbsupport.data.datasets.potsdam import DATASETS as _POTSDAM
from nbsupport.data.datasets.voc import DATASETS as _VOC


def _join(*parts: dict) -> dict[str, type[SegmentationDataset]]:
    out: dict[str, type[SegmentationDataset]] = {}
    for part in parts:
        for name, cls in part.items():
            if name in out:
                raise ValueError(f"dataset name {name!r} defined twice ({out[name].__name__}, {cls.__name__})")
            out[name] = cls
    return out


#: name -> dataset class, for :func:`segmentation_dataset`.
DATASETS: dict[str, type[SegmentationDataset]] = _join(_VOC, _COCO_OBJECT, _ADE20K, _COCOSTUFF, _CITYSCAPES, _POTSDAM)


def segmentation_dataset(name: str, root, split: str | None = None) -> SegmentationDataset:
    """The dataset ``name`` (:data:`DATASETS`) read from ``root`` in its official layout; ``split=None`` is
    the dataset's own default (``val`` for most, ``train_aug`` for ``voc_aug``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    return cls(root) if split is None else cls(root, split)


def layouts() -> dict[str, str]:
    """name -> the folder layout each dataset expects (its ``LAYOUT`` line; errors and the README quote it)."""
    return {name: cls.LAYOUT for name, cls in sorted(DATASETS.items())}
