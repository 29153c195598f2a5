"""Best buddies and relaxed best buddies between two images (thesis section 2.3 and 4.2, Fig 2).

Two patch descriptors are *best buddies* (Aberman et al., "Neural best-buddies", thesis ref [19]) when
each is the other's nearest neighbour under cosine similarity. The thesis *relaxes* the rule to get
enough corresponding points to build a graph: ``(i, j)`` is kept when ``j`` is among the ``k`` nearest
neighbours of ``i`` in image B **and** ``i`` is among the ``k`` nearest neighbours of ``j`` in image A.
``k = 1`` is plain best buddies and the sets are nested (``k`` only adds pairs). The *mutual rank* of a
pair is the smallest ``k`` at which it appears, so one call at ``k_max`` answers every ``k <= k_max``
(:func:`mutual_ranks`).

Determinism: neighbour lists are ordered by decreasing similarity, exact ties broken by the lower
index, so a result depends only on the descriptors (not on ``chunk`` or on ``torch.topk``'s tie order).

Memory: cosine similarities are computed ``chunk`` rows at a time, never the whole ``Na x Nb`` matrix.
Each block costs about ``chunk * N_other * 13`` bytes (float32 similarities, ``torch.topk``'s int64
scratch, a bool tie mask; measured by ``benchmarks/best_buddies.py``), on top of the normalised float32
copies of the descriptors (``(Na + Nb) * D * 4``), the neighbour lists (``(Na + Nb) * k * 12``) and
``Na * k * k`` bytes for the mutual check. Measured peaks (extra resident memory, 2 CPU threads):

- ViT-S/8 keys at stride 4 on 480 px images, 14,000 x 384 per image: chunk 1024 ~0.25 GB, chunk 2048
  ~0.45-0.55 GB, dense 2.5 GB; about 3.5 s whatever the chunk, for k = 1 or 5;
- log-binned ViT-S/8 keys at stride 4 on 224 px (the reference default), 3,025 x 6,528: ~0.25 GB
  whatever the chunk (the descriptors dominate), about 2 s.

The full pipeline (:func:`find_correspondences`) follows dino-vit-features' defaults: layer-9 keys,
log-binned, stride 4, saliency threshold 0.05, 10 pairs chosen by k-means (see :func:`select_diverse`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.models import features

# dino-vit-features averages the last block's CLS attention over heads [0, 2, 4, 5], a choice tuned for
# DINO ViT-S/8 only; every other backbone (random-init ones included) uses all heads.
SALIENCY_HEADS = {"dino_vits8": [0, 2, 4, 5]}


FOREGROUND_MODES = ("filter", "restrict")


# ------------------------------------------------------------------------------------- matching core
def _as_matrix(desc, name: str) -> torch.Tensor:
    """``[N, D]`` (or a grid ``[h, w, D]``, flattened row-major) -> L2-normalised float32 ``[N, D]``."""
    t = torch.as_tensor(desc)
    if t.dim() < 2:
        raise ValueError(f"{name} must be [N, D] descriptors (or a grid [h, w, D]), got shape {tuple(t.shape)}")
    t = t.reshape(-1, t.shape[-1]).float()
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return F.normalize(t, dim=1)


def _topk_block(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``s [c, N]``, ordered by value (desc) then index (asc); exact ties at the
    k-th place go to the lower indices. Only rows with such ties pay for the slow path."""
    vals, idx = s.topk(k, dim=1)
    kth = vals[:, -1:]
    tied = (s >= kth).sum(dim=1) > k  # more candidates than places: topk's choice is arbitrary
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        sr, kr = s[rows], kth[rows]
        gt = sr > kr
        eq = sr == kr
        need = (k - gt.sum(dim=1, dtype=torch.int32))[:, None]
        pick = gt | (eq & (eq.cumsum(dim=1, dtype=torch.int32) <= need))
        idx_r = pick.nonzero()[:, 1].reshape(len(rows), k)  # row-major: exactly k per row, ascending
        idx[rows] = idx_r
        vals[rows] = sr.gather(1, idx_r)
    # canonical order inside the k: stable sort by index, then stable sort by value (descending)
    idx, o = idx.sort(dim=1, stable=True)
    vals = vals.gather(1, o)
    vals, o = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, o)


def _topk_rows(a: torch.Tensor, b: torch.Tensor, k: int, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-``k`` in ``b`` of every row of ``a`` (both normalised): ``(values [Na, k], indices [Na, k])``."""
    step = a.shape[0] if chunk is None else chunk
    vals, idx = [], []
    for s in range(0, a.shape[0], step):
        v, i = _topk_block(a[s : s + step] @ b.T, k)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _check_chunk(chunk) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (rows per block) or None (dense), got {chunk!r}")


def mutual_ranks(desc_a, desc_b, k_max: int = 1, chunk: int | None = 1024):
    """Every pair that is mutually within the top-``k_max``, with its mutual rank.

    ``desc_a [Na, D]``, ``desc_b [Nb, D]`` (or grids ``[h, w, D]``, flattened row-major). Returns
    ``(pairs LongTensor [K, 2] of (i in A, j in B), sims [K] cosine, ranks LongTensor [K])`` where
    ``rank = max(position of j in i's list, position of i in j's list)`` (1-based): the pair is a relaxed
    best buddy for every ``k >= rank``, so ``pairs[ranks <= k]`` is the relaxed set for any
    ``k <= k_max``. Pairs are sorted by ``i``, then by decreasing similarity. ``chunk=None`` computes the
    dense ``Na x Nb`` matrix at once (for tests); every chunk size gives the same result.
    """
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k must be an int >= 1, got {k_max!r}")
    _check_chunk(chunk)
    a, b = _as_matrix(desc_a, "desc_a"), _as_matrix(desc_b, "desc_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor sizes differ: desc_a has D={a.shape[1]}, desc_b has D={b.shape[1]}")
    if a.device != b.device:
        b = b.to(a.device)
    ka, kb = min(int(k_max), b.shape[0]), min(int(k_max), a.shape[0])
    va, ia = _topk_rows(a, b, ka, chunk)  # A -> B lists [Na, ka]
    _, ib = _topk_rows(b, a, kb, chunk)  # B -> A lists [Nb, kb]
    i = torch.arange(a.shape[0], device=a.device).repeat_interleave(ka)
    j = ia.reshape(-1)
    hit = ib[j] == i[:, None]  # [Na * ka, kb]: where i sits in j's list
    mutual = hit.any(dim=1)
    r_ab = torch.arange(ka, device=a.device).repeat(a.shape[0])
    r_ba = hit.to(torch.uint8).argmax(dim=1)
    ranks = torch.maximum(r_ab, r_ba) + 1
    pairs = torch.stack([i[mutual], j[mutual]], dim=1)
    return pairs, va.reshape(-1)[mutual], ranks[mutual]


def relaxed_best_buddies(desc_a, desc_b, k: int = 1, chunk: int | None = 1024):
    """Relaxed best buddies (thesis 2.3 / 4.2): ``(pairs LongTensor [K, 2], sims [K])``.

    ``(i, j)`` is kept when ``j`` is among the ``k`` most cosine-similar descriptors of ``i`` in B and
    ``i`` among the ``k`` most similar of ``j`` in A; ``k=1`` gives :func:`best_buddies`. Ties are broken
    by the lower index; memory and ordering as in :func:`mutual_ranks`.
    """
    pairs, sims, _ = mutual_ranks(desc_a, desc_b, k, chunk)
    return pairs, sims


def best_buddies(desc_a, desc_b, chunk: int | None = 1024) -> torch.Tensor:
    """Mutual nearest neighbours under cosine similarity: index pairs ``LongTensor [K, 2]`` (i in A, j in B)."""
    return mutual_ranks(desc_a, desc_b, 1, chunk)[0]


# ------------------------------------------------------------------------------------- selection
def select_diverse(pairs, desc_a, desc_b, saliency_a, saliency_b, n: int = 10, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` well-spread pairs, chosen as dino-vit-features does.

    Each pair's two descriptors are concatenated and L2-normalised; KMeans with
    ``min(n, #pairs)`` clusters (``random_state=seed``, ``n_init=10``) groups them, and each cluster keeps
    its pair with the highest mean saliency ``(saliency_a[i] + saliency_b[j]) / 2`` (the first such pair
    on ties). ``pairs [K, 2]`` index the flattened ``desc_* [N, D]`` and ``saliency_* [N]`` (grids are
    flattened). Returns the chosen rows of ``pairs`` in their original order, ``[n', 2]`` with
    ``n' <= n`` (fewer when identical descriptors leave clusters empty). With ``#pairs <= n`` every pair
    is returned (each would be its own cluster). KMeans dominates the cost when there are thousands of
    pairs of log-binned descriptors (tens of seconds on CPU for ~3,000 pairs of 13k dimensions).
    """
    from sklearn.cluster import KMeans

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    if n == 0 or len(pairs) == 0:
        return pairs[:0]
    if len(pairs) <= n:
        return pairs
    a = torch.as_tensor(desc_a).reshape(-1, torch.as_tensor(desc_a).shape[-1])
    b = torch.as_tensor(desc_b).reshape(-1, torch.as_tensor(desc_b).shape[-1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor sizes differ: desc_a has D={a.shape[1]}, desc_b has D={b.shape[1]}")
    x = torch.cat([a[pairs[:, 0].to(a.device)], b[pairs[:, 1].to(b.device)]], dim=1).double()
    x = F.normalize(x, dim=1).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct clusters than n_clusters" with duplicate points
        labels = KMeans(n_clusters=n, random_state=seed, n_init=10).fit_predict(x)
    sal_a = torch.as_tensor(saliency_a).reshape(-1).cpu()
    sal_b = torch.as_tensor(saliency_b).reshape(-1).cpu()
    sal = ((sal_a[pairs[:, 0].cpu()] + sal_b[pairs[:, 1].cpu()]) / 2).numpy()
    keep = []
    for c in range(n):
        members = np.flatnonzero(labels == c)
        if len(members):
            keep.append(int(members[np.argmax(sal[members])]))
    return pairs[sorted(keep)]


# ------------------------------------------------------------------------------------- coordinates
def patch_index_to_pixel(idx, grid, stride: int, patch: int) -> np.ndarray:
    """Flat patch indices (row-major over ``grid = (h, w)``) -> (y, x) pixel centres ``[K, 2]`` in the model
    input frame: ``y * stride + patch // 2`` (the reference's convention)."""
    idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx).reshape(-1).astype(np.int64)
    h, w = grid
    if idx.size and (idx.min() < 0 or idx.max() >= h * w):
        raise ValueError(f"patch index out of range for a {h}x{w} grid: {idx.min()}..{idx.max()}")
    yx = np.stack([idx // w, idx % w], axis=1)
    return features.patch_to_pixel(yx, stride, patch)


def to_original_frame(points, input_hw, orig_hw) -> np.ndarray:
    """(y, x) pixels of the resized model input ``input_hw`` -> the original image ``orig_hw``.

    Pixel centres are matched as image resizing does: ``y_orig = (y + 0.5) * H_orig / H_in - 0.5``;
    equal sizes give the points back unchanged."""
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    scale = np.asarray(orig_hw, dtype=float) / np.asarray(input_hw, dtype=float)
    return (p + 0.5) * scale - 0.5


def grid_extent(grid, stride: int, patch: int) -> tuple[float, float, float, float]:
    """``imshow`` extent ``(left, right, bottom, top)`` putting cell ``(y, x)`` of a patch map ``[h, w]``
    over its patch centre (:func:`patch_index_to_pixel`), each cell ``stride`` pixels wide."""
    h, w = grid
    c0 = patch // 2 - stride / 2
    return (c0, c0 + w * stride, c0 + h * stride, c0)


# ------------------------------------------------------------------------------------- pipeline
@dataclass
class ImageDescriptors:
    """Descriptors of one image, computed once and reused for every partner and every ``k``.
    Unpacks as ``desc, saliency, grid`` (the tuple :func:`match` takes)."""

    desc: torch.Tensor  # [h*w, D'] (D' = 17 D when log-binned)
    saliency: torch.Tensor  # [h, w] in [0, 1]
    grid: tuple[int, int]

    def __iter__(self):
        return iter((self.desc, self.saliency, self.grid))


def default_saliency_heads(model) -> list[int] | None:
    """Reference heads for ``dino_vits8``; None (all heads) for every other backbone."""
    return SALIENCY_HEADS.get(getattr(model, "nbs_info", {}).get("name"))


def descriptors(
    model,
    image: torch.Tensor,
    layer: int = 9,
    facet: str = "key",
    bin: bool = True,
    stride: int | None = 4,
    saliency_heads=None,
) -> ImageDescriptors:
    """Descriptors, saliency and grid of one ImageNet-normalised image ``[3, H, W]``.

    Descriptors: ``facet`` of block ``layer`` (log-binned, hierarchy 2, when ``bin``). Saliency: the last
    block's CLS attention, min-max normalised, averaged over ``saliency_heads`` (None: heads [0, 2, 4, 5]
    for ``dino_vits8`` as in the reference, all heads for any other backbone)."""
    x = image[None] if image.dim() == 3 else image
    if x.shape[0] != 1:
        raise ValueError(f"descriptors takes one image [3, H, W], got a batch of {x.shape[0]}")
    d = features.extract(model, x, facet, layer, stride)
    if bin:
        d = features.log_bin(d)
    grid = (int(d.shape[1]), int(d.shape[2]))
    heads = saliency_heads if saliency_heads is not None else default_saliency_heads(model)
    sal = features.cls_saliency(model, x, layer=-1, heads=heads, stride=stride)[0]
    return ImageDescriptors(d[0].reshape(-1, d.shape[-1]), sal, grid)


@dataclass
class Correspondences:
    """Result of :func:`find_correspondences` / :func:`match`. Points are ``(y, x)`` pixel arrays ``[K, 2]``;
    ``pairs`` index the flattened patch grids (row-major). Tensors are on the CPU."""

    points_a: np.ndarray  # selected pairs, model-input (resized) frame of A
    points_b: np.ndarray
    points_a_orig: np.ndarray  # same points in the original frame of A
    points_b_orig: np.ndarray
    similarity: np.ndarray  # [K] cosine similarity of the selected pairs
    pairs: torch.Tensor  # [K, 2] selected pairs
    all_pairs: torch.Tensor  # [M, 2] every salient relaxed-BB pair, before the k-means selection
    all_similarity: torch.Tensor  # [M]
    all_ranks: torch.Tensor  # [M] mutual rank of each pair (1 = plain best buddies)
    n_unfiltered: int  # relaxed-BB pairs before the saliency filter ("filter" mode)
    unfiltered_ranks: torch.Tensor  # [n_unfiltered] their mutual ranks (count pairs at any k <= self.k)
    saliency_a: torch.Tensor  # [h, w]
    saliency_b: torch.Tensor
    grid_a: tuple[int, int]
    grid_b: tuple[int, int]
    stride: int
    patch: int
    input_hw_a: tuple[int, int]  # model-input size of A (H, W)
    input_hw_b: tuple[int, int]
    orig_hw_a: tuple[int, int]  # original size of A (H, W)
    orig_hw_b: tuple[int, int]
    k: int = 1
    thresh: float = 0.05
    foreground: str = "filter"
    meta: dict = field(default_factory=dict)

    def points(self, which: str = "all", frame: str = "orig") -> tuple[np.ndarray, np.ndarray]:
        """``(points_a, points_b)`` of the ``"all"`` salient pairs or the ``"selected"`` ones, in the
        ``"orig"`` or ``"input"`` frame."""
        if which not in ("all", "selected"):
            raise ValueError(f"which must be 'all' or 'selected', got {which!r}")
        if frame not in ("orig", "input"):
            raise ValueError(f"frame must be 'orig' or 'input', got {frame!r}")
        pr = self.all_pairs if which == "all" else self.pairs
        pa = patch_index_to_pixel(pr[:, 0], self.grid_a, self.stride, self.patch).astype(float)
        pb = patch_index_to_pixel(pr[:, 1], self.grid_b, self.stride, self.patch).astype(float)
        if frame == "orig":
            pa = to_original_frame(pa, self.input_hw_a, self.orig_hw_a)
            pb = to_original_frame(pb, self.input_hw_b, self.orig_hw_b)
        return pa, pb

    def salient_points(self, side: str = "b", frame: str = "orig") -> np.ndarray:
        """Pixel centres ``[M, 2]`` of every patch of image ``side`` ("a" or "b") with saliency > ``thresh``:
        the candidates a pair end could land on (for :func:`chance_precision`)."""
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        sal, grid = (self.saliency_a, self.grid_a) if side == "a" else (self.saliency_b, self.grid_b)
        idx = np.flatnonzero(sal.reshape(-1).cpu().numpy() > self.thresh)
        pts = patch_index_to_pixel(idx, grid, self.stride, self.patch).astype(float)
        if frame == "orig":
            hw_in, hw_orig = (self.input_hw_a, self.orig_hw_a) if side == "a" else (self.input_hw_b, self.orig_hw_b)
            pts = to_original_frame(pts, hw_in, hw_orig)
        return pts

    def at_k(self, k: int) -> torch.Tensor:
        """Boolean mask over ``all_pairs``: the pairs that are relaxed best buddies at ``k`` (<= this k)."""
        if k > self.k:
            raise ValueError(f"computed up to k={self.k}; cannot answer k={k}")
        return self.all_ranks <= k


def _load_any(img):
    """PIL image, path, or uint8 array ``[H, W, 3]`` -> PIL RGB image."""
    from PIL import Image

    from nbsupport.data.images import load_image

    if isinstance(img, (str, Path)):
        return load_image(img)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"array images must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        return Image.fromarray(img)
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    raise TypeError(f"image must be a path, a PIL image or a uint8 array, got {type(img).__name__}")


def find_correspondences(
    model,
    img_a,
    img_b,
    n_pairs: int = 10,
    size: int | None = 224,
    layer: int = 9,
    facet: str = "key",
    bin: bool = True,
    thresh: float = 0.05,
    stride: int | None = 4,
    k: int = 1,
    saliency_heads=None,
    seed: int = 0,
    chunk: int | None = 1024,
    foreground: str = "filter",
) -> Correspondences:
    """Keypoint correspondences between two images (thesis Fig 2) with dino-vit-features' defaults.

    ``img_a``/``img_b``: paths, PIL images or uint8 arrays; both are resized to ``size x size`` (None:
    kept, cropped to a multiple of the patch). Steps: descriptors (``facet`` of block ``layer``,
    log-binned when ``bin``, patch ``stride``); relaxed best buddies with ``k`` (1 = the reference);
    foreground by the last block's CLS saliency ``> thresh`` in both images (``saliency_heads``: see
    :func:`descriptors`); ``n_pairs`` pairs chosen by :func:`select_diverse` (``seed``).

    ``foreground="filter"`` (reference): best buddies among all patches, then pairs with a non-salient
    end are dropped. ``"restrict"`` (thesis 2.3 / Fig 2: the relaxed best buddies of the foreground
    descriptors, the foreground being the saliency map thresholded): the salient patches of each image
    are selected first and the mutual top-``k`` runs on them alone, so a salient patch whose nearest
    neighbour is a background patch can still find a salient partner (more pairs, none on background).
    (The reference's own B-side test is looser: it keeps ``i`` when *some* salient B patch has ``i`` as
    its nearest neighbour; here both ends of the pair must be salient.)
    """
    from nbsupport.data.images import image_to_tensor

    pa_img, pb_img = _load_any(img_a), _load_any(img_b)
    p = features.patch_size(model)
    stride = stride or p
    ta = image_to_tensor(pa_img, size, patch=None if size else p)
    tb = image_to_tensor(pb_img, size, patch=None if size else p)
    da = descriptors(model, ta, layer, facet, bin, stride, saliency_heads)
    db = descriptors(model, tb, layer, facet, bin, stride, saliency_heads)
    orig_a = (pa_img.height, pa_img.width) if size else tuple(ta.shape[-2:])
    orig_b = (pb_img.height, pb_img.width) if size else tuple(tb.shape[-2:])
    res = match(
        da,
        db,
        orig_a,
        orig_b,
        tuple(ta.shape[-2:]),
        stride,
        p,
        n_pairs,
        thresh,
        k,
        seed,
        chunk,
        foreground,
        input_hw_b=tuple(tb.shape[-2:]),
    )
    res.meta.update(layer=layer, facet=facet, bin=bin, size=size, model=getattr(model, "nbs_info", {}).get("name"))
    return res


def match(
    desc_a,
    desc_b,
    orig_hw_a,
    orig_hw_b,
    size,
    stride: int,
    patch: int,
    n_pairs: int = 10,
    thresh: float = 0.05,
    k: int = 1,
    seed: int = 0,
    chunk: int | None = 1024,
    foreground: str = "filter",
    input_hw_b=None,
) -> Correspondences:
    """Correspondences from precomputed :func:`descriptors` of two images (reuse them across partners
    and values of ``k``). ``orig_hw_*``: original image sizes ``(H, W)``; ``size``: the model-input size
    (int for square inputs, or ``(H, W)`` of A; ``input_hw_b`` for B when it differs).
    ``n_pairs=0`` skips the k-means selection. Other arguments as in :func:`find_correspondences`."""
    if foreground not in FOREGROUND_MODES:
        raise ValueError(f"foreground must be one of {FOREGROUND_MODES}, got {foreground!r}")
    (da, sa, ga), (db, sb, gb) = desc_a, desc_b
    in_a = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    in_b = tuple(input_hw_b) if input_hw_b is not None else in_a
    fa, fb = sa.reshape(-1) > thresh, sb.reshape(-1) > thresh
    if foreground == "filter":
        raw, raw_sims, raw_ranks = mutual_ranks(da, db, k, chunk)
        keep = fa[raw[:, 0]] & fb[raw[:, 1]]
        pairs, sims, ranks = raw[keep], raw_sims[keep], raw_ranks[keep]
        n_unfiltered, unfiltered_ranks = len(raw), raw_ranks
    else:
        ia, ib = fa.nonzero().squeeze(1), fb.nonzero().squeeze(1)
        if len(ia) and len(ib):
            sub, sims, ranks = mutual_ranks(da[ia], db[ib], k, chunk)
            pairs = torch.stack([ia[sub[:, 0]], ib[sub[:, 1]]], dim=1)
        else:
            pairs, sims = torch.zeros((0, 2), dtype=torch.long), torch.zeros(0)
            ranks = torch.zeros(0, dtype=torch.long)
        n_unfiltered, unfiltered_ranks = len(pairs), ranks
    # results live on the CPU (small); descriptors stay where they are
    pairs, sims, ranks, unfiltered_ranks = pairs.cpu(), sims.cpu(), ranks.cpu(), unfiltered_ranks.cpu()
    sa, sb = sa.cpu(), sb.cpu()
    chosen_rows = _select_rows(pairs, da, db, sa, sb, n_pairs, seed)
    empty = np.zeros((0, 2))
    res = Correspondences(
        points_a=empty,
        points_b=empty,
        points_a_orig=empty,
        points_b_orig=empty,
        similarity=sims[chosen_rows].numpy(),
        pairs=pairs[chosen_rows],
        all_pairs=pairs,
        all_similarity=sims,
        all_ranks=ranks,
        n_unfiltered=n_unfiltered,
        unfiltered_ranks=unfiltered_ranks,
        saliency_a=sa,
        saliency_b=sb,
        grid_a=tuple(ga),
        grid_b=tuple(gb),
        stride=stride,
        patch=patch,
        input_hw_a=in_a,
        input_hw_b=in_b,
        orig_hw_a=tuple(orig_hw_a),
        orig_hw_b=tuple(orig_hw_b),
        k=k,
        thresh=thresh,
        foreground=foreground,
    )
    res.points_a, res.points_b = res.points("selected", "input")
    res.points_a_orig, res.points_b_orig = res.points("selected", "orig")
    return res


def _select_rows(pairs, da, db, sa, sb, n, seed) -> torch.Tensor:
    """Row indices into ``pairs`` of :func:`select_diverse`'s choice."""
    if n == 0 or len(pairs) == 0:
        return torch.zeros(0, dtype=torch.long)
    chosen = select_diverse(pairs, da, db, sa, sb, n, seed)
    row = {tuple(r): t for t, r in enumerate(pairs.tolist())}
    return torch.tensor([row[tuple(r)] for r in chosen.tolist()], dtype=torch.long)


def all_salient_points(
    c: Correspondences, stride: int | None = None, patch: int | None = None, size=None, orig_hw_a=None, orig_hw_b=None
) -> tuple[np.ndarray, np.ndarray]:
    """Original-frame points ``([M, 2], [M, 2])`` of every salient pair (before selection). The extra
    arguments are accepted for backwards compatibility and ignored: ``c`` carries them."""
    return c.points("all", "orig")


# ------------------------------------------------------------------------------------- ground truth
def _labels_at(points, labels) -> np.ndarray:
    p = np.rint(np.asarray(points, dtype=float).reshape(-1, 2)).astype(int)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a label map [H, W], got shape {lab.shape}")
    y = np.clip(p[:, 0], 0, lab.shape[0] - 1)
    x = np.clip(p[:, 1], 0, lab.shape[1] - 1)
    return lab[y, x]


def pair_precision(points_a, points_b, labels_a, labels_b) -> float:
    """Fraction of pairs whose two points (pixel ``(y, x)``, rounded, clipped to the map) carry the same
    class in the label maps ``labels_* [H, W]`` (original frames). Background (0) and unknown (< 0) never
    count as a match, so pairs on background lower the precision. NaN when there are no pairs."""
    if len(np.asarray(points_a).reshape(-1, 2)) != len(np.asarray(points_b).reshape(-1, 2)):
        raise ValueError("points_a and points_b must have the same length")
    ca, cb = _labels_at(points_a, labels_a), _labels_at(points_b, labels_b)
    if len(ca) == 0:
        return float("nan")
    return float(np.mean((ca == cb) & (ca > 0)))


def chance_precision(points_a, labels_a, labels_b, candidates_b=None) -> float:
    """Expected :func:`pair_precision` when each A point gets a *random* partner in B: ``sum_c P_a(c) Q_b(c)``
    over object classes ``c > 0``, with ``P_a`` the class frequencies at ``points_a`` and ``Q_b`` those over
    ``candidates_b`` (pixel points, e.g. the salient patch centres the matcher could choose from; None:
    every pixel of ``labels_b``). The baseline a correspondence method must beat. NaN without points."""
    ca = _labels_at(points_a, labels_a)
    lb = np.asarray(labels_b)
    cb = lb.reshape(-1) if candidates_b is None else _labels_at(candidates_b, lb)
    if len(ca) == 0 or len(cb) == 0:
        return float("nan")
    return float(sum(np.mean(ca == c) * np.mean(cb == c) for c in np.unique(ca[ca > 0])))
