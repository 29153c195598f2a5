"""The stand-ins' configurations: one dataclass of defaults per trainer (every field documented), recipes in
``recipes/`` that list only what differs (:mod:`nbsupport.core.config`), chosen by the recipe's ``kind``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

#: Recipes for ``standin train --recipe NAME``.
RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class VitConfig:
    """A supervised ViT stand-in: a timm ViT (the tiny DINO's family) trained on the synthetic world's labels."""

    CONFIG_NAME: ClassVar[str] = "supervised ViT stand-in"

    kind: str = "vit"  # which trainer reads this recipe (vit | groupvit)
    out: str = "runs/standin_vit"
    export: str = ""  # also write the backbone (+ heads) as this .safetensors file ("" = only OUT/final.safetensors)
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    image_size: int = 128  # scene size (texture periods are fixed in pixels: train at the size of use)
    crop_size: int = 64  # train on patch-aligned crops of this size (0 = whole scenes): 4x cheaper at 128 px
    n_train: int = 1000  # train scenes rendered once (cached in data/generated/standins)
    max_objects: int = 3
    batch_size: int = 16
    steps: int = 2000  # the schedules span these steps
    max_minutes: float = 0.0  # > 0: wall-clock stop; the LR anneals by time or steps, whichever is further
    lr: float = 1.0e-3
    min_lr: float = 1.0e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    w_patch: float = 1.0  # cross-entropy of a linear head on the patch tokens (7 classes, background = 0)
    w_image: float = 0.5  # multi-label BCE of a linear head on the CLS token (6 object classes)
    w_keys: float = 0.2  # supervised-contrastive term on the last block's keys (same class = positive)
    key_temperature: float = 0.2
    key_patches: int = 256  # labelled patches sampled per step for the key term
    channel_shuffle: bool = True  # permute RGB per image: colour carries no class in this world
    flip: bool = True  # horizontal flips
    val_images: int = 16  # validation scenes for the patch accuracy logged at the end (0 = none)
    log_every: int = 25
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)


@dataclass
class GroupvitConfig:
    """A supervised GroupViT stand-in: captions' contrastive losses plus a grouping term that matches the
    final groups to the ground-truth segments (instances and background)."""

    CONFIG_NAME: ClassVar[str] = "supervised GroupViT stand-in"

    kind: str = "groupvit"
    out: str = "runs/standin_groupvit"
    export: str = ""  # also write the weights (fp16) as this .safetensors file
    model: str = "small128"  # GroupViT config (nbsupport.models.groupvit.CONFIGS)
    init_vit: str = ""  # start the image encoder from this ViT (backbone name or path; "" = random init)
    freeze_vit: bool = False  # keep the patch embedding and the first stage's blocks (started from init_vit) frozen
    image_size: int = 64
    n_train: int = 2000
    mix_size: int = 0  # > 0: every mix_every-th step trains on scenes rendered at this size (the notebooks' 128 px)
    mix_every: int = 4
    n_mix: int = 500  # scenes of the mix_size pool (batches of batch_size // 2)
    max_objects: int = 3
    batch_size: int = 16
    steps: int = 3000
    max_minutes: float = 0.0
    lr: float = 8.0e-4
    min_lr: float = 1.0e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    context_length: int = 24  # tokens per prompt / caption in training (the causal text encoder pools EOT)
    # Loss weights (terms in nbsupport.training.standins.groupvit.losses). The grouping terms are per patch and
    # start near log G nats; the text terms near log(prompts): the recipe weighs them 100 and 20.
    w_itc: float = 0.1  # image-caption contrastive (GroupViT's Eq 21-23)
    w_group: float = 100.0  # cross-entropy of every patch's group assignment to its Hungarian-matched group
    w_group1: float = 0.0  # the same for the first stage's assignment A^1: one Hungarian-matched group per segment
    w_group_text: float = 1.0  # matched group embeddings vs the prompts of their segment's class / background
    w_image_text: float = 0.5  # image embedding vs the prompts of the classes and background it shows
    w_dense: float = 0.0  # per-patch cross-entropy of the zero-shot labelling (Attn-mixed group-text softmax, Eq 33)
    w_segment_text: float = 0.0  # first-stage groups (stage-2 segment tokens) vs the prompts of the labels they took
    background_names: str = "own"  # own: a background is taught its scene's background name | any: any background name
    templates: str = "simple"  # prompt templates of the text terms: simple ("a photo of a {}.") | all (+ CLIP's 7)
    w_purity: float = 10.0  # entropy of the segments each first-stage group covers (groups inside one segment)
    assign_init: str = "default"  # default (GroupViT's init) | content (new groups start as the mean of their segments)
    group_context_scale: float = 0.1  # with assign_init content: start of the group tokens' shared-context LayerNorm
    balance_segments: bool = True  # per-patch terms weigh every segment (background, each object) equally
    background_group: bool = (
        True  # the background is always group 0 (of each matched stage); objects are matched to the others
    )
    val_images: int = 64  # validation scenes for the zero-shot mIoU logged at the end (0 = none)
    log_every: int = 25
    seed: int = 0
    threads: int = 0


CONFIGS = {"vit": VitConfig, "groupvit": GroupvitConfig}
