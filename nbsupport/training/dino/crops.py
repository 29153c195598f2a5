"""DINO's multi-crop views (2 global + local crops with tracked geometry) and the endless seeded stream of
crop batches, from the synthetic world rendered on the fly or an image folder.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# Data


def sample_box(
    rng: np.random.Generator, H: int, W: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(top, left, h, w)``: area fraction in ``scale``, log-uniform aspect ratio;
    the central square after 10 failed tries (as torchvision does)."""
    for _ in range(10):
        a = H * W * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    s = min(H, W)
    return (H - s) // 2, (W - s) // 2, s, s


def block_mask(rng: np.random.Generator, h: int, w: int, ratio: float) -> np.ndarray:
    """bool ``[h, w]`` with about ``ratio * h * w`` patches masked in random rectangles (BEiT/iBOT style)."""
    m = np.zeros((h, w), bool)
    target = int(round(ratio * h * w))
    for _ in range(100):
        if m.sum() >= target:
            break
        area = rng.uniform(1, target - m.sum() + 1)
        r = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        bh = int(np.clip(round(math.sqrt(area * r)), 1, h))
        bw = int(np.clip(round(math.sqrt(area / r)), 1, w))
        y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        m[y : y + bh, x : x + bw] = True
    return m


class MultiCrop:
    """DINO multi-crop on a uint8 image ``[H, W, 3]``, called as ``mc(image, rng)``.

    Returns ``(crops, boxes, masks)``: 2 global crops of ``global_size`` (area scale ``global_scale``) and
    ``n_local`` crops of ``local_size`` (``local_scale``), each float ``[3, S, S]`` ImageNet-normalised;
    ``boxes``: float ``[V, 5]`` (top, left, h, w, flipped; ``[V, 6]`` with the quarter turns when ``rotate > 0``)
    for the dense loss; ``masks``: bool ``[h, w]`` per
    global crop (all False unless ``mask_ratio > 0``: then a crop is masked with probability ``mask_prob``
    at a ratio drawn from ``[0.1, mask_ratio]``). Colour augmentation is strong (jitter with hue rotation,
    channel permutation, grayscale, solarisation on the second view; ``color`` scales it) because in the
    synthetic world colour never tells the class. ``rotate``: probability that a crop is also turned by a
    random non-zero multiple of 90 degrees (recorded in ``boxes``, so the dense term still pairs the same image
    locations): the dense term then rewards orientation-invariant features, as the world's textures have a
    random orientation per instance. Geometry comes from ``rng``, colour from torch's RNG.
    """

    def __init__(
        self,
        global_size: int = 64,
        local_size: int = 32,
        n_local: int = 4,
        patch_size: int = 8,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        color: float = 1.0,
        mask_ratio: float = 0.0,
        mask_prob: float = 0.5,
        rotate: float = 0.0,
    ):
        from torchvision.transforms import v2

        from nbsupport.data.images import IMAGENET_MEAN, IMAGENET_STD

        for name, s in (("global_size", global_size), ("local_size", local_size)):
            if s <= 0 or s % patch_size:
                raise ValueError(f"{name}={s} must be a positive multiple of patch_size={patch_size}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0 <= rotate <= 1:
            raise ValueError(f"rotate must be a probability in [0, 1], got {rotate}")
        self.rotate = rotate
        self.global_size, self.local_size, self.n_local, self.patch = global_size, local_size, n_local, patch_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.mask_ratio, self.mask_prob = mask_ratio, mask_prob
        colour = []
        if color > 0:
            jitter = v2.ColorJitter(0.4 * color, 0.4 * color, 0.5 * color, min(0.5, 0.5 * color))
            colour = [
                v2.RandomApply([jitter], p=0.8),
                v2.RandomApply([v2.RandomChannelPermutation()], p=min(0.5 * color, 1.0)),
                v2.RandomGrayscale(0.2),
            ]
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.first = v2.Compose(colour + tail)
        self.second = v2.Compose(colour + ([v2.RandomSolarize(128, p=0.2)] if color > 0 else []) + tail)
        self._resized_crop = v2.functional.resized_crop
        self._hflip = v2.functional.horizontal_flip

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def _crop(self, t, rng, size, scale):
        top, left, h, w = sample_box(rng, t.shape[-2], t.shape[-1], scale)
        c = self._resized_crop(t, top, left, h, w, [size, size], antialias=True)
        flip = bool(rng.random() < 0.5)
        if flip:
            c = self._hflip(c)
        box = [top, left, h, w, float(flip)]
        if self.rotate > 0:
            k = int(rng.integers(1, 4)) if rng.random() < self.rotate else 0
            c = torch.rot90(c, k, dims=(-2, -1)) if k else c
            box.append(float(k))
        return c, box

    def __call__(self, image, rng: np.random.Generator):
        """``image``: one uint8 ``[H, W, 3]`` array, or a list of them showing one scene in several
        appearances (same geometry): global crop ``k`` is cut from ``image[k % n]``, the local crops from
        ``image[-1]``."""
        views = [image] if isinstance(image, np.ndarray) else list(image)
        ts = [torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1) for v in views]
        if len({tuple(t.shape) for t in ts}) != 1:
            raise ValueError(f"the appearances of one image must have one shape, got {[tuple(t.shape) for t in ts]}")
        crops, boxes, masks = [], [], []
        g = self.global_size // self.patch
        for k in range(2):
            c, b = self._crop(ts[k % len(ts)], rng, self.global_size, self.global_scale)
            crops.append((self.first if k == 0 else self.second)(c))
            boxes.append(b)
            m = np.zeros((g, g), bool)
            if self.mask_ratio > 0 and rng.random() < self.mask_prob:
                m = block_mask(rng, g, g, rng.uniform(min(0.1, self.mask_ratio), self.mask_ratio))
            masks.append(torch.from_numpy(m))
        for _ in range(self.n_local):
            c, b = self._crop(ts[-1], rng, self.local_size, self.local_scale)
            crops.append(self.first(c))
            boxes.append(b)
        return crops, torch.tensor(boxes, dtype=torch.float32), masks


class CropBatches(torch.utils.data.IterableDataset):
    """Endless, resumable batches of multi-crops. Batch ``b`` of rank ``r`` holds images
    ``(b * world + r) * B + k``, ``k < B``; image ``i`` is synthetic train scene ``i`` (seed ``seed``) or,
    with ``files``, file ``perm_e[i mod n]`` of a per-epoch seeded permutation. Every random choice for
    image ``i`` is seeded by ``(seed, i)``, so a step always sees the same crops: exact resume with any
    number of workers (worker ``w`` makes batches ``w, w + workers, ...``, which the DataLoader reads in
    order). Yields ``(crops: V x [B,3,S,S], boxes: V x [B,5], masks: 2 x [B,h,w])``.

    ``appearance`` (synthetic world only): ``"shared"`` - every crop is cut from one rendering of the scene;
    ``"per-view"`` - the scene is rendered three times with the same geometry and texture patterns but its
    own background and object colours (``render_scene(appearance=...)``): one rendering per global crop and
    one for the local crops. ``per_view_ramp`` > 0 (a curriculum): the image trained on at step ``b`` keeps
    one shared rendering with probability ``max(0, 1 - b / per_view_ramp)``. Not in the thesis: per-view
    removes the shortcut a tiny DINO learns first on this world, an image "fingerprint" (background and
    palette shared by all crops of an image), so that what the views share is the objects. It uses no
    labels, but only a renderer can do it."""

    APPEARANCES = ("shared", "per-view")

    @classmethod
    def check_appearance(cls, appearance: str, synthetic: bool) -> None:
        """Raise ``ValueError`` for an unknown ``appearance`` or a re-rendering one on image-folder data."""
        if appearance not in cls.APPEARANCES:
            raise ValueError(f"appearance must be one of {cls.APPEARANCES}, got {appearance!r}")
        if appearance != "shared" and not synthetic:
            raise ValueError(
                f"appearance={appearance!r} needs the synthetic world (it re-renders scenes); "
                "an image folder has one appearance per image"
            )

    def __init__(
        self,
        transform: MultiCrop,
        batch_size: int,
        size: int = 64,
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world: int = 1,
        files=None,
        appearance: str = "shared",
        scene: dict | None = None,
        per_view_ramp: int = 0,
    ):
        self.check_appearance(appearance, synthetic=files is None)
        self.per_view_ramp = per_view_ramp
        self.scene = dict(scene or {})  # extra render_scene arguments (n_objects, scale) for the synthetic world
        self.transform, self.batch_size, self.size, self.seed = transform, batch_size, size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world
        self.files = list(files) if files is not None else None
        self.appearance = appearance

    def image(self, i: int):
        """uint8 ``[H, W, 3]`` image number ``i`` of the stream (a list of 3 with ``appearance="per-view"``)."""
        if self.files is None:
            from nbsupport.data.synthetic import render_scene, scene_rng

            b = i // (self.batch_size * self.world)  # the step that trains on image i
            shared = (
                self.per_view_ramp > 0
                and np.random.default_rng([self.seed, 13, i]).random() < 1 - b / self.per_view_ramp
            )
            if self.appearance == "per-view" and not shared:
                return [
                    render_scene(
                        scene_rng(self.seed, "train", i),
                        size=self.size,
                        **self.scene,
                        appearance=np.random.default_rng([self.seed, 11, i, v]),
                    ).image
                    for v in range(3)
                ]
            return render_scene(scene_rng(self.seed, "train", i), size=self.size, **self.scene).image
        from nbsupport.data.images import ImageLoadError, load_image

        n = len(self.files)
        for j in range(i, i + n):
            perm = np.random.default_rng([self.seed, j // n]).permutation(n)
            try:
                return np.asarray(load_image(self.files[perm[j % n]]))
            except ImageLoadError:
                continue  # unreadable file: take the next one in the order
        raise RuntimeError(f"none of the {n} data files is a readable image")

    def sample(self, i: int):
        rng = np.random.default_rng([self.seed, 7, i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            return self.transform(self.image(i), rng)

    def batch(self, b: int):
        items = [self.sample((b * self.world + self.rank) * self.batch_size + k) for k in range(self.batch_size)]
        n_views = len(items[0][0])
        crops = [torch.stack([it[0][v] for it in items]) for v in range(n_views)]
        boxes = [torch.stack([it[1][v] for it in items]) for v in range(n_views)]
        masks = [torch.stack([it[2][v] for it in items]) for v in range(2)]
        return crops, boxes, masks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + wid
        while True:
            yield self.batch(b)
            b += nw
