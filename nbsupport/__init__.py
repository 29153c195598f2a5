"""nbsupport: the support package of the DINO / MaskCut / CutLER / GroupViT notebooks.

The calls a student types, in the order data flows (image -> backbone -> feature grid -> analysis ->
figure)::

    import nbsupport as nbs
    model = nbs.load_backbone("dino_vits8")                 # or "tiny_dino_synth", "random_vits8", a path
    x = nbs.image_to_tensor(nbs.load_image("cat.jpg"), 224)[None]
    keys = nbs.extract_features(model, x, "key", layer=9)  # [B, h, w, D]
    masks = nbs.maskcut_patches(keys, n_masks=3, tau=0.15) # [B, 3, h, w] patch masks
    pairs = nbs.find_correspondences(model, "a.jpg", "b.jpg")
    gv = nbs.load_groupvit("group_vit_gcc_yfcc_30e")
    seg = nbs.segment(gv, x[0], ["cat", "dog"])

Everything else lives in its room: ``nbsupport.core`` (paths, configs, I/O, distributed set-up),
``nbsupport.data`` (datasets and loaders), ``nbsupport.models`` (backbones, features, GroupViT),
``nbsupport.analysis``, ``nbsupport.maskcut``, ``nbsupport.training`` (DINO, CutLER, GroupViT trainers) and
``nbsupport.notebook`` (runner, plots); docs/architecture.md explains the layout.

The names below are imported on first use (so that ``python -m nbsupport`` and ``import nbsupport`` stay
fast); ``dir(nbsupport)`` lists them all.
"""

from __future__ import annotations

import importlib

#: public name -> (module, attribute)
_API = {
    # data
    "load_image": ("nbsupport.data.images", "load_image"),
    "image_to_tensor": ("nbsupport.data.images", "image_to_tensor"),
    "synthetic_coco": ("nbsupport.data.scenes", "synthetic_coco"),
    # models
    "load_backbone": ("nbsupport.models.backbones", "load"),
    "extract_features": ("nbsupport.models.features", "extract"),
    "load_groupvit": ("nbsupport.models.groupvit.weights", "load"),
    "segment": ("nbsupport.models.groupvit.inference", "segment"),
    # analysis
    "patch_affinity": ("nbsupport.analysis.affinity", "patch_affinity"),
    "separability": ("nbsupport.analysis.affinity", "separability"),
    "best_buddies": ("nbsupport.analysis.correspondences", "best_buddies"),
    "relaxed_best_buddies": ("nbsupport.analysis.correspondences", "relaxed_best_buddies"),
    "find_correspondences": ("nbsupport.analysis.correspondences", "find_correspondences"),
    "entropy_maps": ("nbsupport.analysis.entropy", "entropy_maps"),
    "embed": ("nbsupport.analysis.embedding", "embed"),
    # maskcut
    "maskcut_patches": ("nbsupport.maskcut.cut", "maskcut"),
    "maskcut_images": ("nbsupport.maskcut.pipeline", "image_masks"),
    # notebook
    "save_figure": ("nbsupport.notebook.viz", "save_figure"),
    "run_notebooks": ("nbsupport.notebook.runner", "run"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'nbsupport' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
