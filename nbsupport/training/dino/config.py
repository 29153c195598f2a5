"""A DINO run's configuration: the dataclass of defaults (every field is a ``dino train`` option), its YAML
recipes in ``recipes/`` (only what differs from the defaults), named architectures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from nbsupport.training.dino.crops import CropBatches
from nbsupport.training.dino.losses import check_centering

#: Recipes for ``dino train --recipe NAME`` (e.g. ``tiny_dino_synth``, the run of the shipped weights).
RECIPE_DIR = Path(__file__).parent / "recipes"


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class Config:
    """Every setting of a DINO run, with its default (thesis 3.2: multi-crop, Eq 10 teacher EMA, Eq 11 loss)."""

    CONFIG_NAME: ClassVar[str] = "DINO"

    out: str = "runs/dino"
    arch: str = "custom"  # custom (the fields below) | small (ViT-S/8) | base (ViT-B/8)
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    data: str = "synthetic"  # synthetic | path to an image folder
    image_size: int = 64  # global crop size (and synthetic scene size unless scene_size is set)
    scene_size: int = 0  # synthetic world: render scenes at this size (0 = image_size); crops are resized
    max_objects: int = 3  # synthetic world: 1..max objects per scene (1 = object-centric, like ImageNet)
    object_scale_min: float = 0.2  # synthetic world: object diameter range, fraction of the scene side
    object_scale_max: float = 0.45
    local_size: int = 32
    n_local: int = 4
    global_scale_min: float = 0.4
    global_scale_max: float = 1.0
    local_scale_min: float = 0.05
    local_scale_max: float = 0.4
    color: float = 1.0  # colour-augmentation strength (0 = none)
    appearance: str = "shared"  # shared | per-view (synthetic world: each view re-rendered in new colours)
    per_view_ramp: int = 0  # per-view: views share one rendering with probability 1 -> 0 over these steps
    rotate: float = 0.0  # probability of a random quarter turn per crop (0 = off)
    out_dim: int = 1024
    head_hidden: int = 512
    head_bottleneck: int = 128
    cls_weight: float = 1.0  # weight of the image-level (CLS) term (0 = patch term only; needs dense_weight)
    dense_weight: float = 0.0  # weight of the patch-level term (0 = plain CLS DINO)
    dense_image_center: bool = False  # dense targets relative to each image's mean patch output
    koleo_weight: float = 0.0  # KoLeo spreading term on the student's global-crop CLS features (DINOv2; 0 = off)
    mask_ratio: float = 0.0  # iBOT masking of the student's global crops (0 = off; needs dense_weight)
    steps: int = 1000
    max_steps: int = 0  # > 0: stop after this step (the schedules still span `steps`); 0 = run all `steps`
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) after this wall-clock time
    batch_size: int = 32
    lr: float = 5e-4  # for batch 256, scaled linearly
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # = weight_decay for a constant weight decay
    momentum: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_steps: int = 0
    student_temp: float = 0.1
    centering: str = "center"  # center (DINO: EMA centre + sharpen) | sinkhorn (balanced targets, DINOv2)
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 0
    clip_grad: float = 3.0
    checkpoint_every: int = 200
    snapshot_every: int = 0  # also export the teacher backbone every N steps (0 = never)
    workers: int = 0
    seed: int = 0
    device: str = "auto"


ARCHS = {
    "small": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
}


def resolve_arch(cfg: Config) -> Config:
    """Apply a named architecture (``small``/``base``) and check the configuration."""
    if cfg.arch in ARCHS:
        for k, v in ARCHS[cfg.arch].items():
            setattr(cfg, k, v)
    elif cfg.arch != "custom":
        raise ValueError(f"arch must be one of custom, {', '.join(ARCHS)}; got {cfg.arch!r}")
    check_centering(cfg.centering)
    if cfg.max_steps < 0 or cfg.max_minutes < 0:
        raise ValueError(
            f"max_steps and max_minutes must be >= 0 (0 = no limit), got {cfg.max_steps}, {cfg.max_minutes}"
        )
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if not 0 < cfg.global_scale_min <= cfg.global_scale_max <= 1:
        raise ValueError(
            f"need 0 < global_scale_min <= global_scale_max <= 1, got {cfg.global_scale_min} and {cfg.global_scale_max}"
        )
    if cfg.scene_size < 0 or (cfg.scene_size and cfg.data != "synthetic"):
        raise ValueError(
            f"scene_size={cfg.scene_size}: a positive render size for the synthetic world only (0 = image_size)"
        )
    if cfg.per_view_ramp < 0 or (cfg.per_view_ramp and cfg.appearance != "per-view"):
        raise ValueError(f"per_view_ramp={cfg.per_view_ramp}: a number of steps >= 0, only with appearance='per-view'")
    if cfg.max_objects < 1 or not 0 < cfg.object_scale_min <= cfg.object_scale_max <= 1:
        raise ValueError(
            f"need max_objects >= 1 and 0 < object_scale_min <= object_scale_max <= 1, got "
            f"{cfg.max_objects}, {cfg.object_scale_min}, {cfg.object_scale_max}"
        )
    if cfg.cls_weight < 0 or cfg.dense_weight < 0 or cfg.cls_weight + cfg.dense_weight <= 0:
        raise ValueError(f"need cls_weight, dense_weight >= 0 and not both 0, got {cfg.cls_weight}, {cfg.dense_weight}")
    if cfg.mask_ratio > 0 and cfg.dense_weight <= 0:
        raise ValueError("mask_ratio > 0 needs dense_weight > 0 (masked patches are trained by the patch term)")
    CropBatches.check_appearance(cfg.appearance, synthetic=cfg.data == "synthetic")
    return cfg
