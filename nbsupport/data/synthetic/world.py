"""The synthetic world's vocabulary: object classes (shape + texture), backgrounds, the :class:`Scene`
record and the caption that names a scene's objects (see :mod:`nbsupport.data.synthetic`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ObjectClass:
    """One object class: a shape (``noun``, a single WordNet noun) with a class-specific texture."""

    id: int
    noun: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.texture} {self.noun}"


#: Object classes, ids 1..K in COCO category order.
CLASSES = (
    ObjectClass(1, "triangle", "striped"),
    ObjectClass(2, "circle", "dotted"),
    ObjectClass(3, "square", "checkered"),
    ObjectClass(4, "star", "wavy"),
    ObjectClass(5, "ring", "plain"),
    ObjectClass(6, "cross", "zigzag"),
)


#: Named procedural backgrounds.
BACKGROUNDS = ("gravel", "grass", "sand", "water", "wood")


#: Default object diameters (min, max) as fractions of the image side; validation scenes always use these.
OBJECT_SCALE = (0.2, 0.45)


#: Default minimum visible fraction of an object under ``overlap="allowed"`` (see :func:`render_scene`).
MIN_VISIBLE = 0.25


_BY_ID = {c.id: c for c in CLASSES}


@dataclass
class Scene:
    """One rendered scene.

    ``image`` uint8 ``[H, W, 3]``; ``instance_masks`` bool ``[N, H, W]`` visible parts (disjoint);
    ``category_ids`` N class ids; ``semantic`` int32 ``[H, W]`` (0 = background, else the class id);
    ``boxes`` float ``[N, 4]`` xywh of the masks (COCO convention, as ``pycocotools.mask.toBbox``);
    ``centroids`` float ``[N, 2]`` (y, x) of the visible masks; ``caption``; ``background`` name.
    """

    image: np.ndarray
    instance_masks: np.ndarray
    category_ids: list[int]
    semantic: np.ndarray
    caption: str
    background: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    @property
    def nouns(self) -> list[str]:
        return [_BY_ID[c].noun for c in self.category_ids]


# --------------------------------------------------------------------------------------------------
# Captions


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    """Where centroid ``a`` (y, x) lies relative to centroid ``b``: the dominant axis decides."""
    dy, dx = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(category_ids, centroids, background: str) -> str:
    """ "a striped triangle left of a dotted circle above a wavy star on gravel": every object in order,
    each related to the next one by their centroids; "empty gravel" without objects."""
    if not len(category_ids):
        return f"empty {background}"
    words = []
    for k, c in enumerate(category_ids):
        name = _BY_ID[int(c)].name
        words.append(f"{_article(name)} {name}")
        if k + 1 < len(category_ids):
            words.append(_relation(centroids[k], centroids[k + 1]))
    return " ".join(words) + f" on {background}"
