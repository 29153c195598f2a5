"""The supporting papers' per-image studies of notebook 09 as calls: HP's hidden positives of one anchor
(Fig. 5), CrOC's per-image cluster count next to MaskCut's masks and the ground-truth instances, DAVIS-2017
label propagation beside DINO's published row, LarvSeg's one-patch prototype segmentation and MMC's
feature variance under crops and masks.

MaskCut lives above this room, so :func:`object_counts` takes the masks as a callable (``masks_fn``, PIL
images -> ``[n, H, W]`` bool per image); the notebook passes :func:`nbsupport.maskcut.image_masks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from nbsupport.analysis import hidden_positives as hp
from nbsupport.analysis import online_clustering as oc
from nbsupport.analysis.affinity import miou_fraction, prototype_response_segmentation

#: DINO's DAVIS-2017 val rows (J&F-Mean, J-Mean, F-Mean in percent) as the supporting papers quote them
#: (MMC's table, DINO ImageNet-1k ViT-B/16).
DAVIS_PUBLISHED = {"dino_vitb16": {"J&F-Mean": 62.3, "J-Mean": 60.7, "F-Mean": 63.9}}

#: MMC's feature variance of DINO ViT-B/16 over 128 random crops and 128 random 50 % noise masks.
MMC_VARIANCE_PUBLISHED = {"dino_vitb16": {"crop": 0.43, "mask": 1.00}}

GROUPVIT_PREFIXES = ("groupvit:", "groupvit_groups:")


def first_vit(specs: Sequence[str]) -> str:
    """The first backbone spec that is a ViT (not ``groupvit[_groups]:<name>``): the per-image studies need
    keys, attention and a CLS token."""
    for s in specs:
        if not str(s).startswith(GROUPVIT_PREFIXES):
            return str(s)
    raise ValueError(f"no ViT among the backbones {list(specs)}: the per-image studies need one")


def vit_specs(specs: Sequence[str]) -> list[str]:
    """Every ViT spec of ``specs`` (GroupViT sources left out)."""
    return [str(s) for s in specs if not str(s).startswith(GROUPVIT_PREFIXES)]


# -- HP Fig. 5


def hidden_positive_example(
    model,
    images: torch.Tensor,
    anchor: tuple[int, int, int] | None = None,
    pool_size: int | None = None,
    attention: str = "paper",
    seed: int = 0,
) -> dict:
    """HP Fig. 5 for one anchor patch of ``images [B, 3, H, W]``: HP's features and attention
    (:func:`~nbsupport.analysis.hidden_positives.hp_features`), the reference pool (one random patch of
    each of at most ``pool_size`` images, with its indices) and the anchor's global positives across the
    batch and local positives in its 3x3 neighbourhood (:func:`~.hidden_positives.anchor_positives`).
    ``anchor``: ``(image, y, x)`` on the patch grid; None: the patch of image 0 with the highest mean
    attention received (a salient patch). Returns the positives' dict plus ``anchor``, ``grid``,
    ``pool_index`` ``[M, 3]`` and ``n_global`` (global positives per image)."""
    feats, attn = hp_features(model, images)
    b, h, w, _ = feats.shape
    if anchor is None:
        y, x = divmod(int(attn[0].mean(0).argmax()), w)
        anchor = (0, y, x)
    bi, y, x = (int(v) for v in anchor)
    if not (0 <= bi < b and 0 <= y < h and 0 <= x < w):
        raise ValueError(f"anchor {anchor} outside the {b} images of {h}x{w} patches")
    gen = torch.Generator().manual_seed(seed)
    pool, index = hp.build_reference_pool(feats, pool_size, gen, return_index=True)
    out = hp.anchor_positives(feats, pool, (bi, y, x), attn=attn, mode=attention)
    out.update(
        anchor=(bi, y, x),
        grid=(h, w),
        pool_index=index,
        n_global=out["global"].reshape(b, -1).sum(1).tolist(),
        feats=feats,
        attn=attn,
    )
    return out


def instance_anchor(coco, image_id, grid: tuple[int, int], index: int = 0) -> tuple[int, int, int] | None:
    """An anchor on an object for HP Fig. 5: ``(index, y, x)`` on a ``grid`` patch grid over the image
    resized to a square, at the pixel of the image's largest instance nearest to that instance's centroid
    (inside the object even for a ring). None when the image has no instance."""
    from nbsupport.data.instances import instance_map

    ids, _ = instance_map(coco, image_id)
    objs, sizes = np.unique(ids[ids > 0], return_counts=True)
    if not len(objs):
        return None
    ys, xs = np.nonzero(ids == objs[sizes.argmax()])
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    h, w = grid
    return (int(index), min(h - 1, int(ys[k] * h / ids.shape[0])), min(w - 1, int(xs[k] * w / ids.shape[1])))


def hp_features(model, images: torch.Tensor):
    """:func:`~nbsupport.analysis.hidden_positives.hp_features` on the model's device."""
    device = next(model.parameters()).device
    return hp.hp_features(model, images.to(device))


# -- CrOC's k against MaskCut's masks


def _instance_count(coco, image_id) -> int:
    from nbsupport.data.instances import object_annotations

    return len(object_annotations(coco, image_id))


def object_counts(
    model,
    coco,
    masks_fn: Callable[[list], list],
    ids: Sequence | None = None,
    size: int = 224,
    k_start: int = oc.K_START,
    k_max: int = oc.K_MAX,
    lambda_pos: float = oc.LAMBDA_POS,
    facet: str = "key",
    tie_tol: float = 0.0,
    maskcut_n: int | None = None,
    seed: int = 0,
) -> dict:
    """Per image of ``coco`` (a :class:`~nbsupport.data.CocoInstances`, images ``ids``, default all): the
    number of ground-truth instances (crowd regions left out), CrOC's chosen ``k`` on the image and its
    flip at ``size x size`` (:func:`~nbsupport.analysis.online_clustering.image_clusters`; ``k - 1``
    objects) and the non-empty masks ``masks_fn(pil_images)`` returns (MaskCut). Returns ``table`` (a
    DataFrame: image_id, gt, croc_k, croc, maskcut), ``summary``
    (:func:`~.online_clustering.compare_object_counts`), ``label_maps`` (CrOC's first-view labels),
    ``masks`` and ``images`` (the PIL images)."""
    from nbsupport.data.images import image_to_tensor

    ids = list(coco.image_ids if ids is None else ids)
    if not ids:
        raise ValueError("no images to count objects in")
    pils = [coco.load(i) for i in ids]
    device = next(model.parameters()).device
    x = torch.stack([image_to_tensor(im, size) for im in pils]).to(device)
    res = oc.image_clusters(model, x, k_start, k_max, lambda_pos, facet, tie_tol=tie_tol, seed=seed)
    masks = masks_fn(pils)
    gt = [_instance_count(coco, i) for i in ids]
    ks = [r["k"] for r in res]
    mc = [int(np.asarray(m).reshape(len(m), -1).any(1).sum()) if len(m) else 0 for m in masks]
    summary = oc.compare_object_counts(gt, ks, mc, maskcut_n)
    table = pd.DataFrame(
        {
            "image_id": ids,
            "gt": gt,
            "croc_k": ks,
            "croc": [r[1] for r in summary["rows"]],
            "maskcut": [r[2] for r in summary["rows"]],
        }
    )
    return {
        "table": table,
        "summary": summary,
        "label_maps": [r["label_map"] for r in res],
        "costs": [r["costs"] for r in res],
        "masks": masks,
        "images": pils,
    }


def count_summary(summary: dict) -> pd.DataFrame:
    """:func:`~.online_clustering.compare_object_counts`' numbers as one row per method."""
    rows = [{"method": "ground truth", "mean count": summary["gt_mean"]}]
    for name, label in (("croc", "CrOC (k - 1)"), ("maskcut", "MaskCut")):
        s = summary[name]
        rows.append(
            {
                "method": label,
                "mean count": s["mean"],
                "MAE": s["mae"],
                "bias": s["bias"],
                "exact (%)": 100 * s["exact"],
            }
        )
    return pd.DataFrame(rows)


# -- DAVIS-2017


def davis_table(results: dict) -> pd.DataFrame:
    """Our J&F / J / F per backbone (``{spec: run_davis(...) output}``, fractions) in percent, beside DINO's
    published row for the same backbone where one exists (:data:`DAVIS_PUBLISHED`)."""
    rows = []
    for spec, res in results.items():
        row = {"backbone": spec, "videos": len(res.get("per_video", {})), "objects": len(res.get("objects", []))}
        pub = DAVIS_PUBLISHED.get(spec, {})
        for k in ("J&F-Mean", "J-Mean", "F-Mean"):
            row[k] = 100 * float(res[k])
            row[f"{k} (DINO paper)"] = pub.get(k, float("nan"))
        rows.append(row)
    for spec, pub in DAVIS_PUBLISHED.items():
        if spec not in results:
            rows.append({"backbone": f"{spec} (published only)", **{f"{k} (DINO paper)": v for k, v in pub.items()}})
    return pd.DataFrame(rows)


# -- LarvSeg


def grid_labels(labels: torch.Tensor, grid: tuple[int, int], ignore: int = 255) -> torch.Tensor:
    """Pixel labels ``[N, S, S]`` (``ignore`` = void) on a patch grid ``[N, h, w]`` by the patch's majority
    class among its non-void pixels (-1 where a patch is all void); one image at a time."""
    n, s1, s2 = labels.shape
    h, w = grid
    if s1 % h or s2 % w:
        raise ValueError(f"labels {s1}x{s2} do not tile a {h}x{w} grid")
    valid = labels[labels != ignore]
    top = int(valid.max()) + 1 if valid.numel() else 1
    out = torch.full((n, h, w), -1, dtype=torch.long)
    for i in range(n):
        lab = labels[i].long().reshape(h, s1 // h, w, s2 // w).permute(0, 2, 1, 3).reshape(h, w, -1)
        hist = F.one_hot(torch.where(lab == ignore, top, lab), top + 1).sum(2)[..., :top]
        out[i] = torch.where(hist.sum(-1) > 0, hist.argmax(-1), out[i])
    return out


def prototype_study(
    model,
    images,
    labels: torch.Tensor,
    seeds: Sequence[int] = (0,),
    facet: str = "norm_token",
    batch_size: int = 32,
) -> dict:
    """LarvSeg's one-patch prototype probe on ``images`` (normalised ``[N, 3, S, S]`` or
    ``NormalizedImages``) with pixel labels ``[N, S, S]`` (255 void): per image and seed, one random patch
    per present class is its prototype and every patch takes the class of its most similar prototype
    (:func:`~nbsupport.analysis.affinity.prototype_response_segmentation`), scored by patch-level mIoU
    (:func:`~nbsupport.analysis.affinity.miou_fraction`). Returns ``miou`` (mean over images and seeds,
    percent), ``per_image`` ``[N, seeds]`` (fractions), ``labels`` (grid labels) and ``predictions``
    (seed 0's maps). Features are computed ``batch_size`` images at a time."""
    from nbsupport.models.features import extract

    device = next(model.parameters()).device
    feats = torch.cat(
        [
            extract(model, images[i : i + batch_size].to(device), facet, -1).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    glab = grid_labels(labels, feats.shape[1:3])
    per, preds = np.full((len(feats), len(seeds)), np.nan), []
    for i in range(len(feats)):
        if not (glab[i] >= 0).any():
            preds.append(None)
            continue
        for j, s in enumerate(seeds):
            p = prototype_response_segmentation(feats[i], glab[i], rng=int(s) * 1000 + i)
            per[i, j] = miou_fraction(p, glab[i])
            if j == 0:
                preds.append(p)
    return {"miou": 100 * float(np.nanmean(per)), "per_image": per, "labels": glab, "predictions": preds}


# -- MMC feature variance


def _views(x: torch.Tensor, n: int, mode: str, scale: tuple[float, float], patch: int, gen: torch.Generator):
    _, hh, ww = x.shape
    out = []
    for _ in range(n):
        if mode == "crop":
            s = float(torch.empty(1).uniform_(*scale, generator=gen))
            ch, cw = max(patch, int(hh * s**0.5)), max(patch, int(ww * s**0.5))
            y0 = int(torch.randint(0, hh - ch + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, ww - cw + 1, (1,), generator=gen))
            v = F.interpolate(x[None, :, y0 : y0 + ch, x0 : x0 + cw], size=(hh, ww), mode="bilinear")[0]
        elif mode == "mask":
            keep = torch.rand(hh // patch, ww // patch, generator=gen) >= 0.5
            keep = keep.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
            noise = torch.randn(x.shape, generator=gen)
            v = torch.where(keep[None], x, noise)
        else:
            raise ValueError(f"mode must be 'crop' or 'mask', got {mode!r}")
        out.append(v)
    return torch.stack(out)


def _cls_embeddings(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    from nbsupport.models.features import extract

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        _, c = extract(model, x[i : i + batch_size].to(device), "token", -1, include_cls=True)
        if hasattr(model, "norm"):
            with torch.no_grad():
                c = model.norm(c)
        out.append(F.normalize(c.float(), dim=-1).cpu())
    return torch.cat(out)


def _spread(e: torch.Tensor) -> float:
    return float(e.var(0, unbiased=False).sum())


def feature_variance(
    model,
    images: torch.Tensor,
    n_views: int = 128,
    mode: str = "crop",
    scale: tuple[float, float] = (0.25, 1.0),
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """MMC's stability test as this package defines it (the paper names the test, not its formula): per image
    of ``images [N, 3, H, W]`` (normalised), the L2-normalised CLS embeddings of ``n_views`` views (``crop``:
    a random crop of ``scale`` of the area resized back; ``mask``: half of the patches, at random, replaced
    by Gaussian noise); their spread is the sum over dimensions of the per-dimension variance across the
    views (0: every view the same embedding, at most 1 for unit vectors). Returns ``variance`` (the spread
    averaged over the images), ``image_variance`` (the same spread across the original images, NaN for one
    image) and ``relative`` (their ratio: 1 means the views of one image vary as much as different images
    do, which makes backbones with anisotropic embeddings comparable)."""
    from nbsupport.models.features import patch_size

    p = patch_size(model)
    gen = torch.Generator().manual_seed(seed)
    x = images.cpu().float()
    vals = [_spread(_cls_embeddings(model, _views(img, n_views, mode, scale, p, gen), batch_size)) for img in x]
    across = _spread(_cls_embeddings(model, x, batch_size)) if len(x) > 1 else float("nan")
    var = float(np.mean(vals))
    rel = var / across if len(x) > 1 and across > 0 else float("nan")
    return {"variance": var, "image_variance": across, "relative": rel}


def variance_table(values: dict) -> pd.DataFrame:
    """``{spec: {"crop": feature_variance(...), "mask": ...}}`` as rows (spread and spread relative to the
    spread across images, per mode) beside MMC's published DINO ViT-B/16 values."""
    rows = []
    for spec, v in values.items():
        pub = MMC_VARIANCE_PUBLISHED.get(spec, {})
        row = {"backbone": spec}
        for mode in ("crop", "mask"):
            r = v.get(mode, {})
            row[mode] = r.get("variance", float("nan"))
            row[f"{mode} / across images"] = r.get("relative", float("nan"))
        for mode in ("crop", "mask"):
            row[f"{mode} (MMC paper)"] = pub.get(mode, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)
