"""The synthetic scene world: seeded multi-object images with exact ground truth, fully offline.

Why it looks the way it does: the offline backbone (issue 8) is a DINO (thesis section 3.2, Eq 10-11)
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

import colorsys
import functools
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from nbsupport.core import paths

#: Bump whenever rendering changes: it is part of every cache key, so stale cached datasets are rebuilt.
WORLD_VERSION = 3


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


#: Fixed seed-stream codes of the usual splits (other split names get a CRC32 code), so splits never share scenes.
SPLITS = {"train": 0, "val": 1, "test": 2}


#: Default object diameters (min, max) as fractions of the image side; validation scenes always use these.
OBJECT_SCALE = (0.2, 0.45)


#: Default minimum visible fraction of an object under ``overlap="allowed"`` (see :func:`render_scene`).
MIN_VISIBLE = 0.25


_MIN_PIXELS = 16  # an object must cover at least this many pixels of the frame


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
# Backgrounds: smoothed noise at several scales (scipy filters, no per-pixel Python)


@functools.lru_cache(maxsize=256)
def _lerp_table(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for linear resampling of ``n_in`` samples to ``n_out`` (pixel centres aligned)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.minimum(x.astype(np.int64), n_in - 2) if n_in > 1 else np.zeros(n_out, np.int64)
    w = (x - i0) if n_in > 1 else np.zeros(n_out)
    return i0, np.minimum(i0 + 1, n_in - 1), w


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    """Separable bilinear resampling of ``x [h, w]`` to ``[size, size]``."""
    i0, i1, w = _lerp_table(x.shape[0], size)
    x = x[i0] * (1 - w)[:, None] + x[i1] * w[:, None]
    j0, j1, w = _lerp_table(x.shape[1], size)
    return x[:, j0] * (1 - w) + x[:, j1] * w


def _noise(rng, size: int, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    """White noise blurred by ``(sigma_y, sigma_x)`` pixels, standardised to zero mean and unit std.

    Wide blurs are made on a coarser grid (blur of 2 coarse pixels) and bilinearly upsampled: same look,
    a fraction of the cost. scipy's filters are used rather than BLAS matmuls, which are erratic when
    several processes share few cores."""
    sig = (float(sigma_y), float(sigma_x if sigma_x is not None else sigma_y))
    fac = [max(1.0, s / 2.0) for s in sig]
    shape = [max(4, int(np.ceil(size / f))) for f in fac]
    x = rng.standard_normal(shape)
    x = ndimage.gaussian_filter(x, [s / f for s, f in zip(sig, fac)], mode="reflect", truncate=3.0)
    if shape != [size, size]:
        x = _upsample(x, size)
    return (x - x.mean()) / (x.std() + 1e-9)


def _palette(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two background colours: random hue, muted, moderate contrast."""
    h = rng.random()
    s = rng.uniform(0.1, 0.6)
    v1 = rng.uniform(0.2, 0.6)
    v2 = min(1.0, v1 + rng.uniform(0.15, 0.35))
    c1 = colorsys.hsv_to_rgb(h, s, v1)
    c2 = colorsys.hsv_to_rgb((h + rng.uniform(-0.08, 0.08)) % 1.0, s * rng.uniform(0.6, 1.0), v2)
    return np.array(c1), np.array(c2)


def _background(rng, kind: str, size: int) -> np.ndarray:
    """Float ``[size, size, 3]`` in [0, 1]: texture field ``t`` mapped onto a random two-colour palette."""
    s = size / 128.0  # feature sizes scale with the image
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "gravel":  # small stones: mid-frequency blobs with dark gaps, plus grain
        blobs = _noise(rng, size, 1.6 * s)
        t = np.tanh(1.5 * blobs) + 0.35 * _noise(rng, size, 8 * s) + 0.25 * rng.standard_normal((size, size))
    elif kind == "grass":  # vertical blades: long in y, thin in x, with patches
        t = _noise(rng, size, 6 * s, 0.7) + 0.5 * _noise(rng, size, 14 * s)
    elif kind == "sand":  # smooth dunes, faint ripples and fine grain
        a = rng.uniform(0, np.pi)
        f = rng.uniform(0.25, 0.4) / s
        ripples = np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + 2.5 * _noise(rng, size, 12 * s))
        t = _noise(rng, size, 16 * s) + 0.25 * ripples + 0.35 * rng.standard_normal((size, size))
    elif kind == "water":  # horizontal swell warped by noise, with soft highlights
        f = rng.uniform(0.12, 0.2) / s
        warp = 2.5 * _noise(rng, size, 10 * s)
        t = np.sin(f * yy + warp) + 0.4 * _noise(rng, size, 5 * s)
        t = t + 0.6 * np.maximum(t - 1.0, 0)
    elif kind == "wood":  # grain lines in a random direction, bent by a slowly varying field
        a = rng.uniform(0, np.pi)
        f = rng.uniform(0.35, 0.6) / s
        across = xx * np.cos(a) + yy * np.sin(a)
        t = np.sin(f * across + 2.0 * _noise(rng, size, 24 * s)) + 0.3 * _noise(rng, size, 1.0)
    else:
        raise ValueError(f"unknown background {kind!r}: use one of {BACKGROUNDS}")
    t = np.clip(0.5 + (t - t.mean()) / (4.6 * t.std() + 1e-9), 0, 1)[..., None]  # about the 1-99 % range
    c1, c2 = _palette(rng)
    return c1 * (1 - t) + c2 * t


# --------------------------------------------------------------------------------------------------
# Objects: signed distance fields (negative inside, in pixels) and textures in object coordinates


def _polygon_sd(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact signed Euclidean distance to a simple polygon ``verts [K, 2]`` (u, v), negative inside:
    the nearest edge gives the distance, the even-odd crossing rule the sign; vectorised over edges."""
    d2 = np.full(u.shape, np.inf)
    inside = np.zeros(u.shape, bool)
    for (ua, va), (ub, vb) in zip(verts, np.roll(verts, -1, axis=0)):
        eu, ev = ub - ua, vb - va
        wu, wv = u - ua, v - va
        t = np.clip((wu * eu + wv * ev) / (eu * eu + ev * ev), 0.0, 1.0)
        d2 = np.minimum(d2, (wu - t * eu) ** 2 + (wv - t * ev) ** 2)
        crosses = (va > v) != (vb > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            inside ^= crosses & (u < ua + (v - va) * eu / (vb - va))
    d = np.sqrt(d2)
    return np.where(inside, -d, d)


def _regular(n: int, radius: float, phase: float = -np.pi / 2) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], 1)


def _star(r: float, inner: float = 0.45) -> np.ndarray:
    outer, inn = _regular(5, r), _regular(5, inner * r, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inn], 1).reshape(10, 2)


def _cross(r: float, w: float = 0.3) -> np.ndarray:
    a, b = 0.96 * r, w * r
    return np.array(
        [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    )


def _shape_sd(noun: str, u: np.ndarray, v: np.ndarray, r: float, rng) -> np.ndarray:
    """Signed distance in pixels (negative inside) of a shape of circumradius about ``r`` centred at
    ``u = v = 0`` in the object's (rotated) frame."""
    if noun == "circle":
        return np.hypot(u, v) - r
    if noun == "ring":
        rho = np.hypot(u, v)
        hole = rng.uniform(0.45, 0.6)
        return np.maximum(rho - r, hole * r - rho)
    if noun == "square":
        return _polygon_sd(u, v, _regular(4, r, np.pi / 4))
    if noun == "triangle":
        return _polygon_sd(u, v, _regular(3, r))
    if noun == "star":
        return _polygon_sd(u, v, _star(r))
    if noun == "cross":
        return _polygon_sd(u, v, _cross(r))
    raise ValueError(f"unknown shape {noun!r}")


def _stripes(s: np.ndarray, period: float) -> np.ndarray:
    """Anti-aliased 0/1 stripes along ``s`` (about one pixel of transition)."""
    return np.clip(0.5 + np.sin(2 * np.pi * s / period) * period / (2 * np.pi), 0, 1)


def _texture(rng, kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pattern in [0, 1] in the object's own frame; orientation, phase and scale jittered per instance.

    World v3: pattern scales are fixed in pixels (not proportional to the object), and each texture has
    its own scale and structure, so that an 8 x 8 pixel patch already tells the textures apart (in v2,
    three of them looked like the same stripes at patch scale, which capped any patch-level measure):
    striped = straight stripes of period ~4.5 px; wavy = broad bands (~7 px) bent by a short sine;
    zigzag = fine chevrons (~3.5 px) with sharp bends; checkered = 2-D cells of ~3 px; dotted = sparse
    round dots ~6 px apart; plain = one colour with gentle shading."""
    j = rng.uniform(0.9, 1.12)  # per-instance scale jitter
    a = rng.uniform(0, np.pi)
    s0 = u * np.cos(a) + v * np.sin(a)
    t0 = -u * np.sin(a) + v * np.cos(a)
    ph_s, ph_t = rng.uniform(0, 1, size=2)
    if kind == "striped":
        period = 4.5 * j
        return _stripes(s0 + ph_s * period, period)
    if kind == "wavy":  # broad bands whose centre lines are short, deep sine curves
        period = 7.0 * j
        return _stripes(s0 + ph_s * period + 0.45 * period * np.sin(2 * np.pi * t0 / (1.3 * period)), period)
    if kind == "zigzag":  # fine chevrons: stripes bent by a short triangle wave
        period = 3.6 * j
        tri = np.abs(np.mod(t0 / (1.4 * period) + ph_t, 1.0) - 0.5) * 2 - 0.5
        return _stripes(s0 + ph_s * period + 1.4 * period * tri, period)
    if kind == "checkered":
        cell = 3.0 * j
        prod = np.sin(np.pi * (s0 / cell + ph_s)) * np.sin(np.pi * (t0 / cell + ph_t))
        return np.clip(0.5 + prod * 2.0, 0, 1)
    if kind == "dotted":
        step = 6.0 * j
        ds = np.mod(s0 + ph_s * step, step) - step / 2
        dt = np.mod(t0 + ph_t * step, step) - step / 2
        return np.clip(0.3 * step - np.hypot(ds, dt) + 0.5, 0, 1)
    if kind == "plain":  # a single colour with gentle shading towards the second one
        return np.clip(0.15 + 0.15 * s0 / r, 0, 0.3)
    raise ValueError(f"unknown texture {kind!r}")


def _colour_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours (any hue) with enough luminance contrast for the pattern to show."""
    lum = np.array([0.299, 0.587, 0.114])
    for _ in range(30):
        a = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)))
        b = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)))
        if abs(a @ lum - b @ lum) > 0.25:
            return a, b
    return a, np.clip(1.0 - a, 0, 1)


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


# --------------------------------------------------------------------------------------------------
# Scenes


def _pick_classes(classes) -> list[ObjectClass]:
    if classes is None:
        return list(CLASSES)
    out = []
    for c in classes:
        hit = [k for k in CLASSES if c in (k.id, k.noun, k.name)]
        if not hit:
            raise ValueError(
                f"unknown class {c!r} in classes: use ids {[k.id for k in CLASSES]} or nouns "
                f"{[k.noun for k in CLASSES]}"
            )
        out.append(hit[0])
    if not out:
        raise ValueError("classes is empty")
    return out


def _count_range(n_objects) -> tuple[int, int]:
    if isinstance(n_objects, (int, np.integer)):
        lo = hi = int(n_objects)
    else:
        try:
            lo, hi = (int(x) for x in n_objects)
        except (TypeError, ValueError):
            raise ValueError(f"n_objects must be an int or an inclusive (min, max) pair, got {n_objects!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"n_objects must satisfy 0 <= min <= max, got {n_objects!r}")
    return lo, hi


def render_scene(
    rng_or_seed=0,
    size: int = 128,
    n_objects=(1, 3),
    scale=OBJECT_SCALE,
    overlap: str = "none",
    classes=None,
    backgrounds=None,
    min_visible: float = MIN_VISIBLE,
    max_tries: int = 50,
    noise: float = 0.012,
    appearance=None,
) -> Scene:
    """Render one scene; a few ms at 128 px.

    ``rng_or_seed``: a ``numpy.random.Generator`` or an int seed. ``n_objects``: int or inclusive
    ``(min, max)``. ``scale``: object diameter (circumscribed) as a fraction of the image side, drawn
    uniformly per object. ``overlap``: ``"none"`` - objects keep at least 2 px apart (rejection sampling,
    ``max_tries`` per object; fewer objects when they do not fit); ``"allowed"`` - later objects may
    occlude earlier ones, but a placement is rejected when it would leave an earlier object with less
    than ``min_visible`` of its (in-frame) area visible, so no drawn object is ever dropped from the
    annotations and every object pixel is labelled (``min_visible=0`` allows any occlusion short of
    ``16`` visible pixels). ``classes``: subset (ids or nouns);
    ``backgrounds``: subset of :data:`BACKGROUNDS`. ``noise``: std of the final pixel noise.
    ``appearance``: ``None`` (one random stream for everything: the world's scenes) or a second
    ``Generator`` / int seed from which the background (kind and field), the objects' colour pairs and the
    pixel noise are drawn. Geometry, classes and texture patterns then come from ``rng_or_seed`` alone, so
    two calls with one geometry seed and two appearance seeds draw the same objects with the same patterns
    in the same places, on different backgrounds and in different colours: the tiny DINO's views
    (``nbsupport.dino``, ``appearance="per-view"``). Default scenes do not change.
    """
    if overlap not in ("none", "allowed"):
        raise ValueError(f"overlap must be 'none' or 'allowed', got {overlap!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int >= 16 pixels, got {size!r}")
    try:
        s_lo, s_hi = (float(x) for x in scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a (min, max) pair of fractions of the image side, got {scale!r}") from None
    if not 0 < s_lo <= s_hi <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
    if not 0 <= min_visible <= 1:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible!r}")
    lo, hi = _count_range(n_objects)
    pool = _pick_classes(classes)
    bgs = tuple(backgrounds) if backgrounds is not None else BACKGROUNDS
    bad = [b for b in bgs if b not in BACKGROUNDS]
    if bad or not bgs:
        raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {backgrounds!r}")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    if appearance is None:
        look = rng
    else:
        look = appearance if isinstance(appearance, np.random.Generator) else np.random.default_rng(appearance)

    size = int(size)
    bg = bgs[int(look.integers(len(bgs)))]
    img = _background(look, bg, size)
    owner = np.full((size, size), -1, np.int32)  # index of the object visible at each pixel
    areas: list[int] = []  # in-frame area of each placed object
    cats: list[int] = []
    n = int(rng.integers(lo, hi + 1))
    for _ in range(n):
        cls = pool[int(rng.integers(len(pool)))]
        placed = None
        for _ in range(max_tries):
            r = rng.uniform(s_lo, s_hi) * size / 2
            cy, cx = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
            th = rng.uniform(0, 2 * np.pi)
            pad = 1.1 * r + 3
            y0, y1 = max(0, int(cy - pad)), min(size, int(np.ceil(cy + pad)) + 1)
            x0, x1 = max(0, int(cx - pad)), min(size, int(np.ceil(cx + pad)) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
            dy, dx = yy - cy, xx - cx
            u, v = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
            sd = _shape_sd(cls.noun, u, v, r, rng)
            inside = sd < 0
            area = int(inside.sum())
            if area < _MIN_PIXELS:
                continue
            win = owner[y0:y1, x0:x1]
            if overlap == "none":
                if (win[sd < 2.0] >= 0).any():
                    continue
            elif cats:
                hidden = np.bincount(win[inside & (win >= 0)], minlength=len(cats))
                visible = np.bincount(owner[owner >= 0], minlength=len(cats)) - hidden
                if (visible < np.maximum(min_visible * np.array(areas), _MIN_PIXELS)).any():
                    continue
            placed = (y0, y1, x0, x1, u, v, r, sd, inside, area)
            break
        if placed is None:
            continue  # could not place this object within max_tries
        y0, y1, x0, x1, u, v, r, sd, inside, area = placed
        c1, c2 = _colour_pair(look)
        p = _texture(rng, cls.texture, u, v, r)[..., None]
        alpha = np.clip(0.5 - sd, 0, 1)[..., None]
        colour = c1 * (1 - p) + c2 * p
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
        owner[y0:y1, x0:x1][inside] = len(cats)
        areas.append(area)
        cats.append(cls.id)
    if noise > 0:
        img = img + look.normal(0, noise, img.shape)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)

    k = len(cats)
    inst = owner[None] == np.arange(k)[:, None, None] if k else np.zeros((0, size, size), bool)
    sem = np.zeros((size, size), np.int32)
    if k:
        sem[owner >= 0] = np.asarray(cats, np.int32)[owner[owner >= 0]]
    boxes = np.array([_bbox(m) for m in inst], dtype=float).reshape(-1, 4)
    cents = np.array([np.argwhere(m).mean(0) for m in inst], dtype=float).reshape(-1, 2)
    return Scene(image, inst, cats, sem, caption_for(cats, cents, bg), bg, boxes, cents)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# --------------------------------------------------------------------------------------------------
# Datasets on disk


def _split_code(split: str) -> int:
    if not isinstance(split, str) or not split or not split.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"split must be a simple name such as {list(SPLITS)}, got {split!r}")
    return SPLITS.get(split, zlib.crc32(split.encode()) + 3)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent of how many scenes are made, and
    different splits are different streams (train and val never share scenes)."""
    return np.random.default_rng([int(seed), _split_code(split), int(index)])


def categories() -> list[dict]:
    """COCO categories: name = the noun, supercategory = the texture adjective."""
    return [{"id": c.id, "name": c.noun, "supercategory": c.texture} for c in CLASSES]


def _params(n_images, seed, size, split, n_objects, overlap, kw) -> dict:
    """The JSON-able parameters that determine a dataset's bytes (the manifest and the cache key)."""
    no = [int(x) for x in n_objects] if not isinstance(n_objects, (int, np.integer)) else int(n_objects)
    extra = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(kw.items())}
    return {
        "world_version": WORLD_VERSION,
        "n_images": int(n_images),
        "seed": int(seed),
        "size": int(size),
        "split": split,
        "n_objects": no,
        "overlap": overlap,
        **extra,
    }


def make_dataset(
    root,
    n_images: int,
    seed: int = 0,
    size: int = 128,
    split: str = "train",
    n_objects=(1, 3),
    overlap: str = "none",
    progress: bool | None = None,
    **kw,
) -> Path:
    """Write ``n_images`` scenes of ``split`` under ``root`` and return ``root``.

    Files: ``images/<split>_<i:06d>.png``; ``instances_<split>.json`` (COCO instances: image ids 1..n,
    file names relative to ``images/``, RLE masks with ASCII counts, area and bbox from the RLE,
    iscrowd 0); ``captions_<split>.json`` (COCO captions); ``manifest.json`` (parameters per split).
    Scene ``i`` comes from :func:`scene_rng` ``(seed, split, i)``; same arguments give identical bytes.
    ``kw`` goes to :func:`render_scene`. A tqdm bar shows for ``n_images > 200`` unless ``progress``.
    """
    from pycocotools import mask as mask_utils
    from tqdm.auto import tqdm

    if int(n_images) < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images!r}")
    params = _params(n_images, seed, size, split, n_objects, overlap, kw)
    render_scene(0, size=size, n_objects=n_objects, overlap=overlap, **kw)  # validate arguments up front
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    it = range(int(n_images))
    if progress or (progress is None and n_images > 200):
        it = tqdm(it, desc=f"synthetic {split}", unit="img")
    for i in it:
        sc = render_scene(scene_rng(seed, split, i), size=size, n_objects=n_objects, overlap=overlap, **kw)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(sc.image).save(root / "images" / name)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": int(size), "height": int(size)})
        caps.append({"id": image_id, "image_id": image_id, "caption": sc.caption})
        for m, c in zip(sc.instance_masks, sc.category_ids):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(c),
                    "iscrowd": 0,
                    "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(x) for x in mask_utils.toBbox(rle)],
                }
            )
    info = {
        "description": "nbsupport synthetic scene world",
        "version": str(WORLD_VERSION),
        "split": split,
        "seed": int(seed),
    }
    inst = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": categories()}
    (root / f"instances_{split}.json").write_text(json.dumps(inst))
    (root / f"captions_{split}.json").write_text(
        json.dumps({"info": info, "licenses": [], "images": images, "annotations": caps})
    )
    manifest_path = root / "manifest.json"
    manifest = {"world_version": WORLD_VERSION, "splits": {}}
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("world_version") == WORLD_VERSION:
                manifest["splits"] = dict(old.get("splits", {}))
        except (json.JSONDecodeError, AttributeError):
            pass
    manifest["splits"][split] = params
    manifest_path.write_text(json.dumps(manifest, sort_keys=True, indent=1))
    return root


def _manifest_matches(root: Path, split: str, params: dict) -> bool:
    try:
        man = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        isinstance(man, dict)
        and man.get("splits", {}).get(split) == params
        and (root / f"instances_{split}.json").is_file()
        and (root / f"captions_{split}.json").is_file()
    )


def _install(tmp: Path, root: Path, split: str) -> None:
    """Move the ``split`` files of a finished dataset ``tmp`` into ``root``: a fresh ``root`` is one
    rename; an existing synthetic root keeps its other splits, and its manifest is written last so an
    interrupted move is regenerated on the next call."""
    if not root.exists():
        try:
            os.replace(tmp, root)
            return
        except OSError:  # another process created it meanwhile: merge below
            pass
    (root / "images").mkdir(parents=True, exist_ok=True)
    for old in (root / "images").glob(f"{split}_*.png"):
        old.unlink()
    for img in (tmp / "images").iterdir():
        os.replace(img, root / "images" / img.name)
    for name in (f"instances_{split}.json", f"captions_{split}.json"):
        os.replace(tmp / name, root / name)
    new = json.loads((tmp / "manifest.json").read_text())
    try:
        man = json.loads((root / "manifest.json").read_text())
        if man.get("world_version") != WORLD_VERSION:
            man = {"world_version": WORLD_VERSION, "splits": {}}
    except (OSError, json.JSONDecodeError, AttributeError):
        man = {"world_version": WORLD_VERSION, "splits": {}}
    man.setdefault("splits", {})[split] = new["splits"][split]
    (root / "manifest.json").write_text(json.dumps(man, sort_keys=True, indent=1))


def synthetic_dataset(
    n_images: int = 64,
    seed: int = 0,
    size: int = 128,
    split: str = "val",
    n_objects=(1, 3),
    overlap: str = "none",
    root=None,
    progress: bool | None = None,
    **kw,
) -> Path:
    """A cached dataset: ``data/generated/synthetic-<split>-<hash of the parameters>`` (or ``root``).

    Generated only when missing or when its ``manifest.json`` does not match the parameters (which
    include :data:`WORLD_VERSION`). Generation writes a temporary folder that is renamed (or, into an
    existing synthetic ``root``, moved split by split) at the end, so a killed run never leaves half a
    dataset. Splits use different seed streams (:func:`scene_rng`), so ``split="train"`` and
    ``split="val"`` with the same ``seed`` never share scenes. A ``root`` that exists, is not empty and
    has no ``manifest.json`` is refused rather than overwritten.
    Read it with ``CocoInstances(root / f"instances_{split}.json")``.
    """
    params = _params(n_images, seed, size, split, n_objects, overlap, kw)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(root) if root is not None else paths.generated_dir() / f"synthetic-{split}-{key}"
    if _manifest_matches(root, split, params):
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / "manifest.json").is_file())):
        raise ValueError(
            f"root {root} exists and is not a synthetic dataset (no manifest.json): "
            "refusing to overwrite it; pass an empty or new folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        make_dataset(tmp, n_images, seed, size, split, n_objects, overlap, progress=progress, **kw)
        if not _manifest_matches(root, split, params):  # another process may have finished first
            _install(tmp, root, split)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
