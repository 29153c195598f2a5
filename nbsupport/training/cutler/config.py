"""CutLER run configuration: defaults, recipe files in ``recipes/`` and overrides."""

from __future__ import annotations

import json
from pathlib import Path

from nbsupport.training.cutler.model import REFERENCE_MIN_SIZES

CONFIG_DIR = Path(__file__).parent / "recipes"


DEFAULTS = {
    # model
    "arch": "resnet50",
    "weights": None,
    "min_size": list(REFERENCE_MIN_SIZES),
    "max_size": 1333,
    "min_size_test": 800,
    "score_thresh": 0.0,
    "detections_per_img": 100,
    "rpn_post_nms_top_n_train": 4000,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_nms_thresh": 0.65,
    "box_batch_size_per_image": 512,
    "trainable_layers": 5,
    "representation_size": 1024,
    "drop_loss": True,
    "drop_iou": 0.01,
    # data
    "train_json": None,
    "image_root": None,
    "flip": True,
    "copy_paste": True,
    "copy_paste_scale": [0.3, 1.0],
    "copy_paste_max_cover": 0.5,
    "aspect_grouping": True,
    "num_workers": 4,
    # solver (batch_size is the total over all processes, as in detectron2's IMS_PER_BATCH)
    "batch_size": 16,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-5,
    "weight_decay_norm": 0.0,
    "max_iter": 160000,
    "steps": [80000],
    "gamma": 0.02,
    "warmup_iters": 1000,
    "warmup_factor": 0.001,
    "clip_grad": 1.0,
    "amp": True,
    "device": "auto",
    "seed": 0,
    # bookkeeping
    "checkpoint_period": 5000,
    "log_period": 20,
    "keep_checkpoint": True,
    # self-training (overrides applied by `selftrain`)
    "selftrain": {
        "max_iter": 80000,
        "steps": [],
        "lr": 0.005,
        "warmup_iters": 1000,
        "drop_loss": False,
        "copy_paste_scale": [0.5, 1.0],
        "score_thresh": [0.7, 0.65],
        "keep_iou": 0.5,
        "detections": 30,
    },
}


# --------------------------------------------------------------------------------------------------
# Config

SELFTRAIN_TRAIN_KEYS = ("max_iter", "steps", "lr", "drop_loss", "copy_paste_scale", "warmup_iters")


def load_config(name_or_path="paper", overrides: dict | None = None) -> dict:
    """Defaults <- recipe YAML (``smoke``, ``paper``, ... in ``nbsupport/training/cutler/recipes`` or a path) <-
    ``overrides``. Unknown keys are refused (typos would otherwise be silently ignored)."""
    import yaml

    cfg = json.loads(json.dumps(DEFAULTS))
    if name_or_path is not None:
        p = Path(name_or_path)
        if not p.suffix:
            p = CONFIG_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            avail = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config {name_or_path!r} not found (recipes: {avail}, or a YAML path)")
        cfg = _merge(cfg, yaml.safe_load(p.read_text()) or {}, str(p))
    return _merge(cfg, overrides or {}, "overrides")


def _merge(base: dict, new: dict, where: str) -> dict:
    for k, v in new.items():
        if k not in base:
            raise KeyError(f"{where}: unknown CutLER config key {k!r} (known: {sorted(base)})")
        if isinstance(base[k], dict) and isinstance(v, dict):
            base[k] = _merge(dict(base[k]), v, f"{where}.{k}")
        else:
            base[k] = v
    return base


def _model_kwargs(cfg: dict) -> dict:
    keys = (
        "arch",
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
    return {k: cfg[k] for k in keys}
