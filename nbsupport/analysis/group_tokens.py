"""GroupViT's two sub-tasks taken apart (thesis 5.4, Eq 47-51): soft labels of final groups from ground
truth, KNN labelling of group tokens over a balanced feature bank, and ground-truth regions labelled
through ``L_affinity``; then the pipelines of thesis Table 3 (paper inference, by GroupViT's evaluation
protocol at the original resolution, vs visual grouping vs visual-text alignment), Table 4 (K of the KNN)
and Fig 23 (2-D embeddings of the tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbsupport.analysis import embedding, metrics
from nbsupport.analysis.zero_shot import protocol_miou
from nbsupport.data.segmentation import SegmentationSet
from nbsupport.models.groupvit.inference import TEMPLATES, group_segmentation, segment, text_embeddings
from nbsupport.models.groupvit.model import GroupViT


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


# ============================================================================================== pipelines
@dataclass
class SegmentTokens:
    """What a GroupViT makes of ``n`` images: final segment tokens ``features [n, G, C]`` (``Ŝ^3``), their
    soft labels ``soft [n, G, L]`` (class fractions of each group's pixels, ``L`` labels incl. background)
    and the pixel-to-group maps ``groups [n, H, W]`` (Eq 47)."""

    features: np.ndarray
    soft: np.ndarray
    groups: np.ndarray

    def owned(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features [M, C], soft [M, L])`` of the tokens whose group owns at least one labelled pixel."""
        soft = self.soft.reshape(-1, self.soft.shape[-1])
        keep = soft.sum(-1) > 0
        return self.features.reshape(-1, self.features.shape[-1])[keep], soft[keep]


@torch.no_grad()
def collect_tokens(
    model: GroupViT,
    images: torch.Tensor,
    semantic: torch.Tensor,
    n_labels: int,
    batch_size: int = 16,
    ignore: int = 255,
) -> SegmentTokens:
    """Encode ``images [n, 3, H, W]`` and soft-label every final group by ``semantic [n, H, W]`` (labels
    ``0 .. n_labels - 1``, ``ignore`` skipped; section 5.4.1); a label outside that range is an error naming
    it."""
    if len(images) != len(semantic) or images.shape[-2:] != semantic.shape[-2:]:
        raise ValueError(
            f"images {tuple(images.shape)} and semantic {tuple(semantic.shape)} must be [n, 3, H, W] and [n, H, W]"
        )
    labels = torch.unique(torch.as_tensor(semantic))
    bad = labels[(labels != ignore) & ((labels < 0) | (labels >= n_labels))]
    if bad.numel():
        raise ValueError(
            f"semantic holds labels {bad.tolist()[:5]} outside 0..{n_labels - 1}: n_labels must count every class "
            "of the dataset (SegmentationSet.n_classes)"
        )
    dev = next(model.parameters()).device
    feats, soft, groups = [], [], []
    for s in range(0, len(images), batch_size):
        out = model.encode_image(images[s : s + batch_size].to(dev))
        for b in range(len(out.attn)):
            grp = group_segmentation(out.attn[b], out.grid, tuple(semantic.shape[-2:])).cpu().numpy()
            soft.append(soft_labels(grp, semantic[s + b].numpy(), out.attn.shape[1], n_labels, ignore))
            feats.append(out.final_tokens[b].cpu().numpy())
            groups.append(grp)
    return SegmentTokens(np.stack(feats), np.stack(soft), np.stack(groups))


def knn_segmentation(
    bank: SegmentTokens, query: SegmentTokens, k: int = 10, max_per_class: int = 1000, seed: int = 0
) -> np.ndarray:
    """Visual grouping (Eq 48-49): every query token takes the argmax of the mean soft label of its ``k``
    nearest (cosine) tokens of the balanced ``bank``, and its group's pixels that label: ``[n, H, W]``."""
    feats, soft = bank.owned()
    if not len(feats):
        raise ValueError("the feature bank has no token whose group owns a labelled pixel")
    sel = balanced_subset(soft, max_per_class, seed)
    preds = [
        knn_labels(feats[sel], soft[sel], query.features[i], k=k)[query.groups[i]] for i in range(len(query.groups))
    ]
    return np.stack(preds)


def miou_of(preds, semantic, n_labels: int, include_background: bool = True) -> tuple[float, np.ndarray]:
    """mIoU (percent) over all images of ``preds`` against ``semantic`` (both ``[n, H, W]``) and the summed
    confusion matrix ``[n_labels, n_labels]``."""
    conf = sum(metrics.confusion_matrix(p, np.asarray(g), n_labels) for p, g in zip(preds, semantic))
    return metrics.miou(conf, include_background=include_background), conf


@torch.no_grad()
def grouping_vs_alignment(
    model: GroupViT,
    bank: SegmentTokens,
    val: SegmentTokens,
    data: SegmentationSet,
    k: int = 10,
    max_per_class: int = 1000,
    bg_thresh: float = 0.95,
    seed: int = 0,
    short_side: int | None = None,
    window: int | None = None,
    stride: int = 224,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Thesis Table 3 for one model on the evaluation set ``data`` (``val`` = its tokens; labels 0 =
    background, ``i`` = ``data.class_names[i - 1]``): rows ``{"type", "mIoU"}`` for

    - the paper inference (:func:`~nbsupport.analysis.zero_shot.protocol_miou`, Eq 29-35: every image at its
      original resolution, short side resized to ``short_side``, sliding ``window`` / ``stride``, top-5
      classes, background threshold ``bg_thresh``, scored against the original-resolution ground truth;
      the thesis: 448 / 448 / 224, VOC 0.95; None / None: the image as it is, in one window; prompted with
      the object classes only),
    - visual grouping (KNN with ``k`` over ``bank``, Eq 48-49; also without the background class, "WB"),
    - visual-text alignment (ground-truth regions labelled through ``L_affinity`` of the whole image,
      Eq 50-51),

    the last two on ``data``'s images and labels at the model's input size (where the tokens were
    collected); and the confusion matrices of ``"original"`` and ``"visual grouping"``."""
    if bg_thresh is None:
        raise ValueError("bg_thresh must be a threshold: Table 3 scores the background as class 0")
    images, semantic, class_names = data.images, data.semantic, data.class_names
    if len(val.groups) != len(data):
        raise ValueError(f"{len(val.groups)} token sets for {len(data)} images: collect the tokens of data")
    n_labels = len(class_names) + 1
    orig = protocol_miou(model, data, short_side, window, stride, bg_thresh, TEMPLATES["simple"], background_names=())
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    text = text_embeddings(model, class_names)
    align = []
    for x, gt in zip(images, semantic):
        _, logits = segment(
            model, x.to(dev), text_embeds=text, short_side=None, window=None, bg_thresh=bg_thresh, return_logits=True
        )
        align.append(gt_group_labels(logits, gt.numpy()))
    model.train(was)
    vg = knn_segmentation(bank, val, k, max_per_class, seed)
    m_vg, c_vg = miou_of(vg, semantic, n_labels)
    rows = [
        {"type": "Original", "mIoU": orig["miou"]},
        {"type": f"Visual Grouping (K={k})", "mIoU": m_vg},
        {"type": "Visual Grouping (WB)", "mIoU": miou_of(vg, semantic, n_labels, include_background=False)[0]},
        {"type": "Visual-Text Alignment", "mIoU": miou_of(align, semantic, n_labels)[0]},
    ]
    return rows, {"original": orig["conf"], "visual grouping": c_vg}


def knn_ablation(
    bank: SegmentTokens, val: SegmentTokens, semantic, ks, max_per_class: int = 1000, seed: int = 0
) -> dict[int, float]:
    """Thesis Table 4: visual-grouping mIoU (percent, background included) for every ``K`` in ``ks``."""
    n_labels = bank.soft.shape[-1]
    return {int(K): miou_of(knn_segmentation(bank, val, K, max_per_class, seed), semantic, n_labels)[0] for K in ks}


def embed_tokens(tokens: SegmentTokens, methods=("tsne",), seed: int = 0, pca: int = 50, k: int = 10) -> list[dict]:
    """Thesis Fig 23: the owned tokens embedded in 2-D by each of ``methods`` (``"tsne"`` / ``"umap"``, after a
    PCA to ``pca`` dimensions, seeded), coloured by their majority label; per method ``{"method", "xy" [M, 2],
    "labels" [M], "tokens", "kNN purity"}`` (share of each point's ``k`` nearest 2-D neighbours with its label)."""
    feats, soft = tokens.owned()
    if len(feats) < 3:
        raise ValueError(f"only {len(feats)} tokens own labelled pixels: too few to embed")
    labels = soft.argmax(-1)
    out = []
    for method in methods:
        xy = embedding.embed(feats, method, pca=pca, seed=seed)
        purity = embedding.knn_purity(xy, labels, k=min(k, len(feats) - 1))
        out.append({"method": method, "xy": xy, "labels": labels, "tokens": len(feats), "kNN purity": purity})
    return out
