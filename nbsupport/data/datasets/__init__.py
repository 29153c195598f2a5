"""The thesis's and the supporting papers' datasets in their official layouts (the real path).

``segmentation_dataset(name, root, split)`` returns a :class:`~nbsupport.data.datasets.base.SegmentationDataset`;
:data:`DATASETS` lists the names and :func:`layouts` the folder layout each one expects. Each dataset
module defines its classes and a ``DATASETS`` dict of the names it provides; :mod:`.registry` joins them.
"""

from __future__ import annotations

from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError, SegmentationDataset

__all__ = ["DatasetLayoutError", "IGNORE", "LabelError", "SegmentationDataset"]
