"""The synthetic world's splits as the analyses and trainers use them: one loader per form (COCO on disk,
tensors with semantic masks, captions), all rendering the same seeded scenes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nbsupport.data.coco import CocoInstances
from nbsupport.data.images import image_to_tensor
from nbsupport.data.synthetic.dataset import scene_rng, synthetic_dataset
from nbsupport.data.synthetic.render import render_scene
from nbsupport.data.synthetic.world import BACKGROUNDS, CLASSES, OBJECT_SCALE


def synthetic_coco(n_images: int = 64, seed: int = 0, size: int = 128, split: str = "val", **world):
    """A split of the synthetic world as :class:`~nbsupport.data.CocoInstances` (PNG + COCO JSON, generated
    once into ``data/generated/`` and cached): the one way analyses, notebooks and benchmarks load scenes
    with ground truth. ``world``: :func:`~nbsupport.data.synthetic.make_dataset` options (``n_objects``,
    ``overlap``, ``scale``). Scene ``i`` is rendered from ``scene_rng(seed, split, i)``, so every form below
    shows the same scenes."""
    root = synthetic_dataset(n_images=n_images, seed=seed, size=size, split=split, **world)
    return CocoInstances(root / f"instances_{split}.json")


def synthetic_captions(
    n_images: int, seed: int = 0, size: int = 64, split: str = "train", n_objects=(1, 3), scale=OBJECT_SCALE
) -> Path:
    """The cached synthetic world split (``captions_<split>.json`` path; images under ``images/``);
    ``scale``: object diameters as fractions of the image side (:func:`nbsupport.data.synthetic.render_scene`)."""
    scale = tuple(float(x) for x in scale)
    kw = {} if scale == OBJECT_SCALE else {"scale": scale}  # the default keeps the plain world's cache key
    return (
        synthetic_dataset(n_images=n_images, seed=seed, size=size, split=split, n_objects=tuple(n_objects), **kw)
        / f"captions_{split}.json"
    )


def synthetic_class_names(kind: str = "name"):
    """Object class names of the synthetic world (``"name"``: "striped triangle", ``"noun"``: "triangle")
    and its background names (scored as extra classes that map to background 0)."""
    if kind not in ("name", "noun"):
        raise ValueError(f"class name kind must be 'name' or 'noun', got {kind!r}")
    return [c.name if kind == "name" else c.noun for c in CLASSES], list(BACKGROUNDS)


def synthetic_scenes(n_images: int, seed: int = 0, size: int = 64, split: str = "val"):
    """``(images [n, 3, size, size] normalised, semantic [n, size, size] int64)`` of the synthetic split's
    first ``n_images`` scenes, rendered in memory. These are the scenes :func:`synthetic_coco` writes for
    the same ``(n_images, seed, size, split)``; load scenes with :func:`synthetic_coco` (instances, boxes,
    captions, cached on disk); this in-memory form is for loops that only need the images and semantic
    masks as tensors (the GroupViT trainer's validation)."""
    scenes = [render_scene(scene_rng(seed, split, i), size=size) for i in range(n_images)]
    return (
        torch.stack([image_to_tensor(s.image) for s in scenes]),
        torch.from_numpy(np.stack([s.semantic for s in scenes]).astype(np.int64)),
    )
