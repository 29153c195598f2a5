"""GroupViT's two sub-tasks taken apart (thesis 5.4, Eq 47-51): soft labels of final groups from ground
truth, KNN labelling of group tokens over a balanced feature bank, and ground-truth regions labelled
through ``L_affinity``.
"""

from __future__ import annotations

import numpy as np
import torch


def soft_labels(
    groups: torch.Tensor | np.ndarray, gt: np.ndarray, n_groups: int, n_classes: int, ignore: int = 255
) -> np.ndarray:
    """Soft label of every group (section 5.4.1): ``[n_groups, n_classes]`` class fractions of its pixels
    (``ignore`` pixels skipped; a group without pixels gets an all-zero row)."""
    g = np.asarray(groups).ravel()
    y = np.asarray(gt).ravel()
    keep = y != ignore
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (g[keep], y[keep]), 1)
    tot = counts.sum(1, keepdims=True)
    return np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)


def knn_labels(train_feats, train_soft, query_feats, k: int = 10, metric: str = "cosine") -> np.ndarray:
    """Eq 48-49: mean soft label of each query's ``k`` nearest training segment features, then argmax."""
    from sklearn.neighbors import NearestNeighbors

    tf = np.asarray(train_feats, dtype=np.float32)
    qf = np.asarray(query_feats, dtype=np.float32)
    k = min(k, len(tf))
    idx = NearestNeighbors(n_neighbors=k, metric=metric).fit(tf).kneighbors(qf, return_distance=False)
    return np.asarray(train_soft)[idx].mean(1).argmax(-1)


def balanced_subset(soft: np.ndarray, max_per_class: int = 1000, seed: int = 0) -> np.ndarray:
    """Indices keeping at most ``max_per_class`` features per majority class (the thesis's balancing)."""
    major = np.asarray(soft).argmax(1)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(major == c))[:max_per_class] for c in np.unique(major)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)


def gt_group_labels(l_affinity: torch.Tensor | np.ndarray, gt: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Eq 50-51 (visual-text alignment with ground-truth groups): for every class region ``G_c`` of ``gt
    [H, W]`` average ``L_affinity [C, H, W]`` over its pixels and label the whole region with the argmax.
    Returns the prediction ``[H, W]`` (``ignore`` where gt is ignored)."""
    la = np.asarray(l_affinity.detach().cpu() if torch.is_tensor(l_affinity) else l_affinity)
    gt = np.asarray(gt)
    pred = np.full(gt.shape, ignore, dtype=np.int64)
    for c in np.unique(gt):
        if c == ignore:
            continue
        m = gt == c
        pred[m] = int(la[:, m].mean(1).argmax())
    return pred
