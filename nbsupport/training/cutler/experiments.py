"""The thesis experiments around CutLER (Tables 1-2): training sets (all, no-overlap, MaskCut-filter),
self-training labels and rounds, evaluation splits by overlap and class-agnostic box / mask AP, and the
experiment flow notebook 06 and ``python -m nbsupport cutler selftrain`` run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from nbsupport.core import distributed
from nbsupport.core.io import atomic_write_json
from nbsupport.data import coco
from nbsupport.training.cutler.config import CutlerConfig, selftrain_config
from nbsupport.training.cutler.data import PseudoMaskDataset
from nbsupport.training.cutler.loop import load_trained, train
from nbsupport.training.cutler.predict import predict

# --------------------------------------------------------------------------------------------------
# Self-training and the thesis experiment sets


def _mask_iou(a_rles: list, b_rles: list) -> np.ndarray:
    from pycocotools import mask as mu

    if not a_rles or not b_rles:
        return np.zeros((len(a_rles), len(b_rles)))
    enc = lambda rs: [dict(r, counts=r["counts"].encode("ascii")) if isinstance(r["counts"], str) else r for r in rs]
    return np.asarray(mu.iou(enc(a_rles), enc(b_rles), [0] * len(b_rles))).reshape(len(a_rles), len(b_rles))


def _ann_rle(a: dict, info: dict) -> dict:
    from pycocotools import mask as mu

    seg = a["segmentation"]
    H, W = info["height"], info["width"]
    if isinstance(seg, list):
        r = mu.merge(mu.frPyObjects(seg, H, W))
    elif isinstance(seg.get("counts"), list):
        r = mu.frPyObjects(seg, H, W)
    else:
        return seg
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _annotation(rle: dict, image_id: int, score: float | None = None) -> dict:
    from pycocotools import mask as mu

    r = dict(rle, counts=rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"])
    a = {
        "image_id": int(image_id),
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": rle,
        "bbox": [float(v) for v in mu.toBbox(r)],
        "area": float(mu.area(r)),
    }
    if score is not None:
        a["score"] = float(score)
    return a


def _with_ids(data: dict, anns: list[dict], note: str) -> dict:
    return {
        "info": {"description": note},
        "images": data["images"],
        "annotations": [dict(a, id=k + 1) for k, a in enumerate(anns)],
        "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}],
    }


def selftrain_annotations(
    previous: dict, predictions: list[dict], score_thresh: float = 0.7, keep_iou: float = 0.5
) -> dict:
    """Next round's pseudo-labels (CutLER self-training): predictions with ``score >= score_thresh`` (0.7 in
    round 1, 0.65 in round 2) plus the previous round's masks whose max mask IoU with the kept predictions
    is ``< keep_iou`` (0.5). ``previous``: COCO dict; returns a COCO dict over the same images."""
    infos = {im["id"]: im for im in previous["images"]}
    preds, prev = {}, {}
    for p in predictions:
        if p["score"] >= score_thresh and p["image_id"] in infos:
            preds.setdefault(p["image_id"], []).append(p)
    for a in previous["annotations"]:
        prev.setdefault(a["image_id"], []).append(a)
    anns = []
    for iid, info in infos.items():
        kept = [p["segmentation"] for p in preds.get(iid, [])]
        anns += [_annotation(r, iid, p["score"]) for r, p in zip(kept, preds.get(iid, []))]
        old = [_ann_rle(a, info) for a in prev.get(iid, [])]
        if old:
            iou = _mask_iou(old, kept)
            best = iou.max(1) if kept else np.zeros(len(old))
            anns += [_annotation(r, iid) for r, b in zip(old, best) if b < keep_iou]
    return _with_ids(previous, anns, f"self-training pseudo-labels (score >= {score_thresh})")


def overlap_flags(data: dict, by: str = "box", min_overlap: float = 0.0) -> dict[int, bool]:
    """For each annotation id: does it overlap another instance of its image? ``by="box"`` (default): the
    boxes' intersection area exceeds ``min_overlap`` x the smaller box's area (0: any positive
    intersection). ``by="mask"``: the masks share pixels (same rule on mask areas). MaskCut masks are
    pixel-disjoint by construction, so box overlap is what distinguishes touching/occluding instances
    there. This is our reading of the thesis's "overlapping instances" (Tables 1-2), which it does not define.
    Crowd regions (``iscrowd`` 1, COCO's groups of people) are not instances: they are flagged False and
    overlap nothing."""
    if by not in ("box", "mask"):
        raise ValueError(f"by must be 'box' or 'mask', got {by!r}")
    infos = {im["id"]: im for im in data["images"]}
    per: dict[int, list] = {}
    flags = {}
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            flags[a["id"]] = False
        else:
            per.setdefault(a["image_id"], []).append(a)
    for iid, anns in per.items():
        n = len(anns)
        ov = np.zeros(n, bool)
        if n > 1:
            if by == "box":
                b = np.array([a["bbox"] for a in anns], float)
                x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
                iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
                ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
                inter = iw * ih
                area = b[:, 2] * b[:, 3]
            else:
                from pycocotools import mask as mu

                rles = [_ann_rle(a, infos[iid]) for a in anns]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 notice
                    ms = np.stack([mu.decode(dict(r, counts=r["counts"].encode("ascii"))) for r in rles])
                ms = ms.reshape(n, -1).astype(np.float64)
                inter = ms @ ms.T
                area = ms.sum(1)
            np.fill_diagonal(inter, 0)
            small = np.minimum(area[:, None], area[None])
            ov = ((inter > min_overlap * small) & (inter > 0)).any(1)
        for a, f in zip(anns, ov):
            flags[a["id"]] = bool(f)
    return flags


def maskcut_filter(maskcut: dict, predictions: list[dict], score_thresh: float = 0.7, min_iou: float = 0.5) -> dict:
    """ "MaskCut-filter" training set (thesis contribution 3): keep a MaskCut mask only when a trained
    detector's prediction with ``score >= score_thresh`` matches it with mask IoU ``>= min_iou``; the
    unmatched (noisy) MaskCut masks are removed. Thresholds are our choice (the thesis gives none)."""
    infos = {im["id"]: im for im in maskcut["images"]}
    preds: dict[int, list] = {}
    for p in predictions:
        if p["score"] >= score_thresh:
            preds.setdefault(p["image_id"], []).append(p["segmentation"])
    anns = []
    for a in maskcut["annotations"]:
        info = infos.get(a["image_id"])
        if info is None:
            continue
        kept = preds.get(a["image_id"], [])
        if kept and _mask_iou([_ann_rle(a, info)], kept).max() >= min_iou:
            anns.append(a)
    return _with_ids(maskcut, anns, f"MaskCut-filter (pred score >= {score_thresh}, IoU >= {min_iou})")


def build_training_set(
    maskcut: dict, kind: str = "all", drop: str = "images", predictions=None, by: str = "box", **filter_kw
) -> dict:
    """Training sets of Tables 1-2: ``"all"`` (MaskCut masks as they are), ``"no-overlap"`` (``drop="images"``
    removes images with any overlapping pair, ``drop="instances"`` only the overlapping instances) and
    ``"maskcut-filter"`` (:func:`maskcut_filter`, needs ``predictions`` of a detector trained on "all")."""
    if kind == "all":
        return _with_ids(maskcut, list(maskcut["annotations"]), "all MaskCut masks")
    if kind == "no-overlap":
        if drop not in ("images", "instances"):
            raise ValueError(f"drop must be 'images' or 'instances', got {drop!r}")
        flags = overlap_flags(maskcut, by)
        if drop == "instances":
            anns = [a for a in maskcut["annotations"] if not flags.get(a["id"], False)]
            return _with_ids(maskcut, anns, "MaskCut masks without overlapping instances")
        bad = {a["image_id"] for a in maskcut["annotations"] if flags.get(a["id"], False)}
        out = _with_ids(
            maskcut,
            [a for a in maskcut["annotations"] if a["image_id"] not in bad],
            "MaskCut images without overlapping instances",
        )
        out["images"] = [im for im in maskcut["images"] if im["id"] not in bad]
        return out
    if kind == "maskcut-filter":
        if predictions is None:
            raise ValueError("kind='maskcut-filter' needs predictions of a detector trained on the 'all' set")
        return maskcut_filter(maskcut, predictions, **filter_kw)
    raise ValueError(f"kind must be 'all', 'no-overlap' or 'maskcut-filter', got {kind!r}")


def split_by_overlap(gt: dict, by: str = "box") -> dict[str, dict]:
    """Evaluation splits of Tables 1-2 by image: ``all``, ``without_overlap`` (images none of whose
    ground-truth instances overlap) and ``only_overlap`` (images with at least one overlapping pair)."""
    flags = overlap_flags(gt, by)
    ov_imgs = {a["image_id"] for a in gt["annotations"] if flags.get(a["id"], False)}

    def sub(keep):
        return {
            **gt,
            "images": [im for im in gt["images"] if keep(im["id"])],
            "annotations": [a for a in gt["annotations"] if keep(a["image_id"])],
        }

    return {"all": gt, "without_overlap": sub(lambda i: i not in ov_imgs), "only_overlap": sub(lambda i: i in ov_imgs)}


def evaluate(gt, detections: list[dict]) -> dict:
    """Class-agnostic box and segm COCO metrics (percent) via :func:`nbsupport.analysis.metrics.coco_ap`;
    detections of images not in ``gt`` are ignored. ``{"box": {...}, "segm": {...}}``."""
    from nbsupport.analysis.metrics import coco_ap

    data = coco.read_coco_json(gt) if isinstance(gt, (str, Path)) else gt
    ids = {im["id"] for im in data["images"]}
    dets = [d for d in detections if d["image_id"] in ids]
    if not data["annotations"]:
        return {"box": {"AP": float("nan"), "AP50": float("nan")}, "segm": {"AP": float("nan"), "AP50": float("nan")}}
    return {"box": coco_ap(data, dets, "bbox"), "segm": coco_ap(data, dets, "segm")}


def evaluate_splits(gt, detections: list[dict], by: str = "box"):
    """Tables 1-2 layout: a pandas DataFrame, rows all / without_overlap / only_overlap, columns box AP,
    box AP50, segm AP, segm AP50 and the number of images."""
    import pandas as pd

    data = coco.read_coco_json(gt) if isinstance(gt, (str, Path)) else gt
    rows = []
    for name, sub in split_by_overlap(data, by).items():
        r = evaluate(sub, detections)
        rows.append(
            {
                "split": name,
                "images": len(sub["images"]),
                "box AP": r["box"]["AP"],
                "box AP50": r["box"]["AP50"],
                "segm AP": r["segm"]["AP"],
                "segm AP50": r["segm"]["AP50"],
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# The experiment flow: Tables 1-2 training sets and detectors, self-training rounds

EXPERIMENTS = ("all", "no-overlap", "maskcut-filter")


def train_experiments(
    cfg: CutlerConfig, maskcut: dict, image_root, out_dir, experiments=("all",), device=None, progress: bool = True
) -> dict[str, dict]:
    """One detector per training set of Tables 1-2, trained with ``cfg`` on the images in ``image_root``: the
    sets "all" and "no-overlap" (images with overlapping pseudo-masks dropped) of the MaskCut pseudo-masks
    ``maskcut`` (a COCO dict) in the order listed, then "maskcut-filter" (:func:`maskcut_filter` of the "all"
    detector's predictions on the training images; needs "all"). Run ``name`` lives in ``out_dir/<name>``, its
    set in ``out_dir/set_<name>.json``; an empty set is skipped with a warning. Returns ``{name: {"set": COCO
    dict, "model": path of model_final.pth, "summary": train()'s summary}}`` in training order."""
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad:
        raise ValueError(f"unknown experiments {bad}; choose from {EXPERIMENTS}")
    out, runs = Path(out_dir), {}
    device = device or distributed.resolve_device(cfg.device)

    def run(name: str, data: dict) -> None:
        if not data["annotations"]:
            warnings.warn(f"training set {name!r} is empty here: not trained", RuntimeWarning, stacklevel=3)
            return
        ds = PseudoMaskDataset(atomic_write_json(out / f"set_{name}.json", data), image_root)
        summary = train(cfg, out / name, dataset=ds, progress=progress)
        runs[name] = {"set": data, "model": out / name / "model_final.pth", "summary": summary}

    for name in [e for e in experiments if e != "maskcut-filter"]:
        run(name, build_training_set(maskcut, name, drop="images"))
    if "maskcut-filter" in experiments:
        if "all" not in runs:
            warnings.warn("maskcut-filter needs the detector trained on 'all': not trained", RuntimeWarning)
        else:
            model = load_trained(runs["all"]["model"], device=device)
            preds = predict(model, PseudoMaskDataset(None, image_root, train=False, data=maskcut), device)
            run("maskcut-filter", build_training_set(maskcut, "maskcut-filter", predictions=preds))
    return runs


def maskcut_detections(
    model, coco, ids=None, size: int = 480, n_masks: int = 3, tau="auto", crf: bool = False, batch_size: int = 8,
    device=None, progress: bool = False,
) -> list[dict]:  # fmt: skip
    """MaskCut alone as a detector (the baseline of Tables 1-2): its masks on the images ``ids`` (default: all)
    of a :class:`~nbsupport.data.CocoInstances` (:func:`nbsupport.maskcut.pipeline.image_masks`) as COCO
    detections, RLE, score 1, in image then pass order; each batch is encoded before the next is cut, so a
    whole split (COCO val2017) never holds its pixel masks at once."""
    from nbsupport.maskcut.coco import coco_annotations, coco_json
    from nbsupport.maskcut.pipeline import image_masks

    ids = list(coco.image_ids if ids is None else ids)
    chunks = range(0, len(ids), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="maskcut", unit="batch")
    anns = []
    for s in chunks:
        chunk = ids[s : s + batch_size]
        masks = image_masks(model, [coco.load(i) for i in chunk], size, n_masks, tau, crf, device)
        for i, m in zip(chunk, masks):
            anns += coco_annotations(m, i)
    return coco_json([], anns)["annotations"]


def evaluate_models(models: dict, dataset, device="cpu", baselines: dict | None = None):
    """The Tables 1-2 layout for several detectors: each ``models[name]`` (a checkpoint path or release name
    for :func:`~nbsupport.training.cutler.release.load_detector`, or a loaded detector) predicts on
    ``dataset`` (a :class:`PseudoMaskDataset` with ``train=False`` holding the ground truth) and is scored by
    :func:`evaluate_splits` (rows labelled ``CutLER (<name>)``), then each ``baselines[label]`` list of
    detections (e.g. ``"MaskCut alone"``: MaskCut's masks, score 1). Returns ``(table, {name: predictions})``."""
    import pandas as pd
    from torch import nn

    from nbsupport.training.cutler.release import load_detector

    tables, predictions = [], {}
    for name, model in models.items():
        model = model if isinstance(model, nn.Module) else load_detector(model, device)
        predictions[name] = predict(model, dataset, device)
        tables.append(evaluate_splits(dataset.data, predictions[name]).assign(model=f"CutLER ({name})"))
    for label, dets in (baselines or {}).items():
        tables.append(evaluate_splits(dataset.data, dets).assign(model=label))
    return (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()), predictions


def selftrain_round(
    cfg: CutlerConfig,
    labels_json,
    image_root,
    init,
    out_dir,
    round_number: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """One CutLER self-training round (thesis 3.3). The detector ``init`` predicts on the images of
    ``labels_json`` (``cfg.selftrain.detections`` per image); its predictions scoring at least the round's
    threshold (``cfg.selftrain.score_thresh``: 0.7 in round 1, 0.65 after) plus the previous masks that none
    of them covers (mask IoU < ``keep_iou``) become ``out_dir/pseudo_round<r>.json`` (written once, by rank 0,
    atomically: a resumed round reuses it), and a detector is trained on them from ``init`` in
    ``out_dir/train`` with the ``selftrain`` schedule (DropLoss off, copy-paste U(0.5, 1)). ``image_root``:
    the images (default: ``images/`` beside ``labels_json``). Returns the training summary with
    ``pseudo_labels``, ``score_thresh``, ``pseudo_masks`` (their number, when this call made them) and
    ``model`` (the new ``model_final.pth``)."""
    if round_number < 1:
        raise ValueError(f"round_number must be >= 1, got {round_number}")
    st = cfg.selftrain
    thr = st.score_thresh[min(round_number, len(st.score_thresh)) - 1]
    image_root = str(image_root or Path(labels_json).parent / "images")
    ctx = distributed.setup(cfg.device)
    out = Path(out_dir)
    next_json = out / f"pseudo_round{round_number}.json"
    n_masks = None
    if ctx.is_main and not next_json.is_file():
        model = load_trained(init, device=ctx.device)
        ds = PseudoMaskDataset(labels_json, image_root, train=False)
        preds = predict(model, ds, ctx.device, detections=st.detections, progress=progress)
        labels = selftrain_annotations(ds.data, preds, thr, st.keep_iou)
        atomic_write_json(next_json, labels)
        n_masks = len(labels["annotations"])
    distributed.barrier()  # the other ranks wait for the labels
    round_cfg = selftrain_config(cfg, train_json=str(next_json), image_root=image_root)
    summary = train(round_cfg, out / "train", resume=resume, init=init, progress=progress)
    return {
        **summary,
        "pseudo_labels": str(next_json),
        "score_thresh": thr,
        "pseudo_masks": n_masks,
        "model": str(out / "train" / "model_final.pth"),
    }


def selftrain_rounds(
    cfg: CutlerConfig, labels_json, image_root, init, out_dir, rounds: int, progress: bool = True
) -> list[dict]:
    """``rounds`` chained :func:`selftrain_round` calls in ``out_dir/round<r>``: round ``r`` relabels with the
    detector and the pseudo-labels of round ``r - 1`` (round 1: ``init`` and ``labels_json``), on the images in
    ``image_root`` (default: ``images/`` beside ``labels_json``). Returns each round's result."""
    results, image_root = [], image_root or Path(labels_json).parent / "images"
    for r in range(1, rounds + 1):
        res = selftrain_round(cfg, labels_json, image_root, init, Path(out_dir) / f"round{r}", r, progress=progress)
        results.append(res)
        labels_json, init = res["pseudo_labels"], res["model"]
    return results
