"""Feature affinity: which similarity or distance separates same-class from different-class features.

Thesis section 4.1 / Fig 8 compares similarity and distance measures over DINO keys of same-class and
different-class images; Fig 26 shows patch affinity matrices; MMC (supporting paper 003) adds the
prompt-patch segmentation sweep and the intra- vs inter-object similarity histograms with their overlap.

Conventions: score vectors are numpy float arrays; maps and matrices are torch tensors. For distance
measures ``higher_is_similar`` is False, and ROC AUC is computed on the negated distance, so an AUC of 1
always means "same-class pairs score as more similar than every different-class pair".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return x.to(dtype) if torch.is_tensor(x) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _cos(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _pearson(a, b):
    return _cos(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True))


@dataclass(frozen=True)
class Measure:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [n, D], [M, D] -> [n, M]
    higher_is_similar: bool


MEASURES: dict[str, Measure] = {
    "cosine": Measure("cosine", _cos, True),
    "dot": Measure("dot", lambda a, b: a @ b.T, True),
    "pearson": Measure("pearson", _pearson, True),
    "euclidean": Measure("euclidean", lambda a, b: torch.cdist(a, b, p=2.0), False),
    "manhattan": Measure("manhattan", lambda a, b: torch.cdist(a, b, p=1.0), False),
    "chebyshev": Measure("chebyshev", lambda a, b: torch.cdist(a, b, p=float("inf")), False),
}


def get_measure(measure: str) -> Measure:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}: use one of {sorted(MEASURES)}")
    return MEASURES[measure]


def pairwise(a, b, measure: str = "cosine", chunk: int = 4096, dtype=torch.float32) -> torch.Tensor:
    """All-pairs scores ``[N, M]`` between rows of ``a [N, D]`` and ``b [M, D]``, ``chunk`` rows at a time."""
    m = get_measure(measure)
    a, b = _t(a, dtype), _t(b, dtype)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.cat([m.fn(a[i:i + chunk], b) for i in range(0, a.shape[0], chunk)] or [a.new_zeros(0, b.shape[0])])


def paired(a, b, measure: str = "cosine") -> np.ndarray:
    """Score of each row pair ``(a[i], b[i])`` -> ``[N]``."""
    a, b = _t(a, torch.float64), _t(b, torch.float64)
    if measure == "cosine":
        out = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    elif measure == "dot":
        out = (a * b).sum(-1)
    elif measure == "pearson":
        out = F.cosine_similarity(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), dim=-1, eps=1e-12)
    elif measure == "euclidean":
        out = (a - b).norm(dim=-1)
    elif measure == "manhattan":
        out = (a - b).abs().sum(-1)
    elif measure == "chebyshev":
        out = (a - b).abs().amax(-1)
    else:
        get_measure(measure)
        raise AssertionError
    return out.numpy()


def image_descriptor(feats, how: str = "mean", mask=None) -> torch.Tensor:
    """``[h, w, D] -> [D]`` or ``[B, h, w, D] -> [B, D]``: mean (or max) over patches, optionally over the
    patches of a bool ``mask [h, w]`` only (an object-level descriptor)."""
    f = _t(feats)
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
    if mask is not None:
        m = _t(mask, torch.bool)
        if not m.any():
            raise ValueError("mask selects no patch")
        sel = f[m]
        return sel.mean(0) if how == "mean" else sel.amax(0)
    flat = f.flatten(-3, -2)
    return flat.mean(-2) if how == "mean" else flat.amax(-2)


def _sample_pairs(n: int, max_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        sel = np.sort(np.random.default_rng(rng).choice(len(i), max_pairs, replace=False))
        i, j = i[sel], j[sel]
    return i, j


def same_vs_different(desc, labels, measure: str = "cosine", max_pairs: int = 20000, rng=0):
    """Scores of unordered pairs ``i < j`` of descriptors ``[N, D]`` split by label equality:
    ``(same [n_s], different [n_d])`` (sampled, seeded, when there are more than ``max_pairs``)."""
    labels = np.asarray(labels)
    i, j = _sample_pairs(len(labels), max_pairs, rng)
    d = _t(desc)
    s = paired(d[i], d[j], measure)
    same = labels[i] == labels[j]
    return s[same], s[~same]


def roc_auc(same, diff, higher_is_similar: bool = True) -> float:
    """Probability that a same-class pair scores as more similar than a different-class pair (ties
    count 1/2): the Mann-Whitney form of ROC AUC, equal to ``sklearn.metrics.roc_auc_score``."""
    from scipy.stats import rankdata

    same, diff = np.asarray(same, float), np.asarray(diff, float)
    if same.size == 0 or diff.size == 0:
        return float("nan")
    if not higher_is_similar:
        same, diff = -same, -diff
    ranks = rankdata(np.concatenate([same, diff]))
    u = ranks[: same.size].sum() - same.size * (same.size + 1) / 2
    return float(u / (same.size * diff.size))


def distribution_overlap(a, b, bins: int = 100, range=None) -> float:
    """MMC's overlap O: the area under the minimum of the two normalised histograms (1 = identical
    distributions, 0 = disjoint), on ``bins`` shared bins over ``range`` (default: both samples' span)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size == 0 or b.size == 0:
        return float("nan")
    lo, hi = range if range is not None else (min(a.min(), b.min()), max(a.max(), b.max()))
    if hi <= lo:
        return 1.0
    ha, edges = np.histogram(a, bins=bins, range=(lo, hi))
    hb, _ = np.histogram(b, bins=edges)
    return float(np.minimum(ha / a.size, hb / b.size).sum())


def separability(same, diff, higher_is_similar: bool = True, bins: int = 100) -> dict:
    """AUC, overlap, both means and d' = |mean difference| / pooled std."""
    same, diff = np.asarray(same, float), np.asarray(diff, float)
    pooled = np.sqrt((same.var() + diff.var()) / 2) if same.size and diff.size else np.nan
    return {"auc": roc_auc(same, diff, higher_is_similar), "overlap": distribution_overlap(same, diff, bins),
            "mean_same": float(same.mean()) if same.size else np.nan,
            "mean_diff": float(diff.mean()) if diff.size else np.nan,
            "d_prime": float(abs(same.mean() - diff.mean()) / pooled) if pooled and pooled > 0 else np.nan,
            "n_same": int(same.size), "n_diff": int(diff.size)}


def separability_table(desc_by_key: dict, labels, measures=("cosine", "dot", "euclidean", "manhattan", "pearson"),
                       max_pairs: int = 20000, rng=0):
    """The Fig 8 study as a table: for each ``(facet, layer) -> descriptors [N, D]`` and each measure,
    AUC / overlap / means of same- vs different-label pairs. Returns a pandas DataFrame."""
    import pandas as pd

    rows = []
    for (facet, layer), desc in desc_by_key.items():
        for m in measures:
            same, diff = same_vs_different(desc, labels, m, max_pairs, rng)
            rows.append({"facet": facet, "layer": layer, "measure": m,
                         **separability(same, diff, get_measure(m).higher_is_similar)})
    return pd.DataFrame(rows)


def labels_on_grid(labels, grid_hw, ignore: int = 255, min_fraction: float = 0.5) -> np.ndarray:
    """Majority label per patch of a label map ``[H, W]`` on a ``(h, w)`` grid of equal cells -> int ``[h, w]``,
    -1 where no label covers ``min_fraction`` of the cell or the majority is ``ignore``."""
    lab = np.asarray(labels)
    H, W = lab.shape
    h, w = grid_hw
    ys = (np.arange(H) * h // H)
    xs = (np.arange(W) * w // W)
    cell = ys[:, None] * w + xs[None, :]
    vals, inv = np.unique(lab, return_inverse=True)
    counts = np.zeros((h * w, len(vals)), np.int64)
    np.add.at(counts, (cell.ravel(), inv.ravel()), 1)
    best = counts.argmax(1)
    frac = counts.max(1) / counts.sum(1).clip(min=1)
    out = vals[best].astype(np.int64)
    out[(frac < min_fraction) | (out == ignore)] = -1
    return out.reshape(h, w)


def patch_pairs(feats, labels, measure: str = "cosine", max_pairs: int = 20000, rng=0,
                exclude_background: bool = True, within_image: bool | None = None):
    """MMC intra- vs inter-object patch similarity.

    ``feats``: ``[B, h, w, D]`` (or a list of ``[h, w, D]``); ``labels``: int ``[B, h, w]`` (class per patch,
    -1 = unknown, 0 = background). Returns ``(intra, inter)``: scores of sampled patch pairs with the
    same / a different class. ``within_image``: True = pairs inside one image only, False = across
    images only, None = both.
    """
    if isinstance(feats, (list, tuple)):
        feats = torch.stack([_t(f) for f in feats])
    f = _t(feats)
    lab = np.asarray(labels)
    flat = f.reshape(-1, f.shape[-1])
    lab_flat = lab.reshape(-1)
    img_idx = np.repeat(np.arange(lab.shape[0]), lab.shape[1] * lab.shape[2])
    keep = lab_flat >= (1 if exclude_background else 0)
    idx = np.nonzero(keep)[0]
    if len(idx) < 2:
        return np.zeros(0), np.zeros(0)
    g = np.random.default_rng(rng)
    n = min(max_pairs * 4, len(idx) * (len(idx) - 1) // 2)
    i = idx[g.integers(len(idx), size=n)]
    j = idx[g.integers(len(idx), size=n)]
    ok = i != j
    if within_image is not None:
        ok &= (img_idx[i] == img_idx[j]) == within_image
    i, j = i[ok], j[ok]
    same = lab_flat[i] == lab_flat[j]
    # balance: up to max_pairs of each kind
    si, di = np.nonzero(same)[0][:max_pairs], np.nonzero(~same)[0][:max_pairs]
    intra = paired(flat[i[si]], flat[j[si]], measure)
    inter = paired(flat[i[di]], flat[j[di]], measure)
    return intra, inter


def patch_affinity(feats, measure: str = "cosine") -> torch.Tensor:
    """Patch-by-patch affinity ``[h*w, h*w]`` of one feature grid ``[h, w, D]`` (thesis Fig 26)."""
    f = _t(feats)
    flat = f.reshape(-1, f.shape[-1])
    return pairwise(flat, flat, measure)


def similarity_map(feats, query) -> torch.Tensor:
    """Cosine similarity ``[h, w]`` of every patch to a query patch ``(y, x)`` or a vector ``[D]``."""
    f = _t(feats)
    if isinstance(query, (tuple, list)) and len(query) == 2:
        q = f[int(query[0]), int(query[1])]
    else:
        q = _t(query)
        if q.shape != f.shape[-1:]:
            raise ValueError(f"query must be a (y, x) patch or a [{f.shape[-1]}] vector, got shape {tuple(q.shape)}")
    return F.cosine_similarity(f, q.expand_as(f), dim=-1, eps=1e-12)


def prompt_patch_segment(feats, yx, t: float) -> torch.Tensor:
    """MMC zero-shot segmentation from one prompting patch: bool ``[h, w]`` of ``cos(prompt, patch) > t``."""
    return similarity_map(feats, tuple(yx)) > t


def sample_prompt_points(mask, mode: str = "center", rng=0) -> tuple[int, int]:
    """The prompting patch of a bool mask ``[h, w]``: ``center`` = the patch deepest inside it (largest
    distance to the mask border; lowest index on ties), ``random`` = a uniform patch of the mask. MMC
    does not state its rule; we use the centre so runs are reproducible."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if not m.any():
        raise ValueError("cannot pick a prompt point in an empty mask")
    if mode == "center":
        d = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(d)), m.shape)
    elif mode == "random":
        ys, xs = np.nonzero(m)
        k = np.random.default_rng(rng).integers(len(ys))
        y, x = ys[k], xs[k]
    else:
        raise ValueError(f"mode must be 'center' or 'random', got {mode!r}")
    return int(y), int(x)


def mask_iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def threshold_sweep_miou(feats_list, masks_list, ts=(0.1, 0.2, 0.3, 0.4), mode: str = "center", rng=0):
    """MMC Table 1 protocol: for every ground-truth object mask (bool ``[K, h, w]`` per image, on the
    patch grid), prompt with its centre patch, segment ``cos > t`` for each ``t`` and score IoU against
    the mask. Returns a DataFrame with one row per object and one column per ``t``; the mean row is
    the mIoU at each threshold and ``opt`` is the best of them."""
    import pandas as pd

    rows = []
    for b, (f, masks) in enumerate(zip(feats_list, masks_list)):
        for k, m in enumerate(np.asarray(masks, bool)):
            if not m.any():
                continue
            yx = sample_prompt_points(m, mode, rng)
            sim = similarity_map(f, yx).numpy()
            rows.append({"image": b, "object": k, **{t: mask_iou(sim > t, m) for t in ts}})
    df = pd.DataFrame(rows, columns=["image", "object", *ts])
    return df


def sweep_summary(df, ts=None) -> dict:
    """``{t: mIoU}`` plus ``"opt"`` (best threshold's mIoU) from :func:`threshold_sweep_miou`'s table."""
    ts = ts or [c for c in df.columns if c not in ("image", "object")]
    out = {t: float(df[t].mean()) for t in ts}
    out["opt"] = max(out.values()) if out else float("nan")
    return out


def miou(pred, gt, ignore: int = -1) -> float:
    """Mean IoU over the classes present in ``gt`` (``ignore`` excluded)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    valid = gt != ignore
    ious = []
    for c in np.unique(gt[valid]):
        ious.append(mask_iou((pred == c) & valid, (gt == c) & valid))
    return float(np.mean(ious)) if ious else float("nan")


def prototype_response_segmentation(feats, labels, rng=0) -> np.ndarray:
    """LarvSeg's probe: one random patch per ground-truth class is its prototype; every patch takes the
    class of its most cosine-similar prototype. ``feats [h, w, D]``, ``labels`` int ``[h, w]`` (-1 =
    ignore) -> predicted labels ``[h, w]``."""
    f = _t(feats)
    lab = np.asarray(labels)
    g = np.random.default_rng(rng)
    classes = [c for c in np.unique(lab) if c != -1]
    if not classes:
        raise ValueError("labels hold no class")
    protos = []
    for c in classes:
        ys, xs = np.nonzero(lab == c)
        k = g.integers(len(ys))
        protos.append(f[ys[k], xs[k]])
    sims = pairwise(f.reshape(-1, f.shape[-1]), torch.stack(protos), "cosine")
    return np.asarray(classes)[sims.argmax(1).numpy()].reshape(lab.shape)
