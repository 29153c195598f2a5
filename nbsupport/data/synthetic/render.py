"""Scene rendering: seeded backgrounds, shapes as signed distance fields, per-instance textures and
colours, anti-aliased compositing with exact masks (:func:`render_scene`)."""

from __future__ import annotations

import colorsys
import functools

import numpy as np
from scipy import ndimage

from nbsupport.data.synthetic.world import (
    BACKGROUNDS,
    CLASSES,
    MIN_VISIBLE,
    OBJECT_SCALE,
    ObjectClass,
    Scene,
    caption_for,
)

#: Bump whenever rendering changes: it is part of every cache key, so stale cached datasets are rebuilt.
WORLD_VERSION = 3


_MIN_PIXELS = 16  # an object must cover at least this many pixels of the frame


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
    (``nbsupport.training.dino``, ``appearance="per-view"``). Default scenes do not change.
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
