"""MaskCut (thesis 1.2, 3.3): normalised cuts on a ViT patch graph -> object masks -> COCO JSON."""

from __future__ import annotations

from .cli import run_cli
from .coco import CATEGORIES, coco_annotations, coco_json, merge
from .cut import auto_tau, bipartition, maskcut, maskcut_single, resolve_tau
from .refine import crf_refine, pixel_masks
from .solver import BLOCK, STATS, SolverStats, affinity, cosine_matrix, second_eigenvector

__all__ = [
    "affinity",
    "auto_tau",
    "bipartition",
    "BLOCK",
    "CATEGORIES",
    "coco_annotations",
    "coco_json",
    "cosine_matrix",
    "crf_refine",
    "maskcut",
    "maskcut_single",
    "merge",
    "pixel_masks",
    "resolve_tau",
    "run_cli",
    "second_eigenvector",
    "SolverStats",
    "STATS",
]
