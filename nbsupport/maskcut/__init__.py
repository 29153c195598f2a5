"""MaskCut (thesis 1.2, 3.3): normalised cuts on a ViT patch graph -> object masks -> COCO JSON -> mask AP."""

from __future__ import annotations

from .cli import run_cli
from .coco import CATEGORIES, coco_annotations, coco_json, merge
from .cut import auto_tau, bipartition, maskcut, maskcut_single, resolve_tau
from .pipeline import dataset_masks, image_masks, masks_from_features, score, score_models, to_coco
from .refine import crf_available, crf_refine, pixel_masks
from .solver import BLOCK, SolverStats, affinity, cosine_matrix, second_eigenvector

__all__ = [
    "affinity",
    "auto_tau",
    "bipartition",
    "BLOCK",
    "CATEGORIES",
    "coco_annotations",
    "coco_json",
    "cosine_matrix",
    "crf_available",
    "crf_refine",
    "dataset_masks",
    "image_masks",
    "maskcut",
    "maskcut_single",
    "masks_from_features",
    "merge",
    "pixel_masks",
    "resolve_tau",
    "run_cli",
    "score",
    "score_models",
    "second_eigenvector",
    "SolverStats",
    "to_coco",
]
