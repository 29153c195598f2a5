"""Fine-tuning experiments on GroupViT (thesis 5.5-5.8, notebook 08): what a run is validated on (the
synthetic world, or zero-shot mIoU on a real benchmark such as VOC val by GroupViT's protocol), one seeded
fine-tuning run from given starting weights, and the Table 11 ablation, one such run per set of entropy
regularisers (GE Eq 37, LE Eq 39-41, SE Eq 42-44), every run from the same weights with the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from nbsupport.analysis import zero_shot
from nbsupport.data import caption_labels as textmod
from nbsupport.data.captions import CaptionImages
from nbsupport.data.segmentation import SegmentationSet, segmentation_set
from nbsupport.models.groupvit.inference import TEMPLATES
from nbsupport.models.groupvit.model import GroupViT
from nbsupport.training.groupvit.config import TrainConfig
from nbsupport.training.groupvit.loop import train

#: Captions shown by :func:`label_examples` for the synthetic world: a scene caption, one without an object
#: and one with repeated and capitalised words (what the taggers must cope with).
EXAMPLE_CAPTIONS = (
    "a striped triangle left of a dotted circle above a wavy star on gravel",
    "empty sand",
    "A man riding a brown horse twice near the exact red cars",
)

#: The entropy regularisers of thesis section 5.8 and their :class:`TrainConfig` weight fields.
REGULARISERS = {"GE": "w_ge", "LE": "w_le", "SE": "w_se"}


def regularisers(spec: str) -> tuple[str, ...]:
    """A Table 11 row name -> its regularisers: ``"none"`` / ``""`` -> ``()``, ``"GE+LE"`` -> ``("GE", "LE")``."""
    if spec in ("none", ""):
        return ()
    regs = tuple(r.strip() for r in spec.split("+"))
    bad = [r for r in regs if r not in REGULARISERS]
    if bad:
        raise ValueError(f"unknown regulariser {bad[0]!r} in {spec!r}: join {sorted(REGULARISERS)} with '+', or 'none'")
    return regs


def _schedule(epochs: int, lr: float, regs=()) -> dict:
    """Notebook 08's schedule and penalties: warm-up from ``lr / 100`` over ``min(1, epochs / 2)`` epochs,
    cosine down to ``lr / 100``; each named regulariser with weight 1, the others 0."""
    return dict(
        epochs=epochs,
        lr=lr,
        min_lr=lr / 100,
        warmup_lr=lr / 100,
        warmup_epochs=min(1.0, epochs / 2),
        **{w: 1.0 if r in regs else 0.0 for r, w in REGULARISERS.items()},
    )


def finetune_config(out_dir, epochs: int, lr: float, regs=(), **fields) -> TrainConfig:
    """A fine-tuning run's :class:`TrainConfig`: notebook 08's schedule (:func:`_schedule`), never resumed
    (each run starts from the weights it is given), ``fields`` for everything else (``model``, ``data``,
    ``n_train``, ``image_size``, ``batch_size``, ``trainable`` ...)."""
    clash = sorted(set(fields) & ({"min_lr", "warmup_lr", "warmup_epochs", "resume"} | set(REGULARISERS.values())))
    if clash:
        raise ValueError(f"{clash} follow from epochs, lr and regs here; do not pass them")
    regularisers("+".join(regs))  # validates the names
    return TrainConfig(out_dir=str(out_dir), resume=False, **_schedule(epochs, lr, regs), **fields)


# ============================================================================================== validation
@dataclasses.dataclass
class Validation:
    """What the fine-tuning runs are scored on: ``data`` (a :class:`~nbsupport.data.segmentation.SegmentationSet`).

    - the synthetic world (``data.dataset`` None): zero-shot mIoU of square batches at the set's size, object
      classes plus the background names scored as background (:func:`~nbsupport.analysis.zero_shot.zero_shot_miou`),
      exactly what the trainer computes after every epoch on the same scenes (:meth:`trainer_fields`);
    - a real dataset: GroupViT's evaluation protocol on the dataset's class names in GroupViT's evaluation
      prompt (``"a photo of a {}."``), every image at its original resolution
      (:func:`~nbsupport.analysis.zero_shot.protocol_miou`: ``short_side``, sliding ``window`` / ``stride``,
      background threshold ``bg_thresh``), after every epoch of a fine-tuning run (the trainer's
      ``validate=``)."""

    data: SegmentationSet
    bg_thresh: float | None = None
    short_side: int | None = 448
    window: int | None = 448
    stride: int = 224

    @property
    def synthetic(self) -> bool:
        return self.data.dataset is None

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompts of the class names: the trainer's (:data:`~nbsupport.data.caption_labels.TEMPLATES`) on the
        synthetic world, GroupViT's evaluation template on a real dataset."""
        return textmod.TEMPLATES if self.synthetic else TEMPLATES["simple"]

    @property
    def name(self) -> str:
        """The data in tables and titles: ``"synthetic val"``, ``"voc val"`` ..."""
        return "synthetic val" if self.synthetic else self.data.source

    def trainer_fields(self) -> dict:
        """:class:`TrainConfig` fields for the trainer's own per-epoch validation: the same synthetic scenes
        (``val_images``, ``val_size``); for a real dataset 0 images (the trainer would score the synthetic world)."""
        if self.synthetic:
            return {"val_images": len(self.data), "val_size": int(self.data.pixels.shape[-1])}
        return {"val_images": 0}

    def __call__(self, model: GroupViT) -> dict:
        """``{"miou", "iou", "conf"}`` (percent) of ``model`` on :attr:`data`."""
        d = self.data
        if self.synthetic:
            return zero_shot.zero_shot_miou(model, d.images, d.semantic, d.class_names, d.background_names)
        return zero_shot.protocol_miou(
            model, d, self.short_side, self.window, self.stride, self.bg_thresh, self.templates
        )


def validation(
    dataset=None,
    root=None,
    split: str = "val",
    n_images: int = 64,
    size: int = 64,
    seed: int = 0,
    bg_thresh: float | None = 0.95,
    short_side: int | None = 448,
    window: int | None = 448,
    stride: int = 224,
) -> Validation:
    """The :class:`Validation` of notebook 08: ``dataset=None`` the synthetic world's ``split`` (``n_images``
    scenes at ``size`` px, seeded; the protocol arguments do not apply); else the first ``n_images`` of a
    real dataset by name with its ``root`` (:func:`~nbsupport.data.segmentation.segmentation_set`; ``"voc"``:
    PASCAL VOC 2012 val, as the thesis validates its fine-tuning), scored by GroupViT's protocol with the
    background threshold ``bg_thresh`` (:data:`~nbsupport.models.groupvit.inference.BG_THRESH`: VOC 0.95;
    None for a dataset without background class)."""
    return Validation(
        segmentation_set(dataset, n_images, size, seed, split, root=root), bg_thresh, short_side, window, stride
    )


# ============================================================================================== runs
def finetune(base: GroupViT, cfg: TrainConfig, progress=None, validate: Validation | None = None) -> dict:
    """Fine-tune a copy of ``base`` (left untouched) with ``cfg``, the global RNG seeded with ``cfg.seed``
    first so every run starts alike; returns :func:`~nbsupport.training.groupvit.loop.train`'s result. A real
    dataset's ``validate`` scores the model after every epoch (the trainer's ``validate=``: the Fig 27
    curves on the real data); the synthetic one is the trainer's own validation (``cfg.val_images``, the same
    scenes). Should the trainer not have validated, ``validate`` scores the fine-tuned model after the run.
    ``result["val"]``: the last record ``{"type": "val", "epoch", "step", "miou", "iou", ("data")}``, also the
    last of ``result["history"]``."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    per_epoch = None if validate is None or validate.synthetic else validate
    res = train(cfg, model=copy.deepcopy(base), progress=progress, validate=per_epoch)
    if res["val"] is None and validate is not None:
        r = validate(res["model"])
        steps = [h["step"] for h in res["history"] if "step" in h]
        res["val"] = {
            "type": "val",
            "epoch": cfg.epochs,
            "step": max(steps, default=0),
            "miou": r["miou"],
            "iou": r["iou"],
            "minutes": (time.time() - t0) / 60,
            "data": validate.name,
        }
        res["history"].append(res["val"])
        if progress:
            progress(res["val"])
    return res


def regulariser_ablation(
    base: GroupViT,
    cfg: TrainConfig,
    specs,
    out_root,
    epochs: int | None = None,
    before: float | None = None,
    validate: Validation | None = None,
) -> tuple[list[dict], dict[str, GroupViT]]:
    """Thesis Table 11: for every row name in ``specs`` (``"none"``, ``"GE"``, ``"GE+LE"`` ...) fine-tune
    ``base`` with ``cfg`` for ``epochs`` (default ``cfg.epochs``; the warm-up follows them), only the named
    regularisers on (weight 1), into ``out_root/ablation_<names>``, each scored as :func:`finetune` scores it
    (the trainer's last validation, else ``validate``). Returns the table rows ``{"Model", "Method", "<data>
    mIoU"}`` (``<data>`` = ``validate.name``, default ``"synthetic val"``; first ``"Original"`` = ``before``
    when given; the mIoU after the last epoch) and the fine-tuned models by row name."""
    specs = list(specs)
    parsed = [regularisers(s) for s in specs]  # every name is checked before the first run starts
    epochs = cfg.epochs if epochs is None else int(epochs)
    column = f"{validate.name if validate is not None else 'synthetic val'} mIoU"
    rows = [] if before is None else [{"Model": "GroupViT", "Method": "Original", column: before}]
    models = {}
    for spec, regs in zip(specs, parsed):
        tag = "ablation_" + ("_".join(regs) if regs else "none")
        run_cfg = dataclasses.replace(cfg, out_dir=str(Path(out_root) / tag), **_schedule(epochs, cfg.lr, regs))
        res = finetune(base, run_cfg, validate=validate)
        models[spec] = res["model"]
        miou = res["val"]["miou"] if res["val"] else float("nan")
        rows.append({"Model": "GroupViT", "Method": " + ".join(regs) if regs else "Fine-tuned", column: miou})
    return rows, models


def training_data(cfg: TrainConfig) -> str:
    """The training data of a run for titles: ``"synthetic captions"`` or the captions file's name
    (``captions_train2017.json``)."""
    return "synthetic captions" if cfg.data == "synthetic" else Path(cfg.data).name


def example_captions(cfg: TrainConfig, n: int = 3) -> list[str]:
    """Captions to show :func:`label_examples` on: :data:`EXAMPLE_CAPTIONS` for the synthetic world, else
    the first caption of each of the first ``n`` images of the run's captions file (``cfg.data``)."""
    if cfg.data == "synthetic":
        return list(EXAMPLE_CAPTIONS)
    ds = CaptionImages(cfg.data, cfg.image_root or None, cfg.image_size)
    return [caps[0] for caps in ds.captions[:n]]


def label_examples(captions, cfg: TrainConfig, modes=("repeat", "pad")) -> tuple[list[dict], str]:
    """The labels a run with ``cfg`` draws from each caption (thesis 4.3, 5.6-5.7): nouns, noun phrases and
    the ``cfg.num_labels`` labels of kind ``cfg.label_kind`` with their ``<PAD>`` mask, per pad mode. Returns
    the rows and the name of the tagger used (``cfg.tagger``: NLTK's perceptron, WordNet or built-in)."""
    tagger = textmod.get_tagger(cfg.tagger)
    rows = []
    for c in captions:
        for mode in modes:
            lab = textmod.extract_labels(c, cfg.num_labels, cfg.label_kind, mode, tagger)
            rows.append(
                {
                    "caption": c,
                    "pad mode": mode,
                    "nouns": textmod.extract_nouns(c, tagger),
                    "noun phrases": textmod.extract_noun_phrases(c, tagger),
                    "labels": lab.raw,
                    "pad mask": lab.pad,
                }
            )
    return rows, tagger.name
