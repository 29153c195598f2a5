"""Dense probes on frozen features: how much of a segmentation a backbone's patch features already hold.

The frozen-feature protocols of STEGO / HP (learned cluster probe, linear probe), Leopart / CrOC (k-means
with K = #classes, IoU matching, several seeds) and MMC (linear probe on concatenated layers), on any
feature grid ``[B, h, w, D]``:

- :mod:`.matching` - dataset-wide confusion, Hungarian matching by pixel counts or by IoU, accuracy and mIoU;
- :mod:`.cluster` - the cluster probe with both estimators (learned centres, k-means) over seeds;
- :mod:`.linear` - the 1x1-convolution linear probe and the papers' recipes;
- :mod:`.crf` - STEGO's multi-class dense CRF (optional ``pydensecrf``);
- :mod:`.cache` - feature sources (ViT facets, GroupViT tokens) and the fp16 feature cache;
- :mod:`.protocol` - probe datasets and the whole study of notebook 09;
- :mod:`.tables` - the papers' table layout with the published DINO numbers beside ours.
"""

__all__ = ["cache", "cluster", "crf", "linear", "matching", "protocol", "tables"]
