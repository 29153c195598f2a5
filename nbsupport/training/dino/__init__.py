"""A compact DINO self-distillation trainer (thesis section 3.2, Eq 10-11) for timm ViTs of any size.

A student and a momentum teacher see different crops of the same image: the 2 global crops go through
the teacher, all crops (global + local) through the student. Each network ends in a projection head
with a weight-normalised last layer producing ``K`` prototype scores. The image-level loss is the
cross-entropy between the teacher's *centred and sharpened* distribution (temperature ``tau_t``, centre
``c`` an EMA of teacher outputs) and the student's distribution (``tau_s``) over every pair of different
views (Eq 11). The teacher is an exponential moving average of the student (Eq 10), momentum
cosine-scheduled to 1.

Plain CLS-token DINO learns *dense* (patch) features slowly at small budgets, so an optional patch-level
term (``dense_weight > 0``) applies the same centred/sharpened cross-entropy to patch tokens: each student
patch predicts the teacher's patch distribution at the *same image location* in the other global crop
(crop geometry is tracked, the teacher grid is bilinearly sampled there), and, when ``mask_ratio > 0``,
iBOT-style masked patches of a global crop predict the teacher's unmasked view of that crop.
The patch term has its own centre. With ``dense_weight=0`` it is plain DINO.

Runs on CPU (tests, the tiny offline model), one GPU (bf16 autocast) or several with ``torchrun`` (DDP;
centres averaged across processes). Data: the synthetic scene world rendered on the fly (seeded, endless)
or an image folder (``--data PATH``). Checkpoints are written atomically; a run resumes by default with
the same data order and schedules. :class:`Config` holds the defaults and ``recipes/*.yaml`` what a named run
changes (one mechanism for every trainer: :mod:`nbsupport.core.config`).

    python -m nbsupport dino train --out runs/dino --steps 6000 --max-minutes 50
    python -m nbsupport dino train --recipe tiny_dino_synth --out runs/tiny_dino   # the shipped tiny DINO
    python -m nbsupport dino export runs/dino/checkpoint.pth --out data/weights/tiny_dino_synth.safetensors
"""

from __future__ import annotations

from .cli import config_from_cli
from .config import ARCHS, RECIPE_DIR, Config, resolve_arch
from .crops import CropBatches, MultiCrop, block_mask, sample_box
from .loop import build_networks, crop_stream, export_teacher, schedules, train
from .losses import (
    CENTERINGS,
    DensePatchLoss,
    DINOLoss,
    check_centering,
    koleo_loss,
    locate_in_crop,
    patch_centres,
    sinkhorn_knopp,
)
from .model import DINOHead, Network, ema_update
from .quality import backbone_quality, fft_texture, maskcut_ceiling, texture_reference

__all__ = [
    "ARCHS",
    "backbone_quality",
    "block_mask",
    "build_networks",
    "CENTERINGS",
    "check_centering",
    "Config",
    "config_from_cli",
    "crop_stream",
    "CropBatches",
    "DensePatchLoss",
    "DINOHead",
    "DINOLoss",
    "ema_update",
    "export_teacher",
    "fft_texture",
    "koleo_loss",
    "locate_in_crop",
    "maskcut_ceiling",
    "MultiCrop",
    "Network",
    "patch_centres",
    "RECIPE_DIR",
    "resolve_arch",
    "sample_box",
    "schedules",
    "sinkhorn_knopp",
    "texture_reference",
    "train",
]
