"""Feature affinity: which similarity or distance separates same-class from different-class features.

Thesis section 4.1 / Fig 8 compares similarity and distance measures over DINO keys of images of the same
and of different classes (:func:`image_descriptor` pools one key per image, :func:`same_vs_different_images`
splits image pairs, multi-label images by an explicit rule); the same comparison over object descriptors
is :func:`same_vs_different`. Fig 26 shows patch-by-patch affinity matrices (:func:`patch_affinity`).
MMC's protocol (b), intra- vs inter-object patch similarity with the overlap area O of the two
histograms, is :func:`patch_pairs`; its protocol (a), prompt-patch zero-shot segmentation, lives in
:mod:`nbsupport.analysis.prompt_patch`; LarvSeg's probe (one random patch per ground-truth class as a
prototype, argmax cosine) closes the module.

Pure math on torch tensors or numpy arrays (both accepted everywhere). Conventions:

* maps and matrices (``pairwise``, ``patch_affinity``, ``image_descriptor``) are returned as **torch**
  tensors, on the input's device;
* score vectors (``paired``, ``same_vs_different``, ``same_vs_different_images``, ``patch_pairs``) are
  **numpy** float64 arrays; label maps on the patch grid are numpy int64 arrays (-1 = no label);
* for a distance ``higher_is_similar`` is False and ROC AUC is computed on the negated distance, so
  an AUC of 1 always means "every same-class pair looks more similar than every different-class pair".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis.metrics import mask_iou


def _t(x, dtype=torch.float32) -> torch.Tensor:
    """Tensor view of ``x`` (tensor, array or nested list) in ``dtype``, on its own device."""
    if torch.is_tensor(x):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# ----------------------------------------------------------------------------------------------------
# Measures (thesis Fig 8)


def _cos(a, b):
    return F.normalize(a, dim=-1, eps=1e-12) @ F.normalize(b, dim=-1, eps=1e-12).T


def _centre(x):
    return x - x.mean(-1, keepdim=True)


def _pearson(a, b):
    return _cos(_centre(a), _centre(b))


def _euclidean(a, b):
    # torch.cdist's fast path expands |a|^2 + |b|^2 - 2ab: translating both sets by b's mean keeps the
    # distances and shrinks the cancellation error when features share a large offset (as ViT keys do)
    mu = b.mean(0, keepdim=True)
    return torch.cdist(a - mu, b - mu, p=2.0)


def _cos_rows(a, b):
    return (F.normalize(a, dim=-1, eps=1e-12) * F.normalize(b, dim=-1, eps=1e-12)).sum(-1)


@dataclass(frozen=True)
class Measure:
    """A similarity (``higher_is_similar``) or distance. ``fn([n, D], [M, D]) -> [n, M]`` scores all
    pairs; ``paired_fn([n, D], [n, D]) -> [n]`` scores row ``i`` of one against row ``i`` of the other."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_similar: bool
    paired_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


MEASURES: dict[str, Measure] = {
    "cosine": Measure("cosine", _cos, True, _cos_rows),
    "dot": Measure("dot", lambda a, b: a @ b.T, True, lambda a, b: (a * b).sum(-1)),
    "pearson": Measure("pearson", _pearson, True, lambda a, b: _cos_rows(_centre(a), _centre(b))),
    "euclidean": Measure("euclidean", _euclidean, False, lambda a, b: (a - b).norm(dim=-1)),
    "manhattan": Measure("manhattan", lambda a, b: torch.cdist(a, b, p=1.0), False, lambda a, b: (a - b).abs().sum(-1)),
    "chebyshev": Measure(
        "chebyshev", lambda a, b: torch.cdist(a, b, p=float("inf")), False, lambda a, b: (a - b).abs().amax(-1)
    ),
}


def get_measure(measure: str | Measure) -> Measure:
    """The :class:`Measure` called ``measure``; ValueError listing the allowed names otherwise."""
    if isinstance(measure, Measure):
        return measure
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}: use one of {sorted(MEASURES)}")
    return MEASURES[measure]


def _check_rows(a, b, what="a and b"):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what} must be [N, D] and [M, D] with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")


def pairwise(a, b=None, measure: str = "cosine", chunk: int = 4096, dtype=torch.float32) -> torch.Tensor:
    """All-pairs scores ``[N, M]`` between the rows of ``a [N, D]`` and ``b [M, D]`` (``b=None``: ``a``
    against itself), computed ``chunk`` rows of ``a`` at a time so that only the ``[N, M]`` result is held
    (14k x 14k float32 is 0.8 GB). ``dtype`` float32 by default, ``torch.float64`` for exact parity."""
    m = get_measure(measure)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    a = _t(a, dtype)
    b = a if b is None else _t(b, dtype).to(a.device)
    _check_rows(a, b)
    if a.shape[0] == 0:
        return a.new_zeros(0, b.shape[0])
    return torch.cat([m.fn(a[i : i + chunk], b) for i in range(0, a.shape[0], chunk)])


def paired(a, b, measure: str = "cosine", chunk: int = 8192) -> np.ndarray:
    """Score of each row pair ``(a[i], b[i])``: ``a, b [N, D] -> numpy float64 [N]`` (computed in float64,
    ``chunk`` rows at a time)."""
    m = get_measure(measure)
    a, b = _t(a, torch.float64), _t(b, torch.float64)
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be [N, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    out = [m.paired_fn(a[i : i + chunk], b[i : i + chunk].to(a.device)) for i in range(0, a.shape[0], chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def image_descriptor(feats=None, how: str = "mean", mask=None, cls=None) -> torch.Tensor:
    """One descriptor per image (or per object) for the thesis Fig 8 comparison.

    ``feats [h, w, D] -> [D]`` or ``[B, h, w, D] -> [B, D]``: ``how="mean"`` (average patch) or ``"max"``
    (per-channel max) over the patches, or over the patches of a bool ``mask`` only (``[h, w]``, or
    ``[B, h, w]`` for a batch: an object-level descriptor). ``how="cls"`` returns the given ``cls``
    vector (``[D]`` or ``[B, D]``, e.g. from ``features.extract(..., include_cls=True)``) unchanged, so the
    CLS token can be compared with the same code. Returns float32 torch.
    """
    if how == "cls":
        if cls is None:
            raise ValueError("how='cls' needs the CLS vector: pass cls=[D] or [B, D]")
        c = _t(cls)
        if c.dim() not in (1, 2) or (feats is not None and c.shape[-1] != _t(feats).shape[-1]):
            raise ValueError(f"cls must be [D] or [B, D] matching the features' D, got {tuple(c.shape)}")
        return c
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean', 'max' or 'cls', got {how!r}")
    if feats is None:
        raise ValueError("feats [h, w, D] or [B, h, w, D] is required for how='mean' or 'max'")
    f = _t(feats)
    if f.dim() not in (3, 4):
        raise ValueError(f"feats must be [h, w, D] or [B, h, w, D], got {tuple(f.shape)}")
    pool = (lambda x: x.mean(0)) if how == "mean" else (lambda x: x.amax(0))
    if mask is None:
        flat = f.flatten(-3, -2)
        return flat.mean(-2) if how == "mean" else flat.amax(-2)
    m = _t(mask, torch.bool).to(f.device)
    if m.shape != f.shape[:-1]:
        raise ValueError(f"mask must have the feature grid's shape {tuple(f.shape[:-1])}, got {tuple(m.shape)}")
    if f.dim() == 3:
        if not m.any():
            raise ValueError("mask selects no patch")
        return pool(f[m])
    empty = [b for b in range(len(m)) if not m[b].any()]
    if empty:
        raise ValueError(f"mask selects no patch in batch images {empty}")
    return torch.stack([pool(f[b][m[b]]) for b in range(len(m))])


# ----------------------------------------------------------------------------------------------------
# Same- vs different-class pairs and their separability


def _triu_from_linear(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map linear indices of the strict upper triangle (row-major, as ``np.triu_indices(n, 1)``) to ``(i, j)``."""
    rows = np.arange(n, dtype=np.int64)
    starts = rows * (2 * n - rows - 1) // 2  # linear index of (i, i + 1)
    i = np.searchsorted(starts, k, side="right") - 1
    return i, k - starts[i] + i + 1


def _sample_pairs(n: int, max_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs ``i < j`` of ``n`` items, or ``max_pairs`` of them drawn uniformly without
    replacement (seeded, sorted) without materialising the full list."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return np.triu_indices(n, k=1)
    k = np.sort(np.random.default_rng(rng).choice(total, size=max_pairs, replace=False))
    return _triu_from_linear(k.astype(np.int64), n)


def same_vs_different(desc, labels, measure: str = "cosine", max_pairs: int = 20000, rng=0):
    """Scores of unordered pairs ``i < j`` of descriptors ``desc [N, D]`` split by label equality.

    Returns numpy ``(same [n_s], different [n_d])``. All ``N(N-1)/2`` pairs when that is at most
    ``max_pairs``, otherwise ``max_pairs`` pairs drawn uniformly without replacement (seeded by ``rng``);
    the split then follows the label frequencies (no class balancing)."""
    labels = _np(labels).ravel()
    d = _t(desc)
    if d.dim() != 2 or len(d) != len(labels):
        raise ValueError(f"desc must be [N, D] with N = len(labels) = {len(labels)}, got {tuple(d.shape)}")
    i, j = _sample_pairs(len(labels), max_pairs, rng)
    s = paired(d[torch.as_tensor(i)], d[torch.as_tensor(j)], measure)
    same = labels[i] == labels[j]
    return s[same], s[~same]


def roc_auc(same, diff, higher_is_similar: bool = True) -> float:
    """ROC AUC of telling same-class from different-class pairs by their score: the probability that a
    random same pair scores as more similar than a random different pair, ties counting 1/2 (the
    Mann-Whitney U form, equal to ``sklearn.metrics.roc_auc_score``). NaN if either side is empty."""
    from scipy.stats import rankdata

    same, diff = np.asarray(same, float).ravel(), np.asarray(diff, float).ravel()
    if same.size == 0 or diff.size == 0:
        return float("nan")
    if not higher_is_similar:
        same, diff = -same, -diff
    ranks = rankdata(np.concatenate([same, diff]))  # average ranks: ties count 1/2
    u = ranks[: same.size].sum() - same.size * (same.size + 1) / 2
    return float(u / (same.size * diff.size))


def distribution_overlap(a, b, bins: int = 100, range=None) -> float:
    """MMC's overlap O: the area under the minimum of the two normalised histograms, on ``bins`` shared
    equal bins over ``range`` (default: the span of both samples). 1 = identical, 0 = disjoint. Each
    histogram is divided by its sample size (non-finite values dropped), so values outside a given
    ``range`` lower the overlap. NaN if either sample is empty."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return float("nan")
    lo, hi = range if range is not None else (min(a.min(), b.min()), max(a.max(), b.max()))
    if hi <= lo:
        if range is not None:
            raise ValueError(f"range must be (lo, hi) with lo < hi, got {range}")
        return 1.0  # both samples are the same single value
    ha, edges = np.histogram(a, bins=bins, range=(lo, hi))
    hb, _ = np.histogram(b, bins=edges)
    return float(np.minimum(ha / a.size, hb / b.size).sum())


def separability(same, diff, higher_is_similar: bool = True, bins: int = 100) -> dict:
    """How well a score separates same from different pairs: ``auc`` (:func:`roc_auc`), ``overlap``
    (:func:`distribution_overlap`), ``mean_same``, ``mean_diff``, ``d_prime`` = |mean difference| /
    sqrt((var_same + var_diff) / 2), and the pair counts ``n_same``, ``n_diff``."""
    same, diff = np.asarray(same, float).ravel(), np.asarray(diff, float).ravel()
    both = same.size > 0 and diff.size > 0
    pooled = np.sqrt((same.var() + diff.var()) / 2) if both else np.nan
    return {
        "auc": roc_auc(same, diff, higher_is_similar),
        "overlap": distribution_overlap(same, diff, bins),
        "mean_same": float(same.mean()) if same.size else np.nan,
        "mean_diff": float(diff.mean()) if diff.size else np.nan,
        "d_prime": float(abs(same.mean() - diff.mean()) / pooled) if both and pooled > 0 else np.nan,
        "n_same": int(same.size),
        "n_diff": int(diff.size),
    }


def _table(desc_by_key: dict, split, measures, bins: int):
    """One :func:`separability` row per (key, measure); ``split(desc, measure) -> (same, diff)``."""
    import pandas as pd

    if isinstance(measures, str):
        measures = [measures]
    for m in measures:
        get_measure(m)
    rows = []
    for key, desc in desc_by_key.items():
        facet, layer = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        for m in measures:
            same, diff = split(desc, m)
            sep = separability(same, diff, get_measure(m).higher_is_similar, bins)
            rows.append({"facet": facet, "layer": layer, "measure": m, **sep})
    cols = ["facet", "layer", "measure", "auc", "overlap", "mean_same", "mean_diff", "d_prime", "n_same", "n_diff"]
    return pd.DataFrame(rows, columns=cols)


def separability_table(
    desc_by_key: dict,
    labels,
    measures=("cosine", "dot", "euclidean", "manhattan", "pearson"),
    max_pairs: int = 20000,
    rng=0,
    bins: int = 100,
):
    """The thesis Fig 8 study as a table across facets and layers, one label per item (objects).

    ``desc_by_key``: ``{(facet, layer): descriptors [N, D]}`` (same ``N`` objects, labelled by ``labels
    [N]``). For every key and measure: same- vs different-label pairs (the same seeded pairs for every
    key) scored by :func:`separability`. Returns a pandas DataFrame with columns facet, layer, measure,
    auc, overlap, mean_same, mean_diff, d_prime, n_same, n_diff. Images with several classes:
    :func:`image_separability_table`."""
    return _table(desc_by_key, lambda d, m: same_vs_different(d, labels, m, max_pairs, rng), measures, bins)


# ----------------------------------------------------------------------------------------------------
# Image-level pairs (thesis Fig 8 compares images: one descriptor per image)

#: How a pair of (possibly multi-label) images is judged same-class or different-class.
IMAGE_PAIR_RULES = ("dominant", "shared", "single")


def image_class_sets(classes, rule: str = "dominant") -> tuple[np.ndarray, np.ndarray]:
    """The images of the image-level comparison and the classes each one counts with.

    ``classes``: per image a dict ``{class id: area}`` of the object classes it shows (background left
    out; the area in pixels, or any positive weight). ``rule``:

    * ``"dominant"``: an image is labelled by the class covering most of it (ties: the smaller id); a
      pair is same-class when the two labels are equal;
    * ``"shared"``: a pair is same-class when the images share at least one class, different-class when
      they share none;
    * ``"single"``: only images with exactly one class take part (the strict reading of "images of the
      same class"); same-class when the classes are equal.

    Images without a class never take part. Returns ``(keep [n] int64 image indices, member bool [n,
    C])``: row ``r`` marks the classes image ``keep[r]`` counts with, so a pair is same-class exactly when
    two rows share a column."""
    if rule not in IMAGE_PAIR_RULES:
        raise ValueError(f"rule must be one of {IMAGE_PAIR_RULES}, got {rule!r}")
    sets = []
    for b, c in enumerate(classes):
        c = {int(k): float(v) for k, v in dict(c).items()}
        if any(v <= 0 for v in c.values()):
            raise ValueError(f"image {b}: class areas must be positive, got {c}")
        sets.append(c)
    if rule == "dominant":
        chosen = [[min(c, key=lambda k: (-c[k], k))] if c else [] for c in sets]
    elif rule == "single":
        chosen = [list(c) if len(c) == 1 else [] for c in sets]
    else:
        chosen = [sorted(c) for c in sets]
    keep = np.array([b for b, c in enumerate(chosen) if c], np.int64)
    ids = sorted({k for c in chosen for k in c})
    col = {k: n for n, k in enumerate(ids)}
    member = np.zeros((len(keep), len(ids)), bool)
    for r, b in enumerate(keep):
        member[r, [col[k] for k in chosen[b]]] = True
    return keep, member


def same_vs_different_images(
    desc, classes, rule: str = "dominant", measure: str = "cosine", max_pairs: int = 20000, rng=0
):
    """Scores of image pairs split into same-class and different-class (thesis Fig 8 at image level).

    ``desc [N, D]``: one descriptor per image (:func:`image_descriptor`); ``classes``: per image ``{class
    id: area}`` and ``rule`` as in :func:`image_class_sets`. All unordered pairs of the images that take
    part, or ``max_pairs`` of them drawn uniformly without replacement (seeded), as
    :func:`same_vs_different`; with ``rule="dominant"`` the result equals :func:`same_vs_different` on the
    dominant labels of those images. Returns numpy ``(same, different)``."""
    d = _t(desc)
    if d.dim() != 2 or len(d) != len(classes):
        raise ValueError(f"desc must be [N, D] with N = len(classes) = {len(classes)}, got {tuple(d.shape)}")
    keep, member = image_class_sets(classes, rule)
    i, j = _sample_pairs(len(keep), max_pairs, rng)
    s = paired(d[torch.as_tensor(keep[i])], d[torch.as_tensor(keep[j])], measure)
    same = (member[i] & member[j]).any(1)
    return s[same], s[~same]


def image_separability_table(
    desc_by_key: dict,
    classes,
    rule: str = "dominant",
    measures=("cosine", "dot", "euclidean", "manhattan", "pearson"),
    max_pairs: int = 20000,
    rng=0,
    bins: int = 100,
):
    """:func:`separability_table` for images: ``{(facet, layer): [N, D]}`` image descriptors, pairs split
    by :func:`same_vs_different_images` (``classes``, ``rule``; the same seeded pairs for every key)."""
    image_class_sets(classes, rule)  # a bad rule or area fails before any scoring

    def split(d, m):
        return same_vs_different_images(d, classes, rule, m, max_pairs, rng)

    return _table(desc_by_key, split, measures, bins)


# ----------------------------------------------------------------------------------------------------
# MMC (b): intra- vs inter-object patch similarity


def _flatten_grids(feats, labels):
    """Feature grids and patch labels (batched arrays or lists of per-image grids) -> ``flat [P, D]``,
    ``lab [P]``, ``img [P]``."""
    if isinstance(feats, (list, tuple)):
        fl = [_t(f) for f in feats]
        ll = [_np(l) for l in labels] if isinstance(labels, (list, tuple)) else list(_np(labels))
    else:
        f = _t(feats)
        if f.dim() == 3:
            f = f[None]
        lab = _np(labels)
        if f.dim() != 4 or lab.size != f[..., 0].numel():
            raise ValueError(
                f"feats must be [B, h, w, D] (or [h, w, D]) and labels [B, h, w], got {tuple(f.shape)} and {lab.shape}"
            )
        fl, ll = list(f), list(lab.reshape(f.shape[:-1]))
    if len(fl) != len(ll):
        raise ValueError(f"got {len(fl)} feature grids but {len(ll)} label grids")
    for b, (f, l) in enumerate(zip(fl, ll)):
        if tuple(f.shape[:-1]) != tuple(l.shape):
            raise ValueError(f"image {b}: labels {tuple(l.shape)} do not match the feature grid {tuple(f.shape[:-1])}")
    if not fl:
        raise ValueError("no feature grids given")
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in fl])
    lab = np.concatenate([l.ravel() for l in ll]).astype(np.int64)
    img = np.concatenate([np.full(l.size, b) for b, l in enumerate(ll)])
    return flat, lab, img


def _group_pairs(groups: np.ndarray, n: int, g: np.random.Generator):
    """``n`` pairs of distinct positions sharing a group id, uniform over all such unordered pairs (with
    replacement): pick a group with probability proportional to its pair count, then two members."""
    order = np.argsort(groups, kind="stable")
    _, start, counts = np.unique(groups[order], return_index=True, return_counts=True)
    w = counts * (counts - 1) / 2
    if w.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    gi = g.choice(len(counts), size=n, p=w / w.sum())
    a = g.integers(counts[gi])
    b = g.integers(counts[gi] - 1)
    b = b + (b >= a)
    i, j = order[start[gi] + a], order[start[gi] + b]
    return np.minimum(i, j), np.maximum(i, j)


def patch_pairs(
    feats,
    labels,
    measure: str = "cosine",
    max_pairs: int = 20000,
    rng=0,
    exclude_background: bool = True,
    within_image: bool | None = None,
    background: int = 0,
    enumerate_limit: int = 1_000_000,
):
    """MMC protocol (b), intra- vs inter-object patch similarity: scores of patch pairs with the same
    ground-truth category (intra) and with different categories (inter).

    ``feats``: ``[B, h, w, D]`` or a list of ``[h, w, D]`` grids; ``labels``: int ``[B, h, w]`` or a list of
    ``[h, w]`` (class per patch, e.g. from :func:`labels_on_grid`; -1 = unknown, always skipped;
    ``background`` skipped when ``exclude_background``). ``within_image``: True = pairs inside one image
    only, False = pairs across images only, None = both.

    Sampling: when the kept patches form at most ``enumerate_limit`` unordered pairs, every pair is
    scored and each kind keeps ``max_pairs`` of them drawn without replacement (seeded); otherwise each
    kind gets ``max_pairs`` pairs drawn uniformly over its pairs, with replacement (seeded, by rejection;
    fewer if a kind is too rare). Returns numpy ``(intra, inter)``.
    """
    flat, lab, img = _flatten_grids(feats, labels)
    keep = lab != -1
    if exclude_background:
        keep &= lab != background
    idx = np.flatnonzero(keep)
    g = np.random.default_rng(rng)
    P = len(idx)
    if P * (P - 1) // 2 <= enumerate_limit:
        i, j = np.triu_indices(P, k=1)
        i, j = idx[i], idx[j]
        if within_image is not None:
            ok = (img[i] == img[j]) == within_image
            i, j = i[ok], j[ok]
        same = lab[i] == lab[j]
        kinds = []
        for sel in (np.flatnonzero(same), np.flatnonzero(~same)):
            if len(sel) > max_pairs:
                sel = np.sort(g.choice(sel, max_pairs, replace=False))
            kinds.append((i[sel], j[sel]))
    else:
        L, I = lab[idx], img[idx]
        specs = [  # (group id: pairs are drawn inside a group, accept(i, j) on kept positions)
            (
                np.unique(np.stack([I, L], 1), axis=0, return_inverse=True)[1].ravel() if within_image else L,
                (lambda a, b: I[a] != I[b]) if within_image is False else (lambda a, b: np.ones(len(a), bool)),
            ),
            (
                I if within_image else np.zeros(P, np.int64),
                (lambda a, b: (L[a] != L[b]) & (I[a] != I[b]))
                if within_image is False
                else (lambda a, b: L[a] != L[b]),
            ),
        ]
        kinds = []
        for groups, accept in specs:
            got_i, got_j, n_got = [], [], 0
            for _ in range(50):
                a, b = _group_pairs(groups, max(2 * (max_pairs - n_got), 1024), g)
                ok = accept(a, b)
                got_i.append(a[ok])
                got_j.append(b[ok])
                n_got += int(ok.sum())
                if n_got >= max_pairs or len(a) == 0:
                    break
            a, b = np.concatenate(got_i)[:max_pairs], np.concatenate(got_j)[:max_pairs]
            kinds.append((idx[a], idx[b]))
    (ii, ij), (di, dj) = kinds
    intra = paired(flat[torch.as_tensor(ii)], flat[torch.as_tensor(ij)], measure)
    inter = paired(flat[torch.as_tensor(di)], flat[torch.as_tensor(dj)], measure)
    return intra, inter


# ----------------------------------------------------------------------------------------------------
# Patch affinity (thesis Fig 26)


def _grid(feats) -> torch.Tensor:
    f = _t(feats)
    if f.dim() != 3:
        raise ValueError(f"feats must be one feature grid [h, w, D], got shape {tuple(f.shape)}")
    return f


def patch_affinity(feats, measure: str = "cosine", dtype=torch.float32) -> torch.Tensor:
    """Patch-by-patch affinity ``[h*w, h*w]`` of one feature grid ``[h, w, D]`` (thesis Fig 26); patches in
    row-major order (index ``y * w + x``)."""
    f = _grid(feats)
    return pairwise(f.reshape(-1, f.shape[-1]), None, measure, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# LarvSeg prototype probe


def miou_fraction(pred, gt, ignore: int = -1) -> float:
    """Mean IoU, as a fraction in [0, 1] (:func:`nbsupport.analysis.metrics.miou` gives percent from a
    confusion matrix), of two label maps over the classes present in ``gt`` (pixels where ``gt == ignore``
    excluded from both maps); a class never predicted scores 0. NaN when ``gt`` holds no class."""
    pred, gt = _np(pred), _np(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
    valid = gt != ignore
    ious = [mask_iou((pred == c) & valid, gt == c) for c in np.unique(gt[valid])]
    return float(np.mean(ious)) if ious else float("nan")


def prototype_response_segmentation(feats, labels, rng=0, ignore: int = -1) -> np.ndarray:
    """LarvSeg's frozen-feature probe: for every ground-truth class of ``labels`` (int ``[h, w]`` on the
    patch grid, ``ignore`` skipped) one random patch (seeded) is its prototype; every patch of
    ``feats [h, w, D]`` takes the class of its most cosine-similar prototype. Returns int64 ``[h, w]``;
    score it with :func:`miou_fraction`."""
    f = _grid(feats)
    lab = _np(labels)
    if lab.shape != tuple(f.shape[:2]):
        raise ValueError(f"labels {lab.shape} do not match the feature grid {tuple(f.shape[:2])}")
    g = np.random.default_rng(rng)
    classes = [c for c in np.unique(lab) if c != ignore]
    if not classes:
        raise ValueError("labels hold no class")
    protos = []
    for c in classes:
        ys, xs = np.nonzero(lab == c)
        k = g.integers(len(ys))
        protos.append(f[int(ys[k]), int(xs[k])])
    sims = pairwise(f.reshape(-1, f.shape[-1]), torch.stack(protos), "cosine")
    return np.asarray(classes, np.int64)[sims.argmax(1).cpu().numpy()].reshape(lab.shape)
