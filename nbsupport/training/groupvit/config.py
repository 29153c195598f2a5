"""A GroupViT training run's configuration: the dataclass of defaults (every field is a ``groupvit-train``
option) and its YAML recipes in ``recipes/`` (only what differs), through :mod:`nbsupport.core.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    color_jitter: float = 0.0  # > 0: brightness / contrast / saturation jitter strength (thesis 4.3; GroupViT 0.4)
    random_erase: float = 0.0  # probability of one erased rectangle per image (thesis 4.3; GroupViT 0.25)
    epochs: int = 2
    batch_size: int = 32  # per process; global = batch_size x world size
    lr: float = 1e-3  # base learning rate (thesis fine-tuning: 1.6e-3 x 256/4096 = 1e-4)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    cycles: int = 1  # cosine annealing cycles (the thesis: 2)
    decay_epochs: float = 0.0  # 0: the cycles share every epoch after the warm-up; > 0: each cycle lasts this
    # many epochs, counted from step 0 as GroupViT's timm scheduler counts, then min_lr (thesis 5.3: 12)
    weight_decay: float = 0.05
    clip: float = 5.0
    trainable: str = "all"  # '+'-joined components: grouping_blocks, img_projector, projectors, ...
    num_labels: int = 3  # K labels per caption (0: caption-only contrastive loss)
    label_kind: str = "nouns"  # nouns | np | np+nouns
    pad: str = "pad"  # pad (<PAD> nulled, thesis 5.7) | repeat (the caption, original)
    tagger: str = "auto"  # auto | perceptron | wordnet | lexicon
    min_label_count: int = 0  # > 0: curated labels seen >= this many times come first (thesis 5.7.1)
    non_noisy: bool = False  # identical label strings in the batch are positives (thesis 5.10)
    non_noisy_pool: str = "local"  # local (each process's mini-batch, thesis 5.10) | global (all-gathered)
    w_multi_label: float = 1.0
    w_ge: float = 0.0
    w_le: float = 0.0
    w_se: float = 0.0
    w_dino: float = 0.0
    w_balance: float = 0.0  # group usage balance (group_balance_loss; not in the thesis)
    w_group_label: float = 0.0  # group_label_contrastive (best group per label; not in the thesis)
    a_st_scale: str = "logit_scale"  # A_ST of LE / SE: logit_scale (x GroupViT's 1/tau) | none (Eq 28 as written)
    dino_backbone: str = "random_tiny8"
    dino_layer: int = 9
    dino_facet: str = "key"  # DINO facet for Eq 52's DINOsim and for dino_stage2 (key | query | value | token)
    dino_reduction: str = "sum"  # sum (Eq 52 as written: summed over the N x N pairs) | mean (divided by N)
    dino_stage2: bool = False  # thesis 5.14.2: DINO patch features replace stage 1's segments as stage 2's input
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
    val_datasets: list[str] = field(default_factory=list)  # per-epoch zero-shot mIoU on these instead of the
    # synthetic scenes: voc | context | coco_object | ade20k | ... (GroupViT's protocol) | synthetic
    val_roots: dict[str, str] = field(default_factory=dict)  # dataset name -> root of its official layout
    val_split: str = "val"
    val_limit: int = 0  # > 0: only the first images of each validation dataset
    val_bg_thresh: dict[str, float] = field(default_factory=dict)  # per dataset; default thesis 5.3 (voc 0.95,
    # coco_object 0.9, context 0.35, ade20k 0.95)
    val_short_side: int = 448  # GroupViT's protocol (thesis 5.3): short side, sliding window, stride
    val_window: int = 448
    val_stride: int = 224
    val_every: int = 1  # validate after every N-th epoch (and after the last)
    max_minutes: float = 0.0  # > 0: stop (checkpoint + validation) after this many minutes
    resume: bool = True  # continue from out_dir/last.pt when present
    threads: int = 0  # > 0: torch.set_num_threads
    init_image: str = ""  # a timm ViT (backbones.load name/path, e.g. tiny_dino_synth) whose patch
    # embedding, position embedding and blocks initialise the image encoder
    pos_embed: str = "resize"  # resize (once, bicubic, to the training grid; thesis 5.9) | interpolate (per forward)
    n_grouping_blocks: int = 0  # 0: the loaded model's; 1 or 3: re-mapped from a 2-block model (thesis 5.13)
    final_group_tokens: int = 0  # 0: the loaded model's last grouping stage; e.g. 4 (thesis Table 15)

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
        choices = {
            "non_noisy_pool": ("local", "global"),
            "a_st_scale": ("logit_scale", "none"),
            "dino_reduction": ("sum", "mean"),
            "pos_embed": ("resize", "interpolate"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not 0 <= self.random_erase <= 1 or self.color_jitter < 0:
            raise ValueError("random_erase must lie in [0, 1] and color_jitter be >= 0")
        if self.n_grouping_blocks not in (0, 1, 2, 3) or self.final_group_tokens < 0:
            raise ValueError("n_grouping_blocks must be 0 (as loaded), 1, 2 or 3; final_group_tokens >= 0")
        if self.decay_epochs < 0 or self.cycles < 1 or self.val_every < 1:
            raise ValueError("decay_epochs must be >= 0, cycles and val_every >= 1")
        missing = [d for d in self.val_datasets if d != "synthetic" and d not in self.val_roots]
        if missing:
            raise ValueError(f"val_datasets {missing} need their roots: -o val_roots={{{missing[0]}: /path}}")
