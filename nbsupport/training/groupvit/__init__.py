"""Training and fine-tuning GroupViT (thesis sections 4.5, 4.7, 5.5-5.10, 5.14.3; Eq 21-26, 36-44, 52).

Losses (each a plain function of embeddings, tested on hand-computed cases):

- :func:`image_text_contrastive` - symmetric InfoNCE between images and captions (Eq 21-23);
- :func:`multi_label_contrastive` - images against ``K`` prompted labels each (Eq 24-26), with a
  ``<PAD>`` mask (section 5.7) and the non-noisy variant (section 5.10: identical label strings in the
  batch are positives, ``label_strings=``);
- :func:`ge_loss`, :func:`le_loss`, :func:`se_loss` - entropy regularisers (Eq 37, 41, 44) with pads;
- :func:`dino_distillation_loss` - cross-entropy of ``Attn^T Attn`` against ``softmax(DINOsim)`` (Eq 52).

Training (:func:`train`, command ``python -m nbsupport groupvit-train``): choose trainable components
(Table 5), AdamW, linear warm-up + cosine in cycles (5.3), colour jitter and random erasing (4.3), AMP on
CUDA, gradient clipping 5.0, DDP under ``torchrun`` with all-gathered embeddings (the non-noisy labels per
process, 5.10), atomic checkpoints and resume, JSON-lines metrics and zero-shot mIoU after every epoch (the
synthetic world, real benchmarks by GroupViT's protocol, or any ``validate=`` callable: :mod:`.validation`);
the schedule, checkpoints, metrics log and DDP set-up are the shared ones (:mod:`nbsupport.training.common`,
:mod:`nbsupport.core.distributed`). :mod:`.architecture`: the resized position embedding (5.9), 1 or 3
grouping blocks from 2 (5.13), DINO features in stage 2 (5.14.2). Configuration: :class:`TrainConfig` holds
the defaults, ``recipes/*.yaml`` what a named run changes.

The thesis's tables (:mod:`.sweep`, :mod:`.sweep_cli`, ``python -m nbsupport groupvit-sweep``): one sweep
file per table in ``sweeps/``, every (row, seed) run and the table printed beside the published numbers.
"""

from __future__ import annotations

from .architecture import DinoStage2GroupViT, prepare_model, regroup, regrouped_config, resize_pos_embed
from .augment import augment_batch, color_jitter, random_erase
from .cli import RECIPE_EXPORTS, config_from_args
from .components import components, init_image_encoder, init_like, set_trainable
from .config import RECIPE_DIR, TrainConfig
from .loop import LabelSampler, beats_floors, compute_losses, export_safetensors, label_pool, log, lr_at, train
from .losses import (
    affinity_logits,
    contrastive_from_logits,
    dino_distillation_loss,
    dino_similarity,
    ge_loss,
    group_balance_loss,
    group_label_contrastive,
    image_text_contrastive,
    le_loss,
    multi_label_contrastive,
    se_loss,
)
from .sweep import SWEEP_DIR, read_sweep, results_table, variant_config
from .validation import DatasetValidation, SyntheticValidation, evaluate, validation_from_config

__all__ = [
    "affinity_logits",
    "augment_batch",
    "color_jitter",
    "DatasetValidation",
    "DinoStage2GroupViT",
    "evaluate",
    "label_pool",
    "lr_at",
    "prepare_model",
    "random_erase",
    "read_sweep",
    "regroup",
    "regrouped_config",
    "resize_pos_embed",
    "results_table",
    "SWEEP_DIR",
    "SyntheticValidation",
    "validation_from_config",
    "variant_config",
    "beats_floors",
    "components",
    "compute_losses",
    "config_from_args",
    "contrastive_from_logits",
    "dino_distillation_loss",
    "dino_similarity",
    "export_safetensors",
    "ge_loss",
    "group_balance_loss",
    "group_label_contrastive",
    "image_text_contrastive",
    "init_image_encoder",
    "init_like",
    "LabelSampler",
    "le_loss",
    "log",
    "multi_label_contrastive",
    "RECIPE_DIR",
    "RECIPE_EXPORTS",
    "se_loss",
    "set_trainable",
    "train",
    "TrainConfig",
]
