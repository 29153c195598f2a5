"""The synthetic scene world: seeded multi-object images with exact ground truth, fully offline.

Why it looks the way it does: the offline backbone (`tiny_dino_synth`) is a DINO (thesis section 3.2, Eq 10-11)
trained on this world, and the notebooks then ask whether its patch features group *objects of one
class*. That question is only interesting if class is not a trivial pixel statistic, so

* each object class is a **shape** drawn with a class-specific **texture** ("striped triangle",
  "dotted circle", ...): telling classes apart needs shape and/or texture;
* the two texture colours are drawn at random **per instance** (hue, saturation, brightness), and the
  pattern's orientation, phase and period are jittered per instance: colour never tells the class;
* texture scales are fixed in pixels (3-7 px, a different scale and structure per texture; world v3), so
  an 8 x 8 pixel patch - one ViT/8 token - already shows which texture it is: a patch-level feature *can*
  know the class, which the affinity, best-buddies and tiny-DINO studies need;
* backgrounds are named procedural textures ("gravel", "grass", ...) with random palettes, smoother and
  lower in contrast than the object textures.

Each :class:`Scene` has instance masks (visible parts, disjoint), a semantic mask (0 = background,
else the COCO category id 1..K), boxes and a caption naming every object, the spatial relation between
consecutive objects and the background ("a striped triangle left of a dotted circle on gravel"), so
one world serves MaskCut / CutLER (instances), the affinity studies (classes) and GroupViT (captions).

Edges are anti-aliased from signed distance fields: a pixel is labelled with an object exactly when
the object covers at least half of it (signed distance < 0), and the drawn colour is blended by the
coverage, so the masks agree with what is drawn to within that half-pixel rule.

:func:`make_dataset` writes PNGs + a COCO instances JSON (RLE masks) + a COCO captions JSON, so the
loaders of :mod:`nbsupport.data` read synthetic and real data alike; :func:`synthetic_dataset` caches
one under ``data/generated/``.
"""

from __future__ import annotations

from .dataset import SPLITS, categories, make_dataset, scene_rng, synthetic_dataset
from .render import WORLD_VERSION, render_scene
from .world import BACKGROUNDS, CLASSES, MIN_VISIBLE, OBJECT_SCALE, ObjectClass, Scene, caption_for

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "MIN_VISIBLE",
    "OBJECT_SCALE",
    "ObjectClass",
    "Scene",
    "SPLITS",
    "WORLD_VERSION",
    "caption_for",
    "categories",
    "make_dataset",
    "render_scene",
    "scene_rng",
    "synthetic_dataset",
]
