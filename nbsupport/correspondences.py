"""Best-buddies and relaxed best-buddies correspondences between two images (thesis 2.3 / 4.2, Fig 2).

Two descriptors are *best buddies* when each is the other's nearest neighbour (cosine similarity). The
thesis *relaxes* the rule to get enough points to build a graph: a pair ``(i, j)`` is kept when ``j``
is among the ``k`` nearest neighbours of ``i`` in image B **and** ``i`` is among the ``k`` nearest of
``j`` in image A (``k = 1`` is plain best buddies; the set only grows with ``k``).

Memory: similarities are computed ``chunk`` rows at a time; the largest temporary is
``chunk x N_other`` floats (2048 x 14,000 x 4 B = 115 MB for ViT-S/8 at stride 4 on 480 px images) plus
the top-k indices ``N x k`` per side, instead of the dense ``N_a x N_b`` matrix (14k x 14k x 4 B =
0.8 GB, plus as much again for the top-k of its transpose). Log-binned 224 px descriptors (3k x 6528)
are dominated by the descriptors themselves (2 x 79 MB). ``benchmarks/best_buddies.py`` measures both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import features

# dino-vit-features tuned the saliency heads for DINO ViT-S/8 only.
SALIENCY_HEADS = {"dino_vits8": [0, 2, 4, 5]}


def _topk_rows(a: torch.Tensor, b: torch.Tensor, k: int, chunk: int | None):
    """Top-k cosine neighbours in ``b`` of every row of ``a``: ``(values [Na, k], indices [Na, k])``."""
    if chunk is None:
        return (a @ b.T).topk(k, dim=1)
    vals, idx = [], []
    for s in range(0, a.shape[0], chunk):
        v, i = (a[s:s + chunk] @ b.T).topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def relaxed_best_buddies(desc_a, desc_b, k: int = 1, chunk: int | None = 2048):
    """Relaxed best buddies: ``(pairs LongTensor [K, 2] of (i in A, j in B), cosine similarity [K])``.

    ``desc_a [Na, D]``, ``desc_b [Nb, D]`` (or grids ``[h, w, D]``, flattened row-major). ``chunk=None``
    computes the dense similarity matrix (for tests); any chunk gives the same pairs. Pairs are sorted
    by ``i`` then by decreasing similarity.
    """
    a = F.normalize(torch.as_tensor(desc_a).float().reshape(-1, torch.as_tensor(desc_a).shape[-1]), dim=-1)
    b = F.normalize(torch.as_tensor(desc_b).float().reshape(-1, torch.as_tensor(desc_b).shape[-1]), dim=-1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ka, kb = min(k, b.shape[0]), min(k, a.shape[0])
    va, ia = _topk_rows(a, b, ka, chunk)          # A -> B neighbours
    _, ib = _topk_rows(b, a, kb, chunk)           # B -> A neighbours
    i = torch.arange(a.shape[0]).repeat_interleave(ka)
    j = ia.reshape(-1)
    sims = va.reshape(-1)
    mutual = (ib[j] == i[:, None]).any(dim=1)
    pairs = torch.stack([i[mutual], j[mutual]], dim=1)
    return pairs, sims[mutual]


def best_buddies(desc_a, desc_b, chunk: int | None = 2048) -> torch.Tensor:
    """Mutual nearest neighbours under cosine similarity: index pairs ``[K, 2]``."""
    return relaxed_best_buddies(desc_a, desc_b, 1, chunk)[0]


def select_diverse(pairs, desc_a, desc_b, saliency_a, saliency_b, n: int = 10, seed: int = 0) -> torch.Tensor:
    """Pick up to ``n`` well-spread pairs as dino-vit-features does: k-means (``n`` clusters, seeded) on the
    L2-normalised concatenation of each pair's two descriptors; per cluster keep the pair with the
    highest mean saliency. Returns the chosen rows of ``pairs`` ``[n', 2]``."""
    from sklearn.cluster import KMeans

    pairs = torch.as_tensor(pairs)
    if n <= 0:
        return pairs[:0]
    if len(pairs) <= n:
        return pairs
    a = torch.as_tensor(desc_a).reshape(-1, torch.as_tensor(desc_a).shape[-1])
    b = torch.as_tensor(desc_b).reshape(-1, torch.as_tensor(desc_b).shape[-1])
    x = F.normalize(torch.cat([a[pairs[:, 0]], b[pairs[:, 1]]], dim=1).float(), dim=1).numpy()
    labels = KMeans(n_clusters=n, random_state=seed, n_init=10).fit_predict(x)
    sal = (torch.as_tensor(saliency_a).reshape(-1)[pairs[:, 0]] + torch.as_tensor(saliency_b).reshape(-1)[pairs[:, 1]]) / 2
    keep = []
    for c in range(n):
        members = np.nonzero(labels == c)[0]
        if len(members):
            keep.append(int(members[int(torch.argmax(sal[members]))]))
    return pairs[sorted(keep)]


@dataclass
class Correspondences:
    """Result of :func:`find_correspondences`. Points are ``[K, 2]`` (y, x) pixels."""

    points_a: np.ndarray            # in the resized (model input) frame of A
    points_b: np.ndarray
    points_a_orig: np.ndarray       # in the original image frame of A
    points_b_orig: np.ndarray
    similarity: np.ndarray          # [K] cosine similarity of the selected pairs
    pairs: torch.Tensor             # [K, 2] selected patch indices
    all_pairs: torch.Tensor         # every salient relaxed-BB pair before selection
    grid_a: tuple[int, int]
    grid_b: tuple[int, int]
    saliency_a: torch.Tensor        # [h, w]
    saliency_b: torch.Tensor
    desc_a: torch.Tensor            # [h*w, D]
    desc_b: torch.Tensor


def patch_index_to_pixel(idx, grid, stride: int, patch: int) -> np.ndarray:
    """Flat patch indices -> (y, x) pixel centres ``[K, 2]`` in the model-input frame."""
    idx = np.asarray(idx).reshape(-1)
    yx = np.stack([idx // grid[1], idx % grid[1]], axis=1)
    return features.patch_to_pixel(yx, stride, patch)


def descriptors(model, image: torch.Tensor, layer: int = 9, facet: str = "key", bin: bool = True,
                stride: int | None = 4, saliency_heads=None):
    """``(descriptors [h*w, D'], saliency [h, w], grid)`` of one normalised image ``[3, H, W]``."""
    x = image[None] if image.dim() == 3 else image
    d = features.extract(model, x, facet, layer, stride)
    if bin:
        d = features.log_bin(d)
    grid = tuple(d.shape[1:3])
    heads = saliency_heads if saliency_heads is not None else SALIENCY_HEADS.get(model.nbs_info.get("name"))
    sal = features.cls_saliency(model, x, layer=-1, heads=heads, stride=stride)[0]
    return d[0].reshape(-1, d.shape[-1]), sal, grid


def find_correspondences(model, img_a, img_b, n_pairs: int = 10, size: int = 224, layer: int = 9,
                         facet: str = "key", bin: bool = True, thresh: float = 0.05, stride: int | None = 4,
                         k: int = 1, saliency_heads=None, seed: int = 0, chunk: int | None = 2048) -> Correspondences:
    """Correspondences between two PIL images with the reference defaults (layer 9 keys, log-binned,
    stride 4, saliency threshold 0.05, 10 pairs by k-means) and the thesis's relaxed rule via ``k``.

    Both images are resized to ``size x size``; pairs where either patch's saliency is <= ``thresh`` are
    dropped (salient foreground only)."""
    from .data import image_to_tensor

    stride = stride or features.patch_size(model)
    da, sa, ga = descriptors(model, image_to_tensor(img_a, size), layer, facet, bin, stride, saliency_heads)
    db, sb, gb = descriptors(model, image_to_tensor(img_b, size), layer, facet, bin, stride, saliency_heads)
    return match((da, sa, ga), (db, sb, gb), (img_a.height, img_a.width), (img_b.height, img_b.width), size,
                 stride, features.patch_size(model), n_pairs, thresh, k, seed, chunk)


def match(desc_a, desc_b, orig_hw_a, orig_hw_b, size: int, stride: int, patch: int, n_pairs: int = 10,
          thresh: float = 0.05, k: int = 1, seed: int = 0, chunk: int | None = 2048) -> Correspondences:
    """Correspondences from precomputed :func:`descriptors` tuples ``(desc, saliency, grid)`` of two images
    (reuse them across queries and values of ``k``); ``orig_hw_*`` are the original image sizes."""
    (da, sa, ga), (db, sb, gb) = desc_a, desc_b
    pairs, sims = relaxed_best_buddies(da, db, k, chunk)
    fg = (sa.reshape(-1)[pairs[:, 0]] > thresh) & (sb.reshape(-1)[pairs[:, 1]] > thresh)
    pairs, sims = pairs[fg], sims[fg]
    chosen = select_diverse(pairs, da, db, sa, sb, n_pairs, seed)
    order = {tuple(r): s for r, s in zip(pairs.tolist(), sims.tolist())}
    sel_sims = np.array([order[tuple(r)] for r in chosen.tolist()])
    pa = patch_index_to_pixel(chosen[:, 0], ga, stride, patch)
    pb = patch_index_to_pixel(chosen[:, 1], gb, stride, patch)
    scale_a = np.array([orig_hw_a[0] / size, orig_hw_a[1] / size])
    scale_b = np.array([orig_hw_b[0] / size, orig_hw_b[1] / size])
    return Correspondences(pa, pb, pa * scale_a, pb * scale_b, sel_sims, chosen, pairs, ga, gb, sa, sb, da, db)


def all_salient_points(c: Correspondences, stride: int, patch: int, size: int, orig_hw_a, orig_hw_b):
    """Original-frame pixel points ``([K, 2], [K, 2])`` of every salient pair (before selection)."""
    pa = patch_index_to_pixel(c.all_pairs[:, 0], c.grid_a, stride, patch) * np.array(orig_hw_a) / size
    pb = patch_index_to_pixel(c.all_pairs[:, 1], c.grid_b, stride, patch) * np.array(orig_hw_b) / size
    return pa, pb


def pair_precision(points_a, points_b, labels_a, labels_b) -> float:
    """Fraction of pairs whose two pixel points ``(y, x)`` lie on the same class in both label maps
    (background 0 and unknown -1 never count as a match). NaN when there are no pairs."""
    pa, pb = np.asarray(points_a).reshape(-1, 2).astype(int), np.asarray(points_b).reshape(-1, 2).astype(int)
    if len(pa) == 0:
        return float("nan")
    la, lb = np.asarray(labels_a), np.asarray(labels_b)
    ya, xa = np.clip(pa[:, 0], 0, la.shape[0] - 1), np.clip(pa[:, 1], 0, la.shape[1] - 1)
    yb, xb = np.clip(pb[:, 0], 0, lb.shape[0] - 1), np.clip(pb[:, 1], 0, lb.shape[1] - 1)
    ca, cb = la[ya, xa], lb[yb, xb]
    return float(np.mean((ca == cb) & (ca > 0)))
