"""What a GroupViT run is validated on after its epochs (thesis 5.2-5.3, Fig 27): the synthetic world's
validation scenes (the default), or zero-shot mIoU on real benchmarks by the thesis / GroupViT protocol of
:mod:`nbsupport.analysis.zero_shot_protocol` (short side 448, sliding window 448 / stride 224, each
dataset's background threshold from GroupViT's configs), chosen with ``val_datasets`` / ``val_roots``; and
the evaluation of a configuration's model without training (the "Original" rows, Table 14).

A validation is a callable ``model -> {"miou", ...}``: :func:`~nbsupport.training.groupvit.loop.train` takes
one as ``validate=``. Real datasets are scored by :func:`nbsupport.analysis.segmentation_eval.validate`, the
one evaluator of ``groupvit-eval``, so a trainer's number and the command's number are the same number.
"""

from __future__ import annotations

import time

from nbsupport.analysis import segmentation_eval, zero_shot
from nbsupport.analysis.zero_shot_protocol import EvalSettings
from nbsupport.data.datasets.registry import segmentation_dataset
from nbsupport.data.scenes import synthetic_class_names, synthetic_scenes


class SyntheticValidation:
    """The trainer's default: zero-shot mIoU on ``n`` synthetic validation scenes at ``size`` px (object classes
    plus the background names scored as background), ``{"miou", "iou"}``."""

    name = ""

    def __init__(self, n: int, seed: int, size: int, class_names: str = "name"):
        self.images, self.semantic = synthetic_scenes(n, seed, size)
        self.names, self.backgrounds = synthetic_class_names(class_names)

    def __call__(self, model) -> dict:
        r = zero_shot.zero_shot_miou(model, self.images, self.semantic, self.names, self.backgrounds)
        return {"miou": r["miou"], "iou": r["iou"]}


class DatasetValidation:
    """Zero-shot mIoU on each of ``datasets`` (names of :data:`~nbsupport.data.datasets.registry.DATASETS`
    read from ``roots[name]``, or ``"synthetic"``): ``{"miou": the first dataset's, "miou_<name>",
    "iou_<name>"}``. The datasets are opened (their layout checked) at once, so a wrong root stops a run
    before it trains; their images are read at the first call."""

    def __init__(
        self,
        datasets,
        roots: dict,
        split: str = "val",
        limit: int = 0,
        bg_thresh: dict | None = None,
        short_side: int | None = 448,
        window: int | None = 448,
        stride: int = 224,
        synthetic: tuple = (64, 0, 64, "name"),
    ):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("no validation dataset named")
        self.split, self.limit = split, int(limit)
        bg = bg_thresh or {}
        self.settings = {
            d: EvalSettings(short_side=short_side, window=window, stride=stride, bg_thresh=bg.get(d))
            for d in self.datasets
            if d != "synthetic"
        }
        self._opened = {}
        for d in self.datasets:
            if d == "synthetic":
                continue
            if d not in roots:
                raise ValueError(f"validation dataset {d!r} needs its root: -o val_roots={{{d}: /path}}")
            self._opened[d] = segmentation_dataset(d, roots[d], split)
        self._synthetic = synthetic
        self._sets: dict = {}

    @property
    def name(self) -> str:
        return " + ".join(d if d == "synthetic" else f"{d} {self.split}" for d in self.datasets)

    def data(self, d: str):
        """The validation set of dataset ``d``: the synthetic scenes (read once) or the opened dataset."""
        if d != "synthetic":
            return self._opened[d]
        if d not in self._sets:
            self._sets[d] = SyntheticValidation(*self._synthetic)
        return self._sets[d]

    def __call__(self, model) -> dict:
        out = {}
        for d in self.datasets:
            data = self.data(d)
            if d == "synthetic":
                r = data(model)
            else:
                r = segmentation_eval.validate(
                    model, data, split=self.split, n_images=self.limit or None, settings=self.settings[d]
                )
            out.setdefault("miou", r["miou"])
            out[f"miou_{d}"], out[f"iou_{d}"] = r["miou"], r["iou"]
        return out


def validation_from_config(cfg):
    """The per-epoch validation a :class:`~nbsupport.training.groupvit.config.TrainConfig` names: its
    ``val_datasets`` (:class:`DatasetValidation`), else ``val_images`` synthetic scenes
    (:class:`SyntheticValidation`, what the trainer always did), else None."""
    if cfg.val_datasets:
        return DatasetValidation(
            cfg.val_datasets,
            cfg.val_roots,
            cfg.val_split,
            cfg.val_limit,
            cfg.val_bg_thresh,
            cfg.val_short_side or None,
            cfg.val_window or None,
            cfg.val_stride,
            (cfg.val_images or 64, cfg.seed, cfg.val_size, cfg.val_class_names),
        )
    if cfg.val_images:
        return SyntheticValidation(cfg.val_images, cfg.seed, cfg.val_size, cfg.val_class_names)
    return None


def val_record(r: dict, epoch: int, step: int, t0: float, name: str = "") -> dict:
    """The ``metrics.jsonl`` record of one validation result ``r`` (its confusion matrix left out)."""
    rec = {"type": "val", "epoch": epoch, "step": step, **{k: v for k, v in r.items() if k != "conf"}}
    rec["minutes"] = (time.time() - t0) / 60
    if name:
        rec["data"] = name
    return rec


def evaluate(cfg, model=None, validate=None) -> dict:
    """Evaluate the model a configuration starts from, without training (the thesis's "Original" rows, the
    inference settings of Table 14): :func:`~nbsupport.training.groupvit.architecture.prepare_model` (no
    position-embedding resize) on ``cfg.device``, scored by ``validate`` (default
    :func:`validation_from_config`); the record (epoch 0, step 0) is appended to ``out_dir/metrics.jsonl``
    beside ``config.yaml``. Returns the record."""
    from pathlib import Path

    from nbsupport.core import distributed
    from nbsupport.core.config import write_config
    from nbsupport.training.common import MetricsLog
    from nbsupport.training.groupvit.architecture import prepare_model

    cfg.validate()
    t0 = time.time()
    dev = distributed.resolve_device(cfg.device)
    validate = validate if validate is not None else validation_from_config(cfg)
    if validate is None:
        raise ValueError("nothing to evaluate on: set val_datasets (or val_images for the synthetic world)")
    model = prepare_model(cfg, model, training=False).to(dev).eval()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    rec = val_record(validate(model), 0, 0, t0, getattr(validate, "name", ""))
    log = MetricsLog(out)
    log.start(resume_keep=None)
    log.append(rec)
    return rec
