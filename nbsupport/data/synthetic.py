"""The synthetic scene world: seeded multi-object images with exact ground truth, offline.

Each object class is a *shape* drawn with a class-specific *texture* (a "striped triangle", a "dotted
circle", ...); the two texture colours are random per instance, so colour never tells the class and a
model must use shape and texture. Backgrounds are named procedural textures with random palettes.
Every scene has instance masks (visible parts), a semantic mask and a caption naming each object, its
spatial relation to the previous one and the background ("a striped triangle left of a dotted circle
on gravel"), so the same world serves MaskCut / CutLER (instances), affinity studies (classes) and
GroupViT (captions).

``make_dataset`` writes images + a COCO instances JSON + a COCO captions JSON, so the loaders in
:mod:`nbsupport.data` read synthetic and real data alike.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .. import paths


@dataclass(frozen=True)
class ObjectClass:
    id: int
    noun: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.texture} {self.noun}"


CLASSES = (
    ObjectClass(1, "triangle", "striped"),
    ObjectClass(2, "circle", "dotted"),
    ObjectClass(3, "square", "checkered"),
    ObjectClass(4, "star", "wavy"),
    ObjectClass(5, "ring", "speckled"),
    ObjectClass(6, "cross", "zigzag"),
)
BACKGROUNDS = ("gravel", "grass", "sand", "water", "wood")
SPLITS = {"train": 0, "val": 1, "test": 2}
MIN_VISIBLE = 0.25  # an occluded instance keeps its annotation only if >= 25% of it stays visible


@dataclass
class Scene:
    """One rendered scene. ``instance_masks``: bool ``[N, H, W]`` visible parts (disjoint);
    ``semantic``: int32 ``[H, W]``, 0 = background, else the class id."""

    image: np.ndarray
    instance_masks: np.ndarray
    category_ids: list[int]
    semantic: np.ndarray
    caption: str
    background: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # xywh from the masks


# --------------------------------------------------------------------------------------------------
# Drawing


def _random_colour(rng) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _colour_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours with enough luminance contrast for the texture to be visible."""
    for _ in range(20):
        a, b = _random_colour(rng), _random_colour(rng)
        if abs(a @ [0.3, 0.59, 0.11] - b @ [0.3, 0.59, 0.11]) > 0.2:
            return a, b
    return a, 1.0 - a


def _smooth_noise(rng, size: int, cells: int, aniso=(1.0, 1.0)) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise, roughly in [-1, 1]."""
    ch, cw = max(2, int(cells * aniso[0])), max(2, int(cells * aniso[1]))
    low = rng.standard_normal((ch, cw))
    up = ndimage.zoom(low, (size / ch, size / cw), order=1, mode="reflect", grid_mode=True)[:size, :size]
    return up / (np.abs(up).max() + 1e-9)


def _background(rng, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "gravel":
        t = 0.6 * _smooth_noise(rng, size, size // 6) + 0.4 * rng.uniform(-1, 1, (size, size))
    elif kind == "grass":
        t = 0.7 * _smooth_noise(rng, size, size // 3, aniso=(0.15, 1.0)) + 0.3 * _smooth_noise(rng, size, 6)
    elif kind == "sand":
        t = 0.8 * _smooth_noise(rng, size, 5) + 0.2 * rng.uniform(-1, 1, (size, size))
    elif kind == "water":
        f = rng.uniform(0.08, 0.16)
        t = np.sin(f * yy + 3 * _smooth_noise(rng, size, 4)) * 0.7 + 0.3 * _smooth_noise(rng, size, 8)
    elif kind == "wood":
        f = rng.uniform(0.15, 0.3)
        t = np.sin(f * xx + 6 * _smooth_noise(rng, size, 3, aniso=(0.5, 1.0)))
    else:
        raise ValueError(f"unknown background {kind!r}: use one of {BACKGROUNDS}")
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    h = rng.random()
    c1 = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.1, 0.6), rng.uniform(0.25, 0.6)))
    c2 = np.array(colorsys.hsv_to_rgb((h + rng.uniform(-0.08, 0.08)) % 1, rng.uniform(0.1, 0.6), rng.uniform(0.5, 0.9)))
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _shape_mask(noun: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` in rotated, centred coordinates (u, v)."""
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if noun == "circle":
        return rho <= r
    if noun == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if noun == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes of an equilateral triangle with circumradius r
            a = np.pi / 2 + 2 * np.pi * k / 3 + np.pi
            inside &= (u * np.cos(a) + v * np.sin(a)) <= r / 2
        return inside
    if noun == "star":
        return rho <= r * (0.45 + 0.55 * ((1 + np.cos(5 * phi)) / 2) ** 2)
    if noun == "ring":
        return (rho <= r) & (rho >= 0.5 * r)
    if noun == "cross":
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {noun!r}")


def _texture(rng, kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pattern in [0, 1] on the object's own coordinates; period and phase jittered per instance."""
    period = max(3.0, r * rng.uniform(0.35, 0.55))
    a = rng.uniform(0, np.pi)
    s, t = u * np.cos(a) + v * np.sin(a), -u * np.sin(a) + v * np.cos(a)
    s = s + rng.uniform(0, period)
    if kind == "striped":
        return (np.sin(2 * np.pi * s / period) > 0).astype(float)
    if kind == "dotted":
        ds = np.mod(s, period) - period / 2
        dt = np.mod(t, period) - period / 2
        return (ds ** 2 + dt ** 2 < (0.3 * period) ** 2).astype(float)
    if kind == "checkered":
        return (np.mod(np.floor(s / period) + np.floor(t / period), 2)).astype(float)
    if kind == "wavy":
        return (np.sin(2 * np.pi * (s + 0.25 * period * np.sin(2 * np.pi * t / period)) / period) > 0).astype(float)
    if kind == "zigzag":
        tri = np.abs(np.mod(t / period, 1.0) - 0.5) * period
        return (np.sin(2 * np.pi * (s + tri) / (0.7 * period)) > 0).astype(float)
    if kind == "speckled":
        return (rng.random(u.shape) < 0.35).astype(float)
    raise ValueError(f"unknown texture {kind!r}")


def _relation(prev_c: tuple[float, float], c: tuple[float, float]) -> str:
    """How the previous object lies relative to this one, from centroids ``(y, x)``."""
    dy, dx = c[0] - prev_c[0], c[1] - prev_c[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_scene(rng_or_seed=0, size: int = 128, n_objects=(1, 3), scale=(0.2, 0.45), overlap: str = "none",
                 classes=None, backgrounds=None, max_tries: int = 60) -> Scene:
    """Render one scene.

    ``n_objects``: int or inclusive ``(min, max)``; ``scale``: object diameter as a fraction of the image
    side; ``overlap="none"``: objects never touch (rejection sampling, fewer objects when they cannot
    fit), ``"allowed"``: later objects may occlude earlier ones (an instance keeps its annotation while
    at least ``MIN_VISIBLE`` of it is visible). ``classes``: subset of class ids.
    """
    if overlap not in ("none", "allowed"):
        raise ValueError(f"overlap must be 'none' or 'allowed', got {overlap!r}")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    if not 0 <= lo <= hi:
        raise ValueError(f"bad n_objects {n_objects!r}")
    pool = [c for c in CLASSES if classes is None or c.id in set(classes)]
    if not pool:
        raise ValueError(f"no classes selected from {[c.id for c in CLASSES]}")
    bgs = backgrounds or BACKGROUNDS
    bg = bgs[rng.integers(len(bgs))]
    img = _background(rng, bg, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    owner = np.full((size, size), -1, np.int32)  # which placed object is visible at each pixel
    placed: list[tuple[ObjectClass, np.ndarray, tuple[float, float]]] = []
    n = int(rng.integers(lo, hi + 1))
    for _ in range(n):
        cls = pool[rng.integers(len(pool))]
        for _ in range(max_tries):
            r = rng.uniform(*scale) * size / 2
            cy, cx = rng.uniform(r * 0.6, size - r * 0.6, size=2)
            th = rng.uniform(0, 2 * np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            m = _shape_mask(cls.noun, u, v, r)
            if m.sum() < 16:
                continue
            if overlap == "none" and (ndimage.binary_dilation(m, iterations=2) & (owner >= 0)).any():
                continue
            break
        else:
            continue  # could not place this object
        c1, c2 = _colour_pair(rng)
        p = _texture(rng, cls.texture, u, v, r)[..., None]
        img = np.where(m[..., None], c1 * (1 - p) + c2 * p, img)
        owner[m] = len(placed)
        placed.append((cls, m, (cy, cx)))
    img = np.clip(img + rng.normal(0, 0.015, img.shape), 0, 1)
    masks, cats, centres = [], [], []
    for k, (cls, full, c) in enumerate(placed):
        vis = owner == k
        if vis.sum() >= max(16, MIN_VISIBLE * full.sum()):
            masks.append(vis)
            cats.append(cls.id)
            centres.append(c)
        else:
            owner[vis] = -1  # too occluded to annotate: counted as background
    inst = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    sem = np.zeros((size, size), np.int32)
    for m, c in zip(inst, cats):
        sem[m] = c
    by_id = {c.id: c for c in CLASSES}
    words = []
    for k, c in enumerate(cats):
        name = by_id[c].name
        words.append(f"{_article(name)} {name}" if k == 0 else f"{_relation(centres[k - 1], centres[k])} {_article(name)} {name}")
    caption = (" ".join(words) + f" on {bg}") if words else f"{bg}"
    boxes = np.array([_bbox(m) for m in inst], dtype=float).reshape(-1, 4)
    return Scene((img * 255).round().astype(np.uint8), inst, cats, sem, caption, bg, boxes)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# --------------------------------------------------------------------------------------------------
# Datasets on disk


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent of how many scenes are made."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index])


def categories() -> list[dict]:
    return [{"id": c.id, "name": c.noun, "supercategory": c.texture} for c in CLASSES]


def make_dataset(root, n_images: int, seed: int = 0, size: int = 128, split: str = "val", n_objects=(1, 3),
                 overlap: str = "none", progress: bool | None = None, **kw) -> Path:
    """Write ``n_images`` scenes: ``root/images/<split>_<i:06d>.png``, ``root/instances_<split>.json``
    (COCO instances, RLE masks with ASCII counts, area and bbox from the RLE), ``root/captions_<split>.json``
    (COCO captions) and ``root/manifest_<split>.json`` (the parameters). Same arguments -> same bytes."""
    from pycocotools import mask as mask_utils
    from tqdm.auto import tqdm

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    it = range(n_images)
    if progress or (progress is None and n_images > 200):
        it = tqdm(it, desc=f"synthetic {split}", unit="img")
    for i in it:
        sc = render_scene(scene_rng(seed, split, i), size=size, n_objects=n_objects, overlap=overlap, **kw)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(sc.image).save(root / "images" / name, optimize=False)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        caps.append({"id": image_id, "image_id": image_id, "caption": sc.caption})
        for m, c in zip(sc.instance_masks, sc.category_ids):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": int(c), "iscrowd": 0,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(x) for x in mask_utils.toBbox(rle)],
            })
    info = {"description": "nbsupport synthetic scene world", "split": split, "seed": seed}
    inst = {"info": info, "images": images, "annotations": anns, "categories": categories()}
    (root / f"instances_{split}.json").write_text(json.dumps(inst))
    (root / f"captions_{split}.json").write_text(json.dumps({"info": info, "images": images, "annotations": caps}))
    manifest = {"n_images": n_images, "seed": seed, "size": size, "split": split, "n_objects": list(n_objects)
                if not isinstance(n_objects, int) else n_objects, "overlap": overlap, **kw}
    (root / f"manifest_{split}.json").write_text(json.dumps(manifest, sort_keys=True, default=str))
    return root


def synthetic_dataset(n_images: int = 64, seed: int = 0, size: int = 128, split: str = "val", n_objects=(1, 3),
                      overlap: str = "none", root=None, **kw) -> Path:
    """A cached synthetic dataset, generated on first use under ``data/generated/synthetic-<hash>``.

    Generation goes to a temporary folder renamed at the end, so a killed run never leaves half a
    dataset. Train/val/test use different seed streams: they never share scenes.
    Read it with ``CocoInstances(root / f"instances_{split}.json")``.
    """
    params = {"n_images": n_images, "seed": seed, "size": size, "split": split, "overlap": overlap,
              "n_objects": list(n_objects) if not isinstance(n_objects, int) else n_objects, **kw}
    key = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = Path(root) if root else paths.generated_dir() / f"synthetic-{split}-{key}"
    if (root / f"instances_{split}.json").is_file() and (root / f"manifest_{split}.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        make_dataset(tmp, n_images, seed, size, split, n_objects, overlap, **kw)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
