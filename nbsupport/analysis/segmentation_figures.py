"""Data behind GroupViT's qualitative figures (thesis chapter 5): what one final group token attends to across
images (Fig 9-10), segmentation maps beside ground truth (Fig 15, 16, 19-20, 24-25, 28-30), per-class IoU
disparity between two models (Fig 21-22), tokens coloured by the class a model gives them (Fig 23) and class
colours for label maps. Everything returns arrays or tables; drawing is :mod:`nbsupport.notebook.viz_segmentation`.

Label maps use the labels of a :class:`~nbsupport.data.segmentation.SegmentationSet`: 0 = background,
``i`` = ``class_names[i - 1]``, 255 = ignore. Per-class IoU comes from the package's evaluators
(:func:`~nbsupport.analysis.segmentation_eval.evaluate_zero_shot` for a real dataset,
:func:`~nbsupport.analysis.zero_shot.protocol_miou` for the synthetic world).
"""

from __future__ import annotations

import numpy as np
import torch

from nbsupport.analysis import embedding, metrics
from nbsupport.analysis.group_tokens import SegmentTokens, gt_group_labels, knn_segmentation
from nbsupport.analysis.segmentation_eval import evaluate_zero_shot
from nbsupport.analysis.zero_shot import protocol_miou, to_labels
from nbsupport.analysis.zero_shot_protocol import EvalSettings
from nbsupport.data.datasets.base import IGNORE
from nbsupport.data.segmentation import SegmentationSet
from nbsupport.models.groupvit.inference import TEMPLATES, label_logits, resize_attn, segment, text_embeddings
from nbsupport.models.groupvit.model import GroupViT


def _device(model: GroupViT) -> torch.device:
    return next(model.parameters()).device


# ============================================================================================== Fig 9-10
@torch.no_grad()
def group_attention(model: GroupViT, images, batch_size: int = 16) -> np.ndarray:
    """Soft attention of every final group token at pixel resolution (Eq 32, bilinear):
    ``images [n, 3, H, W]`` -> ``[n, G, H, W]`` float32, each pixel's column a distribution over groups."""
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(images), batch_size):
            x = images[s : s + batch_size].to(_device(model))
            enc = model.encode_image(x)
            out.append(resize_attn(enc.attn, enc.grid, tuple(x.shape[-2:])).cpu().numpy().astype(np.float32))
    finally:
        model.train(was)
    return np.concatenate(out)


def group_concepts(tokens: SegmentTokens, label_names, skip_labels=(0,)) -> list[dict]:
    """One row per (image, group) whose group owns pixels (argmax of Attn, Eq 47): its pixel ``share`` of the
    image, its concept ``label`` / ``class`` (the most frequent ground-truth class of its pixels, ``skip_labels``
    (background) only when the group holds nothing else) and that class's ``purity`` among the group's
    labelled pixels (the soft label of section 5.4.1). The table behind Fig 9-10."""
    n, G = tokens.soft.shape[:2]
    rows = []
    for i in range(n):
        area = np.bincount(tokens.groups[i].ravel(), minlength=G) / tokens.groups[i].size
        for g in range(G):
            s = tokens.soft[i, g]
            if area[g] == 0 or s.sum() == 0:
                continue
            objects = s.copy()
            objects[list(skip_labels)] = 0
            c = int(objects.argmax() if objects.sum() > 0 else s.argmax())
            rows.append(
                {
                    "image": i,
                    "group": g,
                    "share": float(area[g]),
                    "label": c,
                    "class": label_names[c],
                    "purity": float(s[c]),
                }
            )
    return rows


def images_for_group(rows: list[dict], group: int, n: int = 4, distinct: bool = False, skip_labels=(0,)) -> list[dict]:
    """Rows of :func:`group_concepts` for ``group``, largest share first, the labels ``skip_labels``
    (background) left out: the images of Fig 9 (``distinct=False``) or one image per distinct class, the
    several concepts of one token in Fig 10 (``distinct=True``). At most ``n`` rows."""
    mine = sorted((r for r in rows if r["group"] == group and r["label"] not in skip_labels), key=lambda r: -r["share"])
    if distinct:
        seen, keep = set(), []
        for r in mine:
            if r["label"] not in seen:
                seen.add(r["label"])
                keep.append(r)
        mine = keep
    return mine[:n]


def groups_by_concepts(rows: list[dict], skip_labels=(0,)) -> list[tuple[int, int, float]]:
    """``(group, distinct classes, total share)`` of every group, most classes first (ties: larger total
    share): the first entry is the token covering most concepts (Fig 10); the shares rank Fig 9's rows."""
    stats: dict[int, tuple[set, float]] = {}
    for r in rows:
        if r["label"] in skip_labels:
            continue
        labels, share = stats.get(r["group"], (set(), 0.0))
        labels.add(r["label"])
        stats[r["group"]] = (labels, share + r["share"])
    out = [(g, len(ls), sh) for g, (ls, sh) in stats.items()]
    return sorted(out, key=lambda t: (-t[1], -t[2], t[0]))


# ============================================================================================== label maps
@torch.no_grad()
def predict_maps(
    model: GroupViT,
    data: SegmentationSet,
    bg_thresh: float | None = 0.95,
    indices=None,
    topk: int = 5,
    background_names=None,
) -> np.ndarray:
    """GroupViT's zero-shot label map (Eq 29-35, one window at the set's input size) of the images
    ``indices`` (None: all) of ``data``, in the set's labels: ``[n, H, W]`` int64; ``background_names``
    (None: the set's) are prompted too and map to 0."""
    idx = range(len(data)) if indices is None else [int(i) for i in indices]
    was = model.training
    model.eval()
    try:
        bgs = data.background_names if background_names is None else background_names
        te = text_embeddings(model, list(data.class_names) + list(bgs), TEMPLATES["simple"])
        maps = []
        for i in idx:
            pred = segment(
                model,
                data.images[i].to(_device(model)),
                text_embeds=te,
                short_side=None,
                window=None,
                topk=topk,
                bg_thresh=bg_thresh,
            )
            maps.append(to_labels(pred.cpu(), len(data.class_names), bg_thresh).numpy())
    finally:
        model.train(was)
    return np.stack(maps).astype(np.int64)


@torch.no_grad()
def grouping_alignment_maps(
    model: GroupViT,
    bank: SegmentTokens,
    val: SegmentTokens,
    data: SegmentationSet,
    indices=None,
    k: int = 10,
    bg_thresh: float = 0.95,
    max_per_class: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Thesis Fig 15 for the images ``indices`` of ``data`` (``val`` = their tokens, as for Table 3):
    ``{"Visual-Text Alignment", "Visual Grouping", "Original", "Ground truth"}`` label maps ``[n, H, W]``:
    ground-truth regions labelled through L_affinity (Eq 50-51), GroupViT's groups labelled by the KNN over
    ``bank`` (Eq 48-49), GroupViT's own inference (Eq 29-35, prompted with the object classes only, as the
    Table 3 row) and the ground truth."""
    idx = list(range(len(data))) if indices is None else [int(i) for i in indices]
    was = model.training
    model.eval()
    try:
        text = text_embeddings(model, data.class_names)
        align = []
        for i in idx:
            _, logits = segment(
                model,
                data.images[i].to(_device(model)),
                text_embeds=text,
                short_side=None,
                window=None,
                bg_thresh=bg_thresh,
                return_logits=True,
            )
            align.append(gt_group_labels(logits.cpu(), data.semantic[i].numpy()))
    finally:
        model.train(was)
    vg = knn_segmentation(bank, val, k, max_per_class, seed)[idx]
    orig = predict_maps(model, data, bg_thresh, idx, background_names=())  # prompted as Table 3's row
    return {
        "Visual-Text Alignment": np.stack(align),
        "Visual Grouping": vg,
        "Original": orig,
        "Ground truth": data.semantic[idx].numpy(),
    }


def images_with_classes(semantic, labels, n: int = 1, min_share: float = 0.0) -> list[tuple[int, int]]:
    """``(label, image)`` pairs: for every label in ``labels`` the ``n`` images of ``semantic [N, H, W]``
    where it covers the largest share of pixels (above ``min_share``), in label order: the rows of the
    qualitative figures of chosen or low-IoU classes (Fig 24-25). Labels in no image are skipped."""
    sem = np.asarray(semantic)
    share = np.stack([(sem == c).reshape(len(sem), -1).mean(1) for c in labels]) if len(labels) else np.zeros((0, 0))
    out = []
    for c, s in zip(labels, share):
        order = [int(i) for i in np.argsort(-s, kind="stable") if s[i] > min_share][:n]
        out += [(int(c), i) for i in order]
    return out


def label_palette(n: int, background=(0, 0, 0)) -> np.ndarray:
    """``[n, 3]`` uint8 colours of labels ``0 .. n - 1``: label 0 (background) ``background``, the others
    spread over hue by the golden ratio at alternating lightness, so neighbouring labels differ."""
    import colorsys

    pal = np.zeros((max(n, 1), 3), np.uint8)
    pal[0] = background
    for i in range(1, n):
        h = (i * 0.618033988749895) % 1.0
        v = 0.95 if i % 2 else 0.7
        pal[i] = np.round(np.asarray(colorsys.hsv_to_rgb(h, 0.75, v)) * 255).astype(np.uint8)
    return pal[:n]


def colorize(labels, palette: np.ndarray, ignore: int = IGNORE, ignore_color=(255, 255, 255)) -> np.ndarray:
    """Label map ``[..., H, W]`` -> class-coloured RGB ``[..., H, W, 3]`` uint8 (``ignore`` pixels
    ``ignore_color``); a label without a colour is an error naming it."""
    lab = np.asarray(labels).astype(np.int64)
    bad = np.unique(lab[(lab != ignore) & ((lab < 0) | (lab >= len(palette)))])
    if bad.size:
        raise ValueError(f"labels {bad[:5].tolist()} have no colour in a palette of {len(palette)}")
    out = np.asarray(palette, np.uint8)[np.where(lab == ignore, 0, lab)]
    out[lab == ignore] = ignore_color
    return out


# ============================================================================================== Fig 21-22
def per_class_iou(
    model: GroupViT,
    data: SegmentationSet,
    settings: EvalSettings | None = None,
    out_dir=None,
    model_name: str | None = None,
) -> dict:
    """Per-class zero-shot IoU of ``model`` on the images of ``data`` by GroupViT's protocol ``settings``
    (default the thesis's): a real dataset through :func:`~nbsupport.analysis.segmentation_eval.evaluate_zero_shot`
    (its first ``len(data)`` images at their original resolution; ``out_dir``: results.json,
    per_class_iou.csv, resumable), the synthetic world through :func:`~nbsupport.analysis.zero_shot.protocol_miou`.
    Returns ``{"miou", "iou" [L] (percent, NaN: class never seen), "conf" [L, L]}`` in the set's labels
    ``data.label_names`` (a dataset without background gets an empty label 0)."""
    s = settings or EvalSettings()
    if data.dataset is None:
        bg = 0.95 if s.bg_thresh is None else s.bg_thresh
        res = protocol_miou(model, data, s.short_side, s.window, s.stride, bg, s.templates)
        conf = np.asarray(res["conf"], np.int64)
        miou = res["miou"]
    else:
        res = evaluate_zero_shot(
            model, data.dataset, out_dir, s, n_images=len(data), progress=False, model_name=model_name
        )
        conf = np.asarray(res["confusion"], np.int64)
        if not data.has_background:  # classes 0..C-1 -> set labels 1..C
            conf = np.pad(conf, ((1, 0), (1, 0)))
        miou = res["miou"]
    if conf.shape[0] != data.n_classes:
        raise ValueError(f"the evaluation has {conf.shape[0]} labels, the set {data.n_classes}")
    return {"miou": miou, "iou": metrics.iou_per_class(conf) * 100, "conf": conf}


def iou_disparity(iou_a: dict, iou_b: dict, label_names, n: int = 10, skip_labels=()):
    """Thesis Fig 21-22: per-class IoU of model A and B (results of :func:`per_class_iou`) and ``b - a``,
    the ``n`` largest and ``n`` smallest differences (fewer classes: each once), classes seen by neither
    model and ``skip_labels`` left out; a DataFrame sorted by the difference, largest first."""
    df = metrics.iou_disparity(iou_a["conf"], iou_b["conf"], label_names)
    df = df[df["difference"].notna() & ~df["class"].isin([label_names[k] for k in skip_labels])]
    if len(df) > 2 * n:
        df = df.iloc[list(range(n)) + list(range(len(df) - n, len(df)))]
    return df.reset_index(drop=True)


def lowest_iou_labels(iou: dict, n: int = 4, skip_labels=(0,)) -> list[int]:
    """The ``n`` labels of lowest IoU among those that occur (a result of :func:`per_class_iou`), lowest
    first, ``skip_labels`` (background) left out: the classes of Fig 24-25."""
    v = np.asarray(iou["iou"], float)
    seen = np.asarray(iou["conf"]).sum(1) > 0  # present in the ground truth
    cand = [k for k in np.argsort(v, kind="stable") if np.isfinite(v[k]) and seen[k] and k not in skip_labels]
    return [int(k) for k in cand[:n]]


# ============================================================================================== Fig 23
@torch.no_grad()
def assigned_tokens(model: GroupViT, data: SegmentationSet, batch_size: int = 16, topk: int = 5) -> dict:
    """Final segment tokens ``Ŝ^3`` of the images of ``data`` that own pixels (argmax of Attn, Eq 47) with
    the class the model gives each (argmax of its row of Â_ST, Eq 31: the label all its pixels get before
    the background threshold, in the set's labels, background names -> 0) and its ground-truth majority
    label: ``{"features" [M, C], "assigned" [M], "majority" [M], "image" [M]}`` (thesis Fig 23: tokens
    coloured by the class the model assigns them)."""
    was = model.training
    model.eval()
    n_obj = len(data.class_names)
    feats, assigned, major, image = [], [], [], []
    try:
        te = text_embeddings(model, list(data.class_names) + list(data.background_names), TEMPLATES["simple"])
        scale = float(model.scale)
        size = tuple(data.semantic.shape[-2:])
        for s in range(0, len(data), batch_size):
            enc = model.encode_image(data.images[s : s + batch_size].to(_device(model)))
            G = enc.attn.shape[1]
            each = torch.eye(G, device=enc.attn.device)[:, :, None]  # group g alone at "pixel" (g, 0)
            for b in range(len(enc.attn)):
                i = s + b
                rows = label_logits(each, enc.group_embeds[b], enc.image_embeds[b], te, scale, topk, None)
                lab = to_labels(rows[:, :, 0].argmax(0).cpu(), n_obj, None).numpy()
                groups = resize_attn(enc.attn[b], enc.grid, size).argmax(0).cpu().numpy()
                gt = data.semantic[i].numpy()
                for g in np.unique(groups):
                    keep = (groups == g) & (gt != IGNORE)
                    feats.append(enc.final_tokens[b, g].cpu().numpy())
                    assigned.append(int(lab[g]))
                    major.append(int(np.bincount(gt[keep], minlength=1).argmax()) if keep.any() else IGNORE)
                    image.append(i)
    finally:
        model.train(was)
    return {
        "features": np.stack(feats).astype(np.float32),
        "assigned": np.asarray(assigned, np.int64),
        "majority": np.asarray(major, np.int64),
        "image": np.asarray(image, np.int64),
    }


def embed_assigned(tokens: dict, labels=None, method: str = "tsne", seed: int = 0, pca: int = 50) -> dict:
    """2-D embedding (:func:`~nbsupport.analysis.embedding.embed`) of the tokens of :func:`assigned_tokens`
    whose assigned label is in ``labels`` (None: every label; Fig 23b keeps the low-IoU classes):
    ``{"xy" [M, 2], "assigned" [M], "majority" [M], "agreement"}`` (share of tokens whose assigned label
    is their ground-truth majority). Fewer than 3 tokens: all empty."""
    keep = np.ones(len(tokens["assigned"]), bool) if labels is None else np.isin(tokens["assigned"], list(labels))
    if keep.sum() < 3:
        keep[:] = False
    a, m = tokens["assigned"][keep], tokens["majority"][keep]
    xy = embedding.embed(tokens["features"][keep], method, pca=pca, seed=seed) if keep.any() else np.zeros((0, 2))
    return {"xy": xy, "assigned": a, "majority": m, "agreement": float((a == m).mean()) if len(a) else float("nan")}
