"""CutLER on torchvision: a class-agnostic Cascade Mask R-CNN (or Mask R-CNN) trained on MaskCut
pseudo-masks (thesis 1.2, 3.3, 5; Tables 1-2), and CutLER's released detectors converted to it.

The reference (facebookresearch/CutLER, a detectron2 fork) is rebuilt on ``torchvision.models.detection``:

* :func:`build_model` - R50-FPN with the reference settings: one foreground class, test score threshold 0,
  100 detections, RPN post-NMS top-k 4000 (train) and NMS 0.65, multi-scale training short side, all
  backbone layers trainable, BatchNorm trained in the backbone and the FPN (SyncBN only with > 1 process),
  detectron2's ROIAlignV2 pooler; ``head="cascade"`` (CutLER's headline model: three class-agnostic stages
  at IoU 0.5 / 0.6 / 0.7, :class:`CascadeRoIHeads`) or ``head="mask_rcnn"`` (:class:`DropLossRoIHeads`).
* DropLoss (:func:`droploss_fastrcnn_loss`, in every stage): the classification loss of a sampled RoI counts
  only when its *predicted* box has max IoU > 0.01 with some pseudo ground-truth box; mean over all RoIs,
  not renormalised; box and mask losses unchanged. ``drop_loss=False`` gives torchvision's loss exactly.
* :func:`copy_paste` - donor = the reversed batch, 1..n-1 donor instances, donor rescaled by U(0.3, 1),
  placed at a random offset; occluded target masks lose the pasted pixels, fully hidden ones are dropped,
  boxes recomputed from masks. Runs on the tensors' device (GPU in training).
* :class:`PseudoMaskDataset` - COCO-format pseudo-masks (MaskCut JSON) with bad-input handling.
* :class:`CutlerConfig` - the defaults (the reference schedule); ``recipes/*.yaml`` list what differs
  (``thesis``: Tables 1-2's 90K iterations, ``smoke``), ``-o key=value`` overrides
  (:mod:`nbsupport.core.config`, shared by every trainer).
* :func:`train` (loop), :func:`predict`, self-training (:func:`selftrain_round`) and the thesis experiment
  sets, flow and evaluation splits (:mod:`~nbsupport.training.cutler.experiments`), Tables 1-2 as the thesis
  lays them out beside the published numbers (:mod:`~nbsupport.training.cutler.tables`).
* :func:`load_detector` - a run's checkpoint or a released detectron2 file (``cutler_cascade_final.pth``,
  ``cutler_mrcnn_final.pth``) converted key by key (:mod:`~nbsupport.training.cutler.release`,
  :mod:`~nbsupport.training.cutler.d2format`).

Images are float ``[3, H, W]`` in 0..1 (the model normalises); targets are dicts with ``boxes`` float
``[N, 4]`` (x0, y0, x1, y1, pixel-edge convention), ``labels`` int64 ``[N]`` (all 1), ``masks`` uint8
``[N, H, W]``.
"""

from __future__ import annotations

from .augment import augment_batch, copy_paste, hflip
from .cli import config_from_cli
from .config import (
    MODEL_KEYS,
    RECIPE_DIR,
    SELFTRAIN_TRAIN_KEYS,
    CutlerConfig,
    SelftrainConfig,
    load_config,
    model_kwargs,
    selftrain_config,
)
from .data import (
    EvaluationSet,
    GroupedStreamBatchSampler,
    PseudoMaskDataset,
    StreamSampler,
    TrainingLabels,
    aspect_groups,
    collate,
    evaluation_set,
    folder_maskcut,
    sample_indices,
    training_labels,
)
from .experiments import (
    EXPERIMENTS,
    build_training_set,
    evaluate,
    evaluate_models,
    evaluate_splits,
    maskcut_detections,
    maskcut_filter,
    overlap_flags,
    selftrain_annotations,
    selftrain_round,
    selftrain_rounds,
    split_by_overlap,
    train_experiments,
)
from .heads import (
    CASCADE_IOUS,
    CASCADE_WEIGHTS,
    CascadeRoIHeads,
    DropLossRoIHeads,
    RoIAlignV2Pooler,
    droploss_fastrcnn_loss,
    stage_targets,
)
from .loop import load_trained, lr_schedule, train
from .model import (
    ARCHS,
    HEADS,
    REFERENCE_MIN_SIZES,
    build_model,
    load_backbone_weights,
    masks_to_boxes,
    set_drop_loss,
)
from .predict import predict, top_masks
from .release import RELEASES, load_detector, load_release, write_release_fixtures
from .tables import reference_table, thesis_tables

__all__ = [
    "ARCHS",
    "CASCADE_IOUS",
    "CASCADE_WEIGHTS",
    "CascadeRoIHeads",
    "HEADS",
    "load_detector",
    "load_release",
    "RELEASES",
    "RoIAlignV2Pooler",
    "stage_targets",
    "write_release_fixtures",
    "reference_table",
    "thesis_tables",
    "aspect_groups",
    "augment_batch",
    "build_model",
    "build_training_set",
    "collate",
    "config_from_cli",
    "copy_paste",
    "CutlerConfig",
    "droploss_fastrcnn_loss",
    "DropLossRoIHeads",
    "evaluate",
    "evaluate_models",
    "evaluate_splits",
    "evaluation_set",
    "EvaluationSet",
    "EXPERIMENTS",
    "folder_maskcut",
    "GroupedStreamBatchSampler",
    "hflip",
    "load_backbone_weights",
    "load_config",
    "load_trained",
    "lr_schedule",
    "maskcut_detections",
    "maskcut_filter",
    "masks_to_boxes",
    "MODEL_KEYS",
    "model_kwargs",
    "overlap_flags",
    "predict",
    "PseudoMaskDataset",
    "RECIPE_DIR",
    "REFERENCE_MIN_SIZES",
    "sample_indices",
    "selftrain_annotations",
    "selftrain_config",
    "selftrain_round",
    "selftrain_rounds",
    "SELFTRAIN_TRAIN_KEYS",
    "SelftrainConfig",
    "set_drop_loss",
    "split_by_overlap",
    "StreamSampler",
    "top_masks",
    "train",
    "train_experiments",
    "training_labels",
    "TrainingLabels",
]
