"""A GroupViT training run's configuration: the dataclass of defaults (every field is a ``groupvit-train``
option) and its YAML recipes in ``recipes/`` (only what differs), through :mod:`nbsupport.core.config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from nbsupport.data import caption_labels as textmod
from nbsupport.data.synthetic import OBJECT_SCALE

#: Recipes for ``groupvit-train --recipe NAME`` (``tiny_groupvit_synth``: the offline model's run).
RECIPE_DIR = Path(__file__).parent / "recipes"


# ============================================================================================== training
@dataclass
class TrainConfig:
    """Everything a run needs; every field is also a ``groupvit-train`` option (``--field-name``)."""

    CONFIG_NAME: ClassVar[str] = "GroupViT"

    out_dir: str = "runs/groupvit-train"
    model: str = "small"  # groupvit.load name or path (official weights to fine-tune, random:<config>)
    seed: int = 0
    data: str = "synthetic"  # synthetic | path to a COCO captions JSON (e.g. captions_train2017.json)
    image_root: str = ""  # image folder for a COCO captions file (default: images/ beside it)
    n_train: int = 512  # synthetic training scenes
    min_objects: int = 1  # objects per synthetic training scene (validation always uses 1-3)
    max_objects: int = 3
    min_object_scale: float = OBJECT_SCALE[0]  # synthetic training objects' diameter / image side (validation:
    max_object_scale: float = OBJECT_SCALE[1]  # always the world's default, synthetic.OBJECT_SCALE)
    image_size: int = 64  # training resolution (the thesis: 224, then 384)
    augment: str = "none"  # none | crop
    epochs: int = 2
    batch_size: int = 32  # per process; global = batch_size x world size
    lr: float = 1e-3  # base learning rate (thesis fine-tuning: 1.6e-3 x 256/4096 = 1e-4)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    cycles: int = 1  # cosine restarts (the thesis: 2)
    weight_decay: float = 0.05
    clip: float = 5.0
    trainable: str = "all"  # '+'-joined components: grouping_blocks, img_projector, projectors, ...
    num_labels: int = 3  # K labels per caption (0: caption-only contrastive loss)
    label_kind: str = "nouns"  # nouns | np | np+nouns
    pad: str = "pad"  # pad (<PAD> nulled, thesis 5.7) | repeat (the caption, original)
    tagger: str = "auto"  # auto | perceptron | wordnet | lexicon
    min_label_count: int = 0  # > 0: curated labels seen >= this many times come first (thesis 5.7.1)
    non_noisy: bool = False  # identical label strings in the batch are positives (thesis 5.10)
    w_multi_label: float = 1.0
    w_ge: float = 0.0
    w_le: float = 0.0
    w_se: float = 0.0
    w_dino: float = 0.0
    w_balance: float = 0.0  # group usage balance (group_balance_loss; not in the thesis)
    w_group_label: float = 0.0  # group_label_contrastive (best group per label; not in the thesis)
    dino_backbone: str = "random_tiny8"
    dino_layer: int = 9
    dino_variant: str = "eq52"  # eq52 (thesis) | rownorm (row-normalised Attn^T Attn, per-image centred keys)
    dino_temperature: float = 1.0  # softmax temperature of the DINO affinity target
    context_length: int = 77  # text tokens (shorter is faster for short captions)
    amp: bool = True  # autocast on CUDA only
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    log_every: int = 10
    val_images: int = 64  # synthetic validation scenes for per-epoch mIoU (0: off)
    val_size: int = 64
    val_class_names: str = "name"  # name ("striped triangle") | noun ("triangle")
    max_minutes: float = 0.0  # > 0: stop (checkpoint + validation) after this many minutes
    resume: bool = True  # continue from out_dir/last.pt when present
    threads: int = 0  # > 0: torch.set_num_threads
    init_image: str = ""  # a timm ViT (backbones.load name/path, e.g. tiny_dino_synth) whose patch
    # embedding, position embedding and blocks initialise the image encoder

    def validate(self):
        if self.label_kind not in textmod.KINDS:
            raise ValueError(f"label_kind must be one of {textmod.KINDS}, got {self.label_kind!r}")
        if self.pad not in ("pad", "repeat"):
            raise ValueError(f"pad must be 'pad' or 'repeat', got {self.pad!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (contrastive losses need negatives)")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.dino_variant not in ("eq52", "rownorm"):
            raise ValueError(f"dino_variant must be 'eq52' or 'rownorm', got {self.dino_variant!r}")
        if self.dino_temperature <= 0:
            raise ValueError(f"dino_temperature must be > 0, got {self.dino_temperature}")
