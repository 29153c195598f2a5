"""Cluster probe: unsupervised segmentation from frozen features by dataset-wide clustering.

K = the number of classes; every patch of every image is clustered at once, then clusters are matched to
classes by the Hungarian algorithm (:mod:`.matching`) and scored from one dataset-wide confusion matrix.
Two estimators of the centres, as the papers use them:

- ``"learned"`` (STEGO's cluster probe, used by HP): K centres trained by Adam (HP: lr 5e-3) to minimise
  ``-mean_i max_k cos(f_i, c_k)``, the cosine cluster loss of STEGO (Hamilton et al. 2022, section 3.3);
  patches scored by ``cos(f, c_k)``;
- ``"kmeans"`` (Leopart / CrOC, CrOC section 4.2 "K-means with K = #classes, 5 seeds"): offline k-means
  (scikit-learn) on L2-normalised features; patches go to the nearest centre.

Scores are computed on the patch grid and bilinearly upsampled to the label resolution before the argmax
(STEGO upsamples its features; both give per-pixel predictions). Several seeds give mean +- std.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis.probes.matching import CRITERIA, IGNORE, Scores, confusion, match_and_score

ESTIMATORS = ("learned", "kmeans")


def _flat(features: torch.Tensor) -> torch.Tensor:
    if features.dim() != 4:
        raise ValueError(f"features must be a grid [N, h, w, D], got {tuple(features.shape)}")
    return features.reshape(-1, features.shape[-1])


def _subsample(x: torch.Tensor, max_fit: int | None, seed: int) -> torch.Tensor:
    if max_fit is None or len(x) <= max_fit:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:max_fit].to(x.device)]


def kmeans_centres(
    features: torch.Tensor, k: int, seed: int = 0, max_fit: int | None = None, max_iter: int = 300
) -> torch.Tensor:
    """``[k, D]`` k-means centres (scikit-learn ``KMeans``, k-means++ init, one init per seed) of the
    L2-normalised patch features of a grid ``[N, h, w, D]`` (or ``[M, D]``); ``max_fit``: fit on at most
    this many randomly drawn patches (all patches are still predicted). Fewer patches than ``k`` (a tiny
    fixture): one centre per patch, with a warning; the classes left over get no cluster."""
    from sklearn.cluster import KMeans

    x = features if features.dim() == 2 else _flat(features)
    x = F.normalize(_subsample(x, max_fit, seed).float(), dim=-1).cpu().numpy()
    if len(x) < k:
        warnings.warn(f"{len(x)} patches for {k} clusters: fitting {len(x)}", stacklevel=2)
        k = len(x)
    km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed).fit(x)
    return torch.from_numpy(km.cluster_centers_).float()


def learned_centres(
    features: torch.Tensor,
    k: int,
    seed: int = 0,
    epochs: int = 10,
    lr: float = 5e-3,
    batch_size: int = 8192,
    max_fit: int | None = None,
    init: str = "randn",
) -> torch.Tensor:
    """``[k, D]`` centres trained as STEGO's cluster probe: Adam (HP's lr 5e-3) on
    ``-mean_i max_k cos(f_i, c_k)`` over shuffled patch batches of ``batch_size`` for ``epochs`` passes over
    the patches (on the features' device).

    ``init="randn"``: STEGO's seeded standard-normal parameters. Only the winning centre of a patch gets a
    gradient, so a centre that wins no patch never moves (a dead cluster: the probe then has fewer than K
    clusters in use); ``init="kmeans++"`` starts from k-means++ seeds of the (normalised) features instead."""
    x = features if features.dim() == 2 else _flat(features)
    x = _subsample(x, max_fit, seed)
    g = torch.Generator().manual_seed(seed)
    if init == "randn":
        start = torch.randn(k, x.shape[-1], generator=g)
    elif init == "kmeans++":
        from sklearn.cluster import kmeans_plusplus

        start, _ = kmeans_plusplus(F.normalize(x.float(), dim=-1).cpu().numpy(), k, random_state=seed)
        start = torch.from_numpy(start).float()
    else:
        raise ValueError(f"unknown init {init!r}: randn (STEGO) | kmeans++")
    centres = start.to(x.device).requires_grad_(True)
    opt = torch.optim.Adam([centres], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g).to(x.device)
            for i in range(0, len(x), batch_size):
                f = F.normalize(x[order[i : i + batch_size]].float(), dim=-1)
                sim = f @ F.normalize(centres, dim=-1).T
                loss = -sim.max(dim=1).values.mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return centres.detach()


def cluster_scores(grid: torch.Tensor, centres: torch.Tensor, estimator: str) -> torch.Tensor:
    """``[B, K, h, w]`` scores of every patch of ``grid [B, h, w, D]`` for every centre, argmax = the
    cluster: cosine similarity (``"learned"``), or ``f . c - |c|^2 / 2`` of the normalised feature
    (``"kmeans"``: the same argmax as the nearest centre in Euclidean distance)."""
    f = F.normalize(grid.float(), dim=-1)
    c = centres.to(f.device).float()
    if estimator == "learned":
        s = f @ F.normalize(c, dim=-1).T
    elif estimator == "kmeans":
        s = f @ c.T - 0.5 * (c * c).sum(-1)
    else:
        raise ValueError(f"unknown estimator {estimator!r}: use one of {ESTIMATORS}")
    return s.permute(0, 3, 1, 2)


def upsample_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, K, h, w]`` scores -> ``[B, H, W]`` ids: bilinear upsampling to ``size`` (none when the grid is
    already that size), then argmax over K."""
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    return scores.argmax(1)


#: STEGO's cluster probabilities for the CRF: ``softmax(alpha * score)`` with alpha 2.
CRF_ALPHA = 2.0


def predict(
    features: torch.Tensor,
    centres: torch.Tensor,
    estimator: str,
    size: tuple[int, int],
    batch_size: int = 16,
    images: torch.Tensor | None = None,
    crf_params: dict | None = None,
    crf_workers: int = 0,
):
    """Yield ``(start, ids [b, H, W])`` cluster ids of ``features [N, h, w, D]`` at label size ``size``,
    ``batch_size`` images at a time (memory stays at one batch of upsampled scores). With ``images``
    (uint8 ``[N, 3, H, W]``) the cluster probabilities ``softmax(2 * score)`` (STEGO) are refined by the
    dense CRF (:mod:`.crf`) before the argmax."""
    for i in range(0, len(features), batch_size):
        s = cluster_scores(features[i : i + batch_size], centres, estimator)
        if images is None:
            yield i, upsample_argmax(s, size)
            continue
        from nbsupport.analysis.probes import crf

        if tuple(s.shape[-2:]) != tuple(size):
            s = F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)
        probs = (CRF_ALPHA * s).softmax(1).cpu().numpy()
        ims = images[i : i + len(probs)].permute(0, 2, 3, 1).cpu().numpy()
        refined = crf.dense_crf_many(ims, probs, crf_params, crf_workers)
        yield i, torch.from_numpy(refined).argmax(1).to(s.device)


def fit_centres(features: torch.Tensor, k: int, estimator: str, seed: int = 0, **options) -> torch.Tensor:
    """Centres by ``estimator`` (``"learned"`` or ``"kmeans"``); ``options`` go to :func:`learned_centres`
    or :func:`kmeans_centres`."""
    if estimator == "learned":
        return learned_centres(features, k, seed, **options)
    if estimator == "kmeans":
        return kmeans_centres(features, k, seed, **options)
    raise ValueError(f"unknown estimator {estimator!r}: use one of {ESTIMATORS}")


@dataclass
class ClusterProbeResult:
    """Every (estimator, seed, criterion) run of a cluster probe.

    ``rows``: one dict per run (estimator, criterion, seed, accuracy, miou); ``confusions``:
    ``{(estimator, seed): [classes, clusters]}`` counts; ``predictions``: ``{(estimator, criterion):
    [n_keep, H, W]}`` class ids of the first images under the first seed (-1 where a cluster matched no
    class, 255 where the label is ignored)."""

    rows: list[dict] = field(default_factory=list)
    confusions: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)

    def table(self):
        """The runs as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def summary(self):
        """Mean and std over seeds per (estimator, criterion): columns estimator, criterion, seeds,
        accuracy, accuracy_std, miou, miou_std."""
        return seed_summary(self.table(), ["estimator", "criterion"])


def seed_summary(df, keys: list[str]):
    """Mean and (population) std over seeds of the ``accuracy`` and ``miou`` columns of a DataFrame of runs,
    per ``keys``: columns ``*keys``, seeds, accuracy, accuracy_std, miou, miou_std."""
    g = df.groupby(keys, sort=False)
    out = g.agg(
        seeds=("seed", "count"),
        accuracy=("accuracy", "mean"),
        accuracy_std=("accuracy", lambda v: float(np.std(v))),
        miou=("miou", "mean"),
        miou_std=("miou", lambda v: float(np.std(v))),
    )
    return out.reset_index()


def cluster_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    estimators: Sequence[str] = ESTIMATORS,
    criteria: Sequence[str] = CRITERIA,
    seeds: Sequence[int] = (0,),
    fit_features: torch.Tensor | None = None,
    n_keep: int = 0,
    batch_size: int = 16,
    ignore: int = IGNORE,
    options: dict | None = None,
    images: torch.Tensor | None = None,
    crf_workers: int = 0,
) -> ClusterProbeResult:
    """The cluster probe of STEGO / HP / Leopart / CrOC on a feature grid.

    ``features [N, h, w, D]`` (any float dtype, e.g. fp16 from the cache) and ``labels [N, H, W]`` class
    ids ``0..n_classes-1`` with ``ignore`` (255) for unlabelled pixels; ``(H, W)`` is the patch grid
    (patch-level labels) or any pixel resolution (scores upsampled to it). ``K = n_classes`` centres per
    estimator and seed, fit on ``fit_features`` (default: the scored features themselves, as Leopart's
    k-means), then every criterion's Hungarian matching on the one dataset-wide confusion. ``options``:
    ``{estimator: {option: value}}`` for :func:`fit_centres`. ``images``: uint8 ``[N, 3, H, W]`` at the
    label resolution to refine every prediction with STEGO's dense CRF (:func:`predict`) in ``crf_workers``
    processes."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 3 or len(labels) != len(features):
        raise ValueError(f"labels must be [N, H, W] for {len(features)} images, got {tuple(labels.shape)}")
    fit = features if fit_features is None else fit_features
    size = tuple(labels.shape[-2:])
    out = ClusterProbeResult()
    for est in estimators:
        for s_i, seed in enumerate(seeds):
            centres = fit_centres(fit, n_classes, est, int(seed), **(options or {}).get(est, {}))
            conf = np.zeros((n_classes, n_classes), dtype=np.int64)
            kept = []
            for start, ids in predict(features, centres, est, size, batch_size, images, None, crf_workers):
                lab = labels[start : start + len(ids)].to(ids.device)
                conf += confusion(ids, lab, n_classes, n_classes, ignore)
                if s_i == 0 and start < n_keep:
                    kept.append((ids[: n_keep - start].cpu(), lab[: n_keep - start].cpu()))
            out.confusions[(est, int(seed))] = conf
            for crit in criteria:
                sc, match = match_and_score(conf, crit)
                out.rows.append(_row(est, crit, int(seed), sc))
                if kept:
                    out.predictions[(est, crit)] = _rename(kept, match, ignore, n_classes)
    return out


def _row(estimator: str, criterion: str, seed: int, sc: Scores) -> dict:
    return {"estimator": estimator, "criterion": criterion, "seed": seed, "accuracy": sc.accuracy, "miou": sc.miou}


def _rename(kept: list, match: np.ndarray, ignore: int, n_clusters: int) -> torch.Tensor:
    """Cluster ids -> matched class ids (-1 for unmatched clusters), ``ignore`` where the label is."""
    lut = torch.full((n_clusters,), -1, dtype=torch.long)
    for g, c in enumerate(match):
        if c >= 0:
            lut[c] = g
    ids = torch.cat([k[0] for k in kept])
    lab = torch.cat([k[1] for k in kept])
    out = lut[ids]
    out[lab == ignore] = ignore
    return out
