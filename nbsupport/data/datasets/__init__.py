"""The thesis's and the supporting papers' datasets in their official layouts (the real path).

``segmentation_dataset(name, root, split)`` returns a :class:`~nbsupport.data.datasets.base.SegmentationDataset`
(``ds[i] -> (PIL RGB image, int64 mask [H, W])``, 255 = ignore, ``ds.classes``, ``ds.ids``, ``ds.name``);
:data:`DATASETS` lists the names and :func:`layouts` the folder layout each one expects. Beside them: the
DAVIS-2017 video reader (:mod:`.davis`) and the ImageNet folder with CutLER's pseudo-label file
(:mod:`.imagenet`). Each dataset module also writes a tiny fixture of its layout (``write_fixture``).
"""

from __future__ import annotations

from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError, SegmentationDataset
from nbsupport.data.datasets.davis import Davis2017, DavisVideo
from nbsupport.data.datasets.imagenet import ImageNetFolder, fix_swapped_sizes, read_pseudo_labels
from nbsupport.data.datasets.registry import DATASETS, layouts, segmentation_dataset

__all__ = [
    "DATASETS",
    "DatasetLayoutError",
    "Davis2017",
    "DavisVideo",
    "fix_swapped_sizes",
    "IGNORE",
    "ImageNetFolder",
    "LabelError",
    "layouts",
    "read_pseudo_labels",
    "segmentation_dataset",
    "SegmentationDataset",
]
