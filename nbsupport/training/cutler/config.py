"""CutLER run configuration: the dataclass of defaults (the reference schedule), its YAML recipes in
``recipes/`` (only what differs) and ``-o key=value`` overrides, through :mod:`nbsupport.core.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from nbsupport.core.config import load_config as _load
from nbsupport.training.cutler.heads import CASCADE_IOUS, CASCADE_WEIGHTS
from nbsupport.training.cutler.model import REFERENCE_MIN_SIZES

#: Recipes for ``cutler ... --config NAME`` (``paper``: the reference schedule; ``thesis``: its 90K-iteration
#: run of Tables 1-2; ``smoke``: a few CPU iterations).
RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class SelftrainConfig:
    """Self-training rounds (thesis 3.3): the schedule that replaces the training one (the fields of
    :data:`SELFTRAIN_TRAIN_KEYS`) and how the next round's pseudo-labels are chosen."""

    max_iter: int = 80000
    steps: list[int] = field(default_factory=list)
    lr: float = 0.005
    warmup_iters: int = 1000
    drop_loss: bool = False
    copy_paste_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    score_thresh: list[float] = field(default_factory=lambda: [0.7, 0.65])  # round 1, round 2 (and later)
    keep_iou: float = 0.5  # previous masks overlapping no kept prediction by this mask IoU stay
    detections: int = 30  # predictions per image when relabelling


@dataclass
class CutlerConfig:
    """Every setting of a CutLER run; the defaults are the reference (facebookresearch/CutLER's
    ``cascade_mask_rcnn_R_50_FPN.yaml``: Cascade Mask R-CNN R50-FPN, FPN with BatchNorm, ROIAlignV2,
    160k iterations at batch 16, lr 0.01, a x0.02 step at 80k, multi-scale 240-1024)."""

    CONFIG_NAME: ClassVar[str] = "CutLER"

    # model (build_model)
    arch: str = "resnet50"  # resnet50 | resnet50_v2 | resnet18 | resnet34
    head: str = "cascade"  # cascade (CutLER's headline model) | mask_rcnn (its Mask R-CNN release)
    cascade_ious: list[float] = field(default_factory=lambda: list(CASCADE_IOUS))  # match IoU per stage
    cascade_weights: list[list[float]] = field(default_factory=lambda: [list(w) for w in CASCADE_WEIGHTS])
    fpn_norm: bool = True  # BatchNorm in the FPN (CutLER: FPN NORM SyncBN); false: torchvision's plain FPN
    aligned_roi: bool = True  # detectron2's ROIAlignV2 pooler (as the releases); false: torchvision's RoIAlign
    weights: str | None = None  # ResNet backbone state dict (DINO ResNet-50); None = random init
    min_size: list[int] = field(default_factory=lambda: list(REFERENCE_MIN_SIZES))  # multi-scale short side
    max_size: int = 1333
    min_size_test: int = 800
    score_thresh: float = 0.0
    detections_per_img: int = 100
    rpn_post_nms_top_n_train: int = 4000
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.65
    box_batch_size_per_image: int = 512
    trainable_layers: int = 5  # FREEZE_AT 0
    representation_size: int = 1024  # box head width (smaller only for CPU smoke runs)
    drop_loss: bool = True
    drop_iou: float = 0.01
    # data
    train_json: str | None = None  # MaskCut / pseudo-label COCO JSON
    image_root: str | None = None  # default: images/ beside the JSON
    flip: bool = True
    copy_paste: bool = True
    copy_paste_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    copy_paste_max_cover: float | None = 0.5  # a pasted instance hiding >= this share of one is not pasted
    aspect_grouping: bool = True  # batches of one orientation (ASPECT_RATIO_GROUPING)
    num_workers: int = 4  # data-loading processes (decode + RLE masks ahead of the step)
    prefetch_factor: int = 2  # batches each worker keeps ready
    # solver (batch_size is the total over all processes, as detectron2's IMS_PER_BATCH)
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    weight_decay_norm: float = 0.0
    max_iter: int = 160000
    steps: list[int] = field(default_factory=lambda: [80000])
    gamma: float = 0.02
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad: float = 1.0
    amp: bool = True  # CUDA only
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    # bookkeeping
    checkpoint_period: int = 5000
    log_period: int = 20
    keep_checkpoint: bool = True  # keep checkpoint_last.pth after the run finished
    # self-training (`cutler selftrain`)
    selftrain: SelftrainConfig = field(default_factory=SelftrainConfig)


#: The self-training fields that replace the training ones of the same name.
SELFTRAIN_TRAIN_KEYS = ("max_iter", "steps", "lr", "drop_loss", "copy_paste_scale", "warmup_iters")

#: The fields passed to :func:`~nbsupport.training.cutler.model.build_model`.
MODEL_KEYS = (
    "arch",
    "head",
    "cascade_ious",
    "cascade_weights",
    "fpn_norm",
    "aligned_roi",
    "weights",
    "min_size",
    "max_size",
    "min_size_test",
    "score_thresh",
    "detections_per_img",
    "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "rpn_pre_nms_top_n_test",
    "rpn_nms_thresh",
    "box_batch_size_per_image",
    "trainable_layers",
    "representation_size",
    "drop_loss",
    "drop_iou",
)


def load_config(recipe="paper", overrides=None) -> CutlerConfig:
    """Defaults < recipe (``paper``, ``smoke``, ... in ``recipes/``, or a YAML path; None = the defaults) <
    ``overrides`` (``{dotted key: value}`` or ``["key=value", ...]``). Unknown keys are refused."""
    return _load(CutlerConfig, recipe, RECIPE_DIR, overrides)


def selftrain_config(cfg: CutlerConfig, **changes) -> CutlerConfig:
    """The training config of a self-training round: ``cfg`` with its ``selftrain`` schedule (max_iter, steps,
    lr, warm-up, DropLoss off, copy-paste scale) in place of the training one, then ``changes``."""
    st = cfg.selftrain
    return dataclasses.replace(cfg, **{k: getattr(st, k) for k in SELFTRAIN_TRAIN_KEYS}, **changes)


def model_kwargs(cfg: CutlerConfig) -> dict:
    """The :func:`~nbsupport.training.cutler.model.build_model` keywords of a config."""
    return {k: getattr(cfg, k) for k in MODEL_KEYS}
