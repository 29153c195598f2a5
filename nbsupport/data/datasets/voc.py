"""PASCAL VOC 2012, its trainaug labels and Pascal Context, in their official layouts, as GroupViT evaluates
them (NVlabs/GroupViT ``segmentation/datasets/pascal_voc.py``, ``pascal_context.py`` and the configs
``segmentation/configs/_base_/datasets/pascal_voc12.py``, ``pascal_context.py``).

- ``voc``: ``VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/<split>.txt}``;
  palette PNGs whose indices are the 21 classes, 255 = the void band along object boundaries (ignored).
  ``SegmentationObject/*.png`` (instance numbers, same void band) is read by :meth:`PascalVOC.instance_mask`.
- ``voc_aug``: the same root with the SBD-derived ``SegmentationClassAug/*.png`` (grey PNGs, 21 classes, 255
  ignore) and ``ImageSets/Segmentation/train_aug.txt`` (10,582 images); ``split="train_aug"`` by default.
- ``context``: ``VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext/*.png, ImageSets/SegmentationContext/
  <split>.txt}`` (mmsegmentation's conversion with the Detail API: grey PNGs 0..59): GroupViT's Pascal
  Context, 60 classes = background + 59.
- ``context59``: the same files with background dropped (mmseg's ``reduce_zero_label``: 0 -> 255, k -> k-1).

Class names are GroupViT's own lists (its prompts: VOC's "table", "plant", "monitor"); the devkit's names
(``diningtable``, ...) are :data:`VOC_DEVKIT_CLASSES`. :func:`write_fixture` writes a tiny copy of both
trees for tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.datasets.base import (
    IGNORE,
    LabelError,
    SegmentationDataset,
    lookup_table,
    read_label_png,
    read_split,
)
from nbsupport.data.images import ImageLoadError

# GroupViT's VOC names (segmentation/datasets/pascal_voc.py): the prompts of its zero-shot evaluation.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor",
)  # fmt: skip

# The VOC devkit's names of the same 21 ids (VOCdevkit's VOCinit.m).
VOC_DEVKIT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# GroupViT's Pascal Context, 60 classes (segmentation/datasets/pascal_context.py), background first.
CONTEXT_CLASSES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "plant", "road",
    "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "monitor", "wall", "water", "window", "wood",
)  # fmt: skip

# Pascal Context-59: the 59 classes without background.
CONTEXT59_CLASSES = CONTEXT_CLASSES[1:]


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC label palette ``[n, 3]`` uint8 (the bits of a label spread over R, G, B, high bit
    first): the colours of ``SegmentationClass`` / ``SegmentationObject`` PNGs; 255 is the void colour."""
    cmap = np.zeros((n, 3), np.uint8)
    for label in range(n):
        c, rgb = label, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        cmap[label] = rgb
    return cmap


def read_voc_label(path: Path) -> np.ndarray:
    """Label indices ``[H, W]`` int64 of a VOC PNG: palette or grey PNGs as stored; an RGB PNG colour-coded
    with :func:`voc_colormap` (as some re-saved copies are) is decoded back to indices."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            rgb = np.asarray(im.convert("RGB")) if mode in ("RGB", "RGBA") else None
    except FileNotFoundError:
        raise ImageLoadError(path, "label file does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"unreadable label image ({e})") from None
    if rgb is None:
        return read_label_png(path)
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    cmap = voc_colormap().astype(np.int64)
    table = {int((r << 16) | (g << 8) | b): k for k, (r, g, b) in enumerate(cmap)}
    codes, inv = np.unique(code, return_inverse=True)
    missing = [f"#{int(c):06x}" for c in codes if int(c) not in table]
    if missing:
        raise ImageLoadError(path, f"RGB label colours {missing[:3]} are not in the VOC palette")
    return np.array([table[int(c)] for c in codes], np.int64)[inv.reshape(code.shape)]


def reduce_zero_label_table(n_classes: int) -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label`` as a lookup table: 0 -> 255, ``k`` -> ``k - 1`` for
    ``k = 1..n_classes``, 255 stays 255; every other raw value -> -1 (not in the label map)."""
    return lookup_table({0: IGNORE, IGNORE: IGNORE, **{k: k - 1 for k in range(1, n_classes + 1)}}, default=-1)


def checked_lookup(raw: np.ndarray, lut: np.ndarray, label_map: str) -> np.ndarray:
    """``lut[raw]`` with a :class:`LabelError` listing the raw values the table does not map (entries -1 or
    outside it); ``label_map`` describes the map for the message."""
    raw = np.asarray(raw, np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out = np.full(raw.shape, -1, np.int64)
    out[inside] = lut[raw[inside]]
    if (out < 0).any():
        bad = sorted(set(np.unique(raw[out < 0]).tolist()))[:5]
        raise LabelError(f"raw label values {bad} are not in the label map ({label_map})")
    return out


class PascalVOC(SegmentationDataset):
    """PASCAL VOC 2012 segmentation (root ``VOCdevkit/VOC2012``), 21 classes as GroupViT names them; the
    label PNG's indices are the class ids, 255 (the void boundary band) is ignored. ``split``: a file of
    ``ImageSets/Segmentation`` (``train`` 1,464 / ``val`` 1,449 / ``trainval``), ids in the file's order."""

    name = "voc"
    classes = VOC_CLASSES
    devkit_classes = VOC_DEVKIT_CLASSES
    LABEL_DIR = "SegmentationClass"
    SPLIT_DIR = "ImageSets/Segmentation"
    DEFAULT_SPLIT = "val"
    LAYOUT = "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/<split>.txt}"

    def __init__(self, root, split: str | None = None):
        super().__init__(root, split or self.DEFAULT_SPLIT)
        self.ids = read_split(self.root / self.SPLIT_DIR / f"{self.split}.txt", self._layout_hint())

    def _layout_hint(self) -> str:
        have = sorted(p.stem for p in (self.root / self.SPLIT_DIR).glob("*.txt"))
        return self.LAYOUT + (f" (splits in {self.root / self.SPLIT_DIR}: {have})" if have else "")

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.root / self.LABEL_DIR / f"{image_id}.png"

    def raw_label(self, image_id: str) -> np.ndarray:
        return read_voc_label(self.label_path(image_id))

    def instance_path(self, image_id: str) -> Path:
        return self.root / "SegmentationObject" / f"{image_id}.png"

    def instance_mask(self, i: int) -> np.ndarray | None:
        """Instance numbers of item ``i`` (``SegmentationObject``: int64 ``[H, W]``, 0 = background,
        ``1..N`` = objects, 255 = void), or None when the image has no instance PNG (e.g. SBD-only images)."""
        path = self.instance_path(self.ids[i])
        return read_voc_label(path) if path.is_file() else None

    def load_with_instances(self, i: int):
        """``(PIL image, class ids [H, W], instance numbers [H, W] or None)`` of item ``i``, sizes checked."""
        img, sem = self[i]
        inst = self.instance_mask(i % len(self))
        if inst is not None and inst.shape != sem.shape:
            raise LabelError(
                f"{self.instance_path(self.ids[i])}: instances are {inst.shape[1]}x{inst.shape[0]} px but the "
                f"image is {sem.shape[1]}x{sem.shape[0]}"
            )
        return img, sem, inst


class PascalVOCAug(PascalVOC):
    """VOC 2012 with the SBD-augmented labels ("trainaug", root ``VOCdevkit/VOC2012``): grey
    ``SegmentationClassAug/*.png`` (21 classes, 255 ignore). ``split="train_aug"`` (default, 10,582 images);
    any other file of ``ImageSets/Segmentation`` (``val``, ``train``, ``aug`` as mmseg's converter names
    it) is read with the same aug labels, which equal ``SegmentationClass`` on VOC's own images."""

    name = "voc_aug"
    LABEL_DIR = "SegmentationClassAug"
    DEFAULT_SPLIT = "train_aug"
    LAYOUT = "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClassAug/*.png, ImageSets/Segmentation/train_aug.txt}"


class PascalContext(SegmentationDataset):
    """Pascal Context as GroupViT evaluates it (root ``VOCdevkit/VOC2010``): 60 classes = background + 59, the
    grey PNGs of mmsegmentation's Detail-API conversion (``SegmentationClassContext``, values 0..59) read as
    stored; ``split``: ``train`` (4,996) / ``val`` (5,105) of ``ImageSets/SegmentationContext``."""

    name = "context"
    classes = CONTEXT_CLASSES
    LAYOUT = (
        "VOCdevkit/VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, "
        "ImageSets/SegmentationContext/<split>.txt}"
    )

    def __init__(self, root, split: str | None = None):
        super().__init__(root, split or "val")
        self.ids = read_split(self.root / "ImageSets" / "SegmentationContext" / f"{self.split}.txt", self.LAYOUT)

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClassContext" / f"{image_id}.png"


class PascalContext59(PascalContext):
    """Pascal Context-59: the files of :class:`PascalContext` without the background class (mmseg's
    ``PascalContextDataset59``, ``reduce_zero_label``): raw 0 -> 255, ``k`` -> ``k - 1``."""

    name = "context59"
    classes = CONTEXT59_CLASSES
    lut = reduce_zero_label_table(59)

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        return checked_lookup(raw, self.lut, "Pascal Context: 0 background -> 255, 1..59 -> 0..58, 255")


DATASETS = {"voc": PascalVOC, "voc_aug": PascalVOCAug, "context": PascalContext, "context59": PascalContext59}


# ---------------------------------------------------------------------------------------------- fixtures
# Shared by the fixtures of the GroupViT datasets (coco_object, ade20k): coloured shapes whose label maps
# are known, so a test checks a loader against exactly what was planted.

FIXTURE_SIZES = ((48, 64), (64, 48), (40, 56), (56, 72))  # (H, W): landscape, portrait, small, larger


def fixture_colour(value: int) -> tuple[int, int, int]:
    """A distinct, deterministic RGB colour of a raw label value (the fixture's JPEG content)."""
    rng = np.random.default_rng(1000 + int(value))
    return tuple(int(c) for c in rng.integers(30, 226, 3))


def fixture_box(rng, hw, half: int, n_halves: int = 2) -> tuple[int, int, int, int]:
    """A box ``(y0, x0, y1, x1)`` of at least 14 px inside vertical strip ``half`` of ``n_halves``, 4 px
    from the image border and the strip edges, so planted shapes never overlap and keep an interior."""
    h, w = hw
    x_lo, x_hi = w * half // n_halves + 4, w * (half + 1) // n_halves - 4
    bw = int(rng.integers(14, max(15, x_hi - x_lo + 1)))
    bh = int(rng.integers(14, h - 8 + 1))
    x0 = int(rng.integers(x_lo, x_hi - bw + 1))
    y0 = int(rng.integers(4, h - 4 - bh + 1))
    return y0, x0, y0 + bh, x0 + bw


def shape_mask(hw, box, kind: str = "rect") -> np.ndarray:
    """bool ``[H, W]`` of a rectangle or the ellipse inscribed in ``box = (y0, x0, y1, x1)``."""
    h, w = hw
    y0, x0, y1, x1 = box
    m = np.zeros((h, w), bool)
    if kind == "rect":
        m[y0:y1, x0:x1] = True
        return m
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, ry, rx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def boundary_band(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """bool ``[H, W]``: pixels within ``width`` px (4-neighbourhood steps) of the mask's contour, on both
    sides, as VOC's void band lies along object boundaries."""
    grow, shrink = mask.copy(), mask.copy()
    for _ in range(width):
        g, s = np.pad(grow, 1), np.pad(shrink, 1, constant_values=True)
        grow = g[1:-1, 1:-1] | g[:-2, 1:-1] | g[2:, 1:-1] | g[1:-1, :-2] | g[1:-1, 2:]
        shrink = s[1:-1, 1:-1] & s[:-2, 1:-1] & s[2:, 1:-1] & s[1:-1, :-2] & s[1:-1, 2:]
    return grow & ~shrink


def write_fixture_jpeg(path: Path, scene: np.ndarray, seed: int) -> None:
    """A JPEG whose content matches a raw label map ``scene`` (each value its :func:`fixture_colour`, light
    noise), so the image and its labels agree."""
    colours = np.array([fixture_colour(v) for v in range(256)], np.int16)
    noise = np.random.default_rng(seed).integers(-6, 7, (*scene.shape, 3))
    rgb = np.clip(colours[scene] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)


def save_label_png(path: Path, labels: np.ndarray, palette: bool) -> None:
    """A label map as a palette PNG with the VOC colours (``palette``) or a grey PNG, folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), "P" if palette else "L")
    if palette:
        im.putpalette(voc_colormap().flatten().tolist())
    im.save(path)


def plant_shapes(rng, hw, values, band: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Two shapes (left and right strip) of raw ``values`` on background 0: ``(scene, labels, instances,
    objects)``: the scene without void, the labels and instance numbers with a ``band``-px 255 band
    around each object (none when 0), and ``[(value, box, kind)]``."""
    scene = np.zeros(hw, np.uint8)
    inst = np.zeros(hw, np.uint8)
    void = np.zeros(hw, bool)
    objects = []
    for k, value in enumerate(values):
        box, kind = fixture_box(rng, hw, k), ("rect", "ellipse")[int(rng.integers(2))]
        m = shape_mask(hw, box, kind)
        scene[m], inst[m] = value, k + 1
        if band:
            void |= boundary_band(m, band)
        objects.append((int(value), box, kind))
    labels = np.where(void, IGNORE, scene).astype(np.uint8)
    return scene, labels, np.where(void, IGNORE, inst).astype(np.uint8), objects


VOC_FIXTURE_SPLITS = {
    "train": ["2007_000032", "2007_000039", "2007_000063"],
    "val": ["2007_000033", "2007_000042", "2007_000061", "2007_000129"],
}
VOC_FIXTURE_SBD = ["2008_000019", "2008_000008"]  # SBD-only images: in train_aug, no SegmentationClass PNG
CONTEXT_FIXTURE_SPLITS = {"train": ["2008_000002", "2008_000003", "2008_000007"], "val": ["2008_000008", "2008_000019", "2008_000021"]}  # fmt: skip


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny VOC 2012 + trainaug and Pascal Context tree under ``base/VOCdevkit`` (official folder and file
    names), deterministic for ``seed``; returns what was planted.

    VOC: 3 train / 4 val images (sizes :data:`FIXTURE_SIZES`, one portrait), each with two shapes of VOC
    classes 1..20 on background, palette ``SegmentationClass`` and ``SegmentationObject`` PNGs with a 2-px
    255 band along each contour, grey ``SegmentationClassAug`` PNGs (the same labels; the two SBD-only ids
    :data:`VOC_FIXTURE_SBD` without band); ``train_aug.txt`` = the SBD ids then train, in that (unsorted)
    order. Context: 3 train / 3 val grey PNGs 0..59 (every pixel labelled, no 255, as mmseg writes them).

    Returns ``{"root": {name: root}, "splits": {name: {split: ids}}, "raw": {name: {id: raw labels}},
    "masks": {name: {id: class ids}}, "instances": {id: instance map}, "objects": {name: {id: [(raw value,
    (y0, x0, y1, x1), kind)]}}, "sizes": {id: (H, W)}}``; ``masks`` are the protocol's class ids, derived
    here by hand (not through the readers' tables).
    """
    rng = np.random.default_rng(seed)
    devkit = Path(base) / "VOCdevkit"
    voc, ctx = devkit / "VOC2012", devkit / "VOC2010"
    out = {
        "root": {"voc": voc, "voc_aug": voc, "context": ctx, "context59": ctx},
        "splits": {
            "voc": {k: list(v) for k, v in VOC_FIXTURE_SPLITS.items()},
            "voc_aug": {"train_aug": VOC_FIXTURE_SBD + VOC_FIXTURE_SPLITS["train"], "val": VOC_FIXTURE_SPLITS["val"]},
            "context": {k: list(v) for k, v in CONTEXT_FIXTURE_SPLITS.items()},
        },
        "raw": {n: {} for n in DATASETS},
        "masks": {n: {} for n in DATASETS},
        "instances": {},
        "objects": {"voc": {}, "context": {}},
        "sizes": {},
    }
    out["splits"]["context59"] = out["splits"]["context"]
    voc_ids = VOC_FIXTURE_SPLITS["train"] + VOC_FIXTURE_SPLITS["val"] + VOC_FIXTURE_SBD
    for n, image_id in enumerate(voc_ids):
        hw = FIXTURE_SIZES[n % len(FIXTURE_SIZES)]
        values = rng.choice(np.arange(1, 21), 2, replace=False)
        sbd = image_id in VOC_FIXTURE_SBD
        scene, labels, inst, objects = plant_shapes(rng, hw, values, band=0 if sbd else 1)
        write_fixture_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", scene, seed * 1000 + n)
        save_label_png(voc / "SegmentationClassAug" / f"{image_id}.png", labels, palette=False)
        if not sbd:
            save_label_png(voc / "SegmentationClass" / f"{image_id}.png", labels, palette=True)
            save_label_png(voc / "SegmentationObject" / f"{image_id}.png", inst, palette=True)
            out["raw"]["voc"][image_id] = out["masks"]["voc"][image_id] = labels.astype(np.int64)
            out["instances"][image_id] = inst.astype(np.int64)
        out["raw"]["voc_aug"][image_id] = out["masks"]["voc_aug"][image_id] = labels.astype(np.int64)
        out["objects"]["voc"][image_id] = objects
        out["sizes"][image_id] = hw
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in {**out["splits"]["voc"], "trainval": sorted(voc_ids[:-2]), **out["splits"]["voc_aug"]}.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    ctx_ids = CONTEXT_FIXTURE_SPLITS["train"] + CONTEXT_FIXTURE_SPLITS["val"]
    for n, image_id in enumerate(ctx_ids):
        hw = FIXTURE_SIZES[(n + 1) % len(FIXTURE_SIZES)]
        values = rng.choice(np.arange(1, 60), 2, replace=False)
        scene, labels, _, objects = plant_shapes(rng, hw, values, band=0)
        if n == 0:  # a strip of background-free context (raw 59, "wood", the last class) along the top
            scene[:3] = labels[:3] = 59
        write_fixture_jpeg(ctx / "JPEGImages" / f"{image_id}.jpg", scene, seed * 1000 + 100 + n)
        save_label_png(ctx / "SegmentationClassContext" / f"{image_id}.png", labels, palette=False)
        raw = labels.astype(np.int64)
        out["raw"]["context"][image_id] = out["raw"]["context59"][image_id] = raw
        out["masks"]["context"][image_id] = raw
        out["masks"]["context59"][image_id] = np.where(raw == 0, IGNORE, raw - 1)
        out["objects"]["context"][image_id] = objects
        out["sizes"][image_id] = hw
    sets = ctx / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in CONTEXT_FIXTURE_SPLITS.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return out
