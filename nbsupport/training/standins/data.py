"""Training scenes of the stand-ins: a pool of synthetic train scenes rendered once, with their labels on
the ViT/8 patch grid (semantic class, instance id, image-level classes, background name)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbsupport.data.images import image_to_tensor
from nbsupport.data.synthetic import render_scene, scene_rng
from nbsupport.data.synthetic.world import BACKGROUNDS, CLASSES, OBJECT_SCALE

#: Object classes 1..K of the synthetic world (background is 0).
N_CLASSES = len(CLASSES)


@dataclass
class ScenePool:
    """``images [n, 3, S, S]`` ImageNet-normalised, ``semantic [n, h, w]`` (class per patch, -1 = mixed),
    ``instance [n, h, w]`` (0 = background, k = k-th object, -1 = mixed), ``classes [n, K]`` multi-hot
    object classes, ``object_class [n, M]`` class id of object k (index k - 1; 0 = no object), ``background
    [n]`` index into :data:`BACKGROUNDS`, ``captions``."""

    images: torch.Tensor
    semantic: torch.Tensor
    instance: torch.Tensor
    classes: torch.Tensor
    object_class: torch.Tensor
    background: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx) -> dict:
        """The fields of scenes ``idx`` (a 1-d index tensor) as a dict (captions as a list)."""
        out = {k: getattr(self, k)[idx] for k in ("images", "semantic", "instance", "classes", "object_class")}
        out["background"] = self.background[idx]
        out["captions"] = [self.captions[int(i)] for i in idx]
        return out


def cell_majority(labels: np.ndarray, patch: int, n_labels: int, min_fraction: float = 0.5) -> np.ndarray:
    """The majority label of every ``patch x patch`` cell of ``labels [S, S]`` (values ``0..n_labels-1``), -1
    where it covers less than ``min_fraction`` of the cell: :func:`~nbsupport.analysis.grid_truth.labels_on_grid`
    for a grid of exact cells, vectorised (the pool is labelled at every start of a run)."""
    g = labels.shape[0] // patch
    counts = np.eye(n_labels, dtype=np.int32)[labels].reshape(g, patch, g, patch, n_labels).sum((1, 3))
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= min_fraction * patch * patch, best, -1).astype(np.int64)


def scene_pool(
    n: int,
    size: int,
    seed: int = 0,
    split: str = "train",
    patch: int = 8,
    max_objects: int = 3,
    min_fraction=0.5,
    cache: bool = True,
) -> ScenePool:
    """Render scenes ``0..n-1`` of ``split`` (``scene_rng(seed, split, i)``) at ``size`` px, 1..``max_objects``
    objects of the world's default scale, with their labels on the ``size / patch`` grid (a patch takes the
    label covering ``min_fraction`` of it, else -1). ``cache``: kept in ``data/generated/`` (keyed by the
    arguments and the world version), since rendering is most of a short run's start."""
    from nbsupport.core import paths
    from nbsupport.data.synthetic.render import WORLD_VERSION

    key = f"v{WORLD_VERSION}-{n}-{size}-{seed}-{split}-{patch}-{max_objects}-{min_fraction}"
    file = paths.generated_dir() / "standins" / f"pool-{key}.pt"
    if cache and file.is_file():
        d = torch.load(file, weights_only=True)
        return ScenePool(**{k: d[k] for k in _TENSORS}, captions=list(d["captions"]))
    pool = _render_pool(n, size, seed, split, patch, max_objects, min_fraction)
    if cache:
        from nbsupport.core.io import atomic_torch_save

        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({**{k: getattr(pool, k) for k in _TENSORS}, "captions": pool.captions}, file)
    return pool


_TENSORS = ("images", "semantic", "instance", "classes", "object_class", "background")


def crop_batch(batch: dict, crop: int, patch: int, g: torch.Generator) -> dict:
    """Patch-aligned random ``crop x crop`` windows of a batch's images and label grids (one per image)."""
    size = batch["images"].shape[-1]
    if crop <= 0 or crop >= size:
        return batch
    n = (size - crop) // patch + 1
    out = {k: [] for k in ("images", "semantic", "instance")}
    c = crop // patch
    for b in range(len(batch["images"])):
        oy, ox = (int(v) for v in torch.randint(n, (2,), generator=g))
        out["images"].append(batch["images"][b, :, oy * patch : oy * patch + crop, ox * patch : ox * patch + crop])
        for k in ("semantic", "instance"):
            out[k].append(batch[k][b, oy : oy + c, ox : ox + c])
    out = {k: torch.stack(v) for k, v in out.items()}
    out["classes"] = (out["semantic"][..., None] == torch.arange(1, N_CLASSES + 1)).flatten(1, 2).any(1).float()
    return {**batch, **out}


def _render_pool(n, size, seed, split, patch, max_objects, min_fraction) -> ScenePool:
    imgs, sem, inst, cls, objc, bg, caps = [], [], [], [], [], [], []
    for i in range(int(n)):
        s = render_scene(scene_rng(seed, split, i), size=size, n_objects=(1, max_objects), scale=OBJECT_SCALE)
        imgs.append(image_to_tensor(s.image))
        ids = np.zeros((size, size), np.int64)
        for k, m in enumerate(s.instance_masks, 1):
            ids[m] = k
        sem.append(cell_majority(np.asarray(s.semantic, np.int64), patch, N_CLASSES + 1, min_fraction))
        inst.append(cell_majority(ids, patch, max_objects + 1, min_fraction))
        c = np.zeros(N_CLASSES, np.float32)
        c[np.asarray(s.category_ids, int) - 1] = 1.0
        cls.append(c)
        oc = np.zeros(max_objects, np.int64)
        oc[: len(s.category_ids)] = s.category_ids
        objc.append(oc)
        bg.append(BACKGROUNDS.index(s.background))
        caps.append(s.caption)
    return ScenePool(
        torch.stack(imgs),
        torch.from_numpy(np.stack(sem)),
        torch.from_numpy(np.stack(inst)),
        torch.from_numpy(np.stack(cls)),
        torch.from_numpy(np.stack(objc)),
        torch.tensor(bg, dtype=torch.int64),
        caps,
    )
