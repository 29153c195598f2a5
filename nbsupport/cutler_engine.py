"""CutLER engine: training loop, prediction, self-training, thesis experiment sets, evaluation, CLI.

Training (:func:`train`) follows the reference solver (SGD, warmup + step LR, AMP on CUDA, gradient-norm
clip 1.0, NaN losses skipped and counted) with atomic checkpoints and exact resume: each iteration
reseeds the RNGs from ``(seed, iteration, rank)`` and the data stream (:class:`~nbsupport.cutler.StreamSampler`)
restarts at ``iteration x batch``, so "N steps" and "N/2 steps, kill, resume" give the same weights.
Multi-GPU / multi-node runs are started with ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``):
DistributedDataParallel, SyncBatchNorm only when the world size is > 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import nbsupport.cutler as C

CONFIG_DIR = Path(__file__).parent / "cutler_configs"

DEFAULTS = {
    # model
    "arch": "resnet50", "weights": None, "min_size": list(C.REFERENCE_MIN_SIZES), "max_size": 1333,
    "min_size_test": 800, "score_thresh": 0.0, "detections_per_img": 100, "rpn_post_nms_top_n_train": 4000,
    "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_test": 1000, "rpn_pre_nms_top_n_test": 1000,
    "rpn_nms_thresh": 0.65, "box_batch_size_per_image": 512, "trainable_layers": 5, "representation_size": 1024,
    "drop_loss": True, "drop_iou": 0.01,
    # data
    "train_json": None, "image_root": None, "flip": True, "copy_paste": True, "copy_paste_scale": [0.3, 1.0],
    "copy_paste_max_cover": 0.5, "aspect_grouping": True, "num_workers": 4,
    # solver (batch_size is the total over all processes, as in detectron2's IMS_PER_BATCH)
    "batch_size": 16, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-5, "weight_decay_norm": 0.0,
    "max_iter": 160000, "steps": [80000], "gamma": 0.02, "warmup_iters": 1000, "warmup_factor": 0.001,
    "clip_grad": 1.0, "amp": True, "device": "auto", "seed": 0,
    # bookkeeping
    "checkpoint_period": 5000, "log_period": 20, "keep_checkpoint": True,
    # self-training (overrides applied by `selftrain`)
    "selftrain": {"max_iter": 80000, "steps": [], "lr": 0.005, "warmup_iters": 1000, "drop_loss": False, "copy_paste_scale": [0.5, 1.0],
                  "score_thresh": [0.7, 0.65], "keep_iou": 0.5, "detections": 30},
}


# --------------------------------------------------------------------------------------------------
# Config

SELFTRAIN_TRAIN_KEYS = ("max_iter", "steps", "lr", "drop_loss", "copy_paste_scale", "warmup_iters")


def load_config(name_or_path="paper", overrides: dict | None = None) -> dict:
    """Defaults <- recipe YAML (``smoke``, ``paper``, ... in ``nbsupport/cutler_configs`` or a path) <-
    ``overrides``. Unknown keys are refused (typos would otherwise be silently ignored)."""
    import yaml

    cfg = json.loads(json.dumps(DEFAULTS))
    if name_or_path is not None:
        p = Path(name_or_path)
        if not p.suffix:
            p = CONFIG_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            avail = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config {name_or_path!r} not found (recipes: {avail}, or a YAML path)")
        cfg = _merge(cfg, yaml.safe_load(p.read_text()) or {}, str(p))
    return _merge(cfg, overrides or {}, "overrides")


def _merge(base: dict, new: dict, where: str) -> dict:
    for k, v in new.items():
        if k not in base:
            raise KeyError(f"{where}: unknown CutLER config key {k!r} (known: {sorted(base)})")
        if isinstance(base[k], dict) and isinstance(v, dict):
            base[k] = _merge(dict(base[k]), v, f"{where}.{k}")
        else:
            base[k] = v
    return base


def _model_kwargs(cfg: dict) -> dict:
    keys = ("arch", "weights", "min_size", "max_size", "min_size_test", "score_thresh", "detections_per_img",
            "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_test",
            "rpn_pre_nms_top_n_test", "rpn_nms_thresh", "box_batch_size_per_image", "trainable_layers",
            "representation_size",
            "drop_loss", "drop_iou")
    return {k: cfg[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# Distributed helpers


def _dist_setup(cfg: dict):
    """``(rank, world_size, local_rank, device)`` from torchrun's env vars; initialises the process group."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.get("device", "auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for but CUDA is not available (use device=cpu)")
    device = torch.device(f"cuda:{local}" if want.startswith("cuda") and world > 1 else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


def _all_true(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() == 0)


# --------------------------------------------------------------------------------------------------
# Checkpoints and metrics


def save_atomic(obj, path) -> None:
    """``torch.save`` to ``path.tmp`` then ``os.replace``: a kill never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain(x):
    return json.loads(json.dumps(x))


def read_metrics(path) -> list[dict]:
    """Records of a ``metrics.jsonl`` log (one JSON object per line; a torn last line is ignored)."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _truncate_metrics(path: Path, last_iter: int) -> None:
    keep = [r for r in read_metrics(path) if r.get("iter", 0) <= last_iter]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def lr_at(it: int, cfg: dict) -> float:
    """Linear warmup from ``lr * warmup_factor`` over ``warmup_iters`` then x ``gamma`` at each step."""
    lr = cfg["lr"] * cfg["gamma"] ** sum(it >= s for s in cfg["steps"])
    if it < cfg["warmup_iters"]:
        a = it / max(1, cfg["warmup_iters"])
        lr *= cfg["warmup_factor"] * (1 - a) + a
    return lr


def load_trained(path, cfg: dict | None = None, device="cpu", **model_overrides):
    """A detector from a checkpoint written by :func:`train` (``checkpoint_last.pth`` or ``model_final.pth``),
    built with the checkpoint's own config (``cfg`` / ``model_overrides`` change it, e.g. detections)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    conf = {**DEFAULTS, **(ck.get("config") or {})}
    if cfg:
        conf.update(cfg)
    kw = _model_kwargs(conf)
    kw.update(model_overrides, weights=None)
    model = C.build_model(**kw)
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Training


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _param_groups(model, cfg):
    norm, other = [], []
    for m in model.modules():
        is_norm = isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                (norm if is_norm else other).append(p)
    return [{"params": other, "weight_decay": cfg["weight_decay"]},
            {"params": norm, "weight_decay": cfg["weight_decay_norm"]}]


def train(cfg: dict, out_dir, resume: bool = False, init=None, stop_after: int | None = None,
          progress: bool = True, dataset=None) -> dict:
    """Train a CutLER detector; returns a summary dict (also in ``out_dir/summary.json``).

    ``cfg``: :func:`load_config` output (needs ``train_json``, or pass ``dataset``). ``init``: detector
    checkpoint to start from (self-training). ``resume``: continue from ``out_dir/checkpoint_last.pth``
    (same data order and RNG streams; the metrics log is cut back to the checkpoint). ``stop_after``:
    leave after that iteration as if killed (tests). Writes ``metrics.jsonl`` (one record per
    ``log_period``), ``checkpoint_last.pth`` every ``checkpoint_period`` and ``model_final.pth``.
    """
    rank, world, local, device = _dist_setup(cfg)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    if dataset is None:
        if not cfg.get("train_json"):
            raise ValueError("config has no train_json (the MaskCut / pseudo-label COCO JSON to train on)")
        dataset = C.PseudoMaskDataset(cfg["train_json"], cfg.get("image_root"), train=True)
    if cfg["batch_size"] % world:
        raise ValueError(f"batch_size {cfg['batch_size']} is not divisible by the world size {world}")
    per_rank = cfg["batch_size"] // world

    model = C.build_model(**_model_kwargs(cfg))
    if init is not None:
        ck = torch.load(init, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"] if "model" in ck else ck)
    if world > 1 and device.type == "cuda":  # SyncBN only when there is more than one process (and GPUs)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and rank == 0:
        warnings.warn("multi-process CPU run (gloo): SyncBatchNorm needs CUDA, BatchNorm statistics stay per process",
                      RuntimeWarning)
    model.to(device)
    opt = torch.optim.SGD(_param_groups(model, cfg), lr=cfg["lr"], momentum=cfg["momentum"])
    use_amp = bool(cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start, nan_skipped, empty_batches = 0, 0, 0
    ck_path, log_path = out / "checkpoint_last.pth", out / "metrics.jsonl"
    if resume and ck_path.is_file():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if use_amp and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start, nan_skipped, empty_batches = int(ck["iteration"]), int(ck["nan_skipped"]), int(ck.get("empty_batches", 0))
        if rank == 0:
            _truncate_metrics(log_path, start)
    elif rank == 0 and log_path.exists():
        log_path.unlink()
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    common = dict(collate_fn=C.collate, num_workers=int(cfg["num_workers"]), pin_memory=device.type == "cuda",
                  persistent_workers=False)
    groups = C.aspect_groups(dataset) if cfg["aspect_grouping"] and hasattr(dataset, "records") else None
    if groups is not None and len(set(groups)) > 1:  # landscape and portrait batches (detectron2's default)
        batches = C.GroupedStreamBatchSampler(C.StreamSampler(len(dataset), seed, rank, world), groups, per_rank,
                                              skip=start)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    else:
        sampler = C.StreamSampler(len(dataset), seed, rank, world, start=start * per_rank)
        loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, **common)
    max_iter = int(cfg["max_iter"])
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, initial=start, desc="cutler", unit="it", dynamic_ncols=True)
    ddp.train()
    it = start
    data_iter = iter(loader)
    t_last, imgs_since = time.perf_counter(), 0
    log = open(log_path, "a") if rank == 0 else None
    try:
        while it < max_iter:
            t0 = time.perf_counter()
            images, targets = next(data_iter)
            t_data = time.perf_counter() - t0
            step_seed = (seed * 1_000_003 + it) * 64 + rank
            torch.manual_seed(step_seed)
            gen = torch.Generator().manual_seed(step_seed)
            lr = lr_at(it, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            record = None
            if not _all_true(len(images) > 0, world, device):
                empty_batches += 1  # every image of the batch unreadable: skip (counted)
            else:
                images, targets = _to_device(images, targets, device)
                images, targets = C.augment_batch(images, targets, gen, cfg["flip"], cfg["copy_paste"],
                                                  tuple(cfg["copy_paste_scale"]), cfg["copy_paste_max_cover"])
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    losses = ddp(images, targets)
                loss = sum(losses.values())
                if not _all_true(bool(torch.isfinite(loss)), world, device):
                    nan_skipped += 1
                    opt.zero_grad(set_to_none=True)
                    if bar is not None:
                        bar.set_postfix(nan_skipped=nan_skipped)
                else:
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                    scaler.step(opt)
                    scaler.update()
                    imgs_since += len(images) * world
                    record = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                              "grad_norm": float(gnorm)}
            it += 1
            if rank == 0 and (it % int(cfg["log_period"]) == 0 or it == max_iter) and record is not None:
                now = time.perf_counter()
                rec = {"iter": it, "lr": lr, **record, "data_time": t_data,
                       "images_per_s": imgs_since / max(now - t_last, 1e-9), "nan_skipped": nan_skipped,
                       "empty_batches": empty_batches}
                t_last, imgs_since = now, 0
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
            if bar is not None:
                bar.update(1)
            if rank == 0 and (it % int(cfg["checkpoint_period"]) == 0 or it == max_iter):
                save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scaler": scaler.state_dict() if use_amp else {}, "iteration": it,
                             "nan_skipped": nan_skipped, "empty_batches": empty_batches,
                             "config": _plain(cfg)}, ck_path)
            if stop_after is not None and it >= stop_after:
                return {"iteration": it, "stopped": True}
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    summary = {"iteration": it, "nan_skipped": nan_skipped, "empty_batches": empty_batches, "world_size": world,
               "device": str(device), "amp": use_amp, "problems": dict(getattr(dataset, "problems", {}))}
    if rank == 0:
        save_atomic({"model": model.state_dict(), "config": _plain(cfg), "iteration": it}, out / "model_final.pth")
        if not cfg.get("keep_checkpoint", True):  # finished: the resumable checkpoint is no longer needed
            ck_path.unlink(missing_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------------------------------
# Prediction


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mu

    r = mu.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


@torch.no_grad()
def predict(model, dataset, device="cpu", batch_size: int = 2, detections: int | None = None,
            mask_thresh: float = 0.5, progress: bool = False) -> list[dict]:
    """COCO result dicts (``image_id``, ``category_id`` 1, ``bbox`` xywh, ``segmentation`` RLE, ``score``)
    for every readable image of ``dataset`` (a :class:`~nbsupport.cutler.PseudoMaskDataset`, e.g. with
    ``train=False``). ``detections`` overrides the model's per-image cap (30 for self-training)."""
    m = getattr(model, "module", model)
    saved = m.roi_heads.detections_per_img
    if detections is not None:
        m.roi_heads.detections_per_img = int(detections)
    m.eval().to(device)
    results = []
    idx = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        idx = tqdm(idx, desc="predict", unit="batch")
    try:
        for s in idx:
            images, targets = C.collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            if not images:
                continue
            outs = m([im.to(device) for im in images])
            for t, o in zip(targets, outs):
                masks = (o["masks"][:, 0] > mask_thresh).cpu().numpy()
                for b, sc, mk in zip(o["boxes"].cpu().tolist(), o["scores"].cpu().tolist(), masks):
                    results.append({"image_id": t["image_id"], "category_id": 1, "score": float(sc),
                                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "segmentation": _rle(mk)})
    finally:
        m.roi_heads.detections_per_img = saved
    return results


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
    a = {"image_id": int(image_id), "category_id": 1, "iscrowd": 0, "segmentation": rle,
         "bbox": [float(v) for v in mu.toBbox(r)], "area": float(mu.area(r))}
    if score is not None:
        a["score"] = float(score)
    return a


def _with_ids(data: dict, anns: list[dict], note: str) -> dict:
    return {"info": {"description": note}, "images": data["images"],
            "annotations": [dict(a, id=k + 1) for k, a in enumerate(anns)],
            "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}]}


def selftrain_annotations(previous: dict, predictions: list[dict], score_thresh: float = 0.7,
                          keep_iou: float = 0.5) -> dict:
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
    there. This is our reading of the thesis's "overlapping instances" (Tables 1-2), which it does not define."""
    if by not in ("box", "mask"):
        raise ValueError(f"by must be 'box' or 'mask', got {by!r}")
    infos = {im["id"]: im for im in data["images"]}
    per: dict[int, list] = {}
    for a in data["annotations"]:
        per.setdefault(a["image_id"], []).append(a)
    flags = {}
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
    """"MaskCut-filter" training set (thesis contribution 3): keep a MaskCut mask only when a trained
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


def build_training_set(maskcut: dict, kind: str = "all", drop: str = "images", predictions=None,
                       by: str = "box", **filter_kw) -> dict:
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
        out = _with_ids(maskcut, [a for a in maskcut["annotations"] if a["image_id"] not in bad],
                        "MaskCut images without overlapping instances")
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
        return {**gt, "images": [im for im in gt["images"] if keep(im["id"])],
                "annotations": [a for a in gt["annotations"] if keep(a["image_id"])]}

    return {"all": gt, "without_overlap": sub(lambda i: i not in ov_imgs), "only_overlap": sub(lambda i: i in ov_imgs)}


def evaluate(gt, detections: list[dict]) -> dict:
    """Class-agnostic box and segm COCO metrics (percent) via :func:`nbsupport.metrics.coco_ap`;
    detections of images not in ``gt`` are ignored. ``{"box": {...}, "segm": {...}}``."""
    from nbsupport.metrics import coco_ap

    data = C.read_coco_json(gt) if isinstance(gt, (str, Path)) else gt
    ids = {im["id"] for im in data["images"]}
    dets = [d for d in detections if d["image_id"] in ids]
    if not data["annotations"]:
        return {"box": {"AP": float("nan"), "AP50": float("nan")}, "segm": {"AP": float("nan"), "AP50": float("nan")}}
    return {"box": coco_ap(data, dets, "bbox"), "segm": coco_ap(data, dets, "segm")}


def evaluate_splits(gt, detections: list[dict], by: str = "box"):
    """Tables 1-2 layout: a pandas DataFrame, rows all / without_overlap / only_overlap, columns box AP,
    box AP50, segm AP, segm AP50 and the number of images."""
    import pandas as pd

    data = C.read_coco_json(gt) if isinstance(gt, (str, Path)) else gt
    rows = []
    for name, sub in split_by_overlap(data, by).items():
        r = evaluate(sub, detections)
        rows.append({"split": name, "images": len(sub["images"]), "box AP": r["box"]["AP"],
                     "box AP50": r["box"]["AP50"], "segm AP": r["segm"]["AP"], "segm AP50": r["segm"]["AP50"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# CLI: python -m nbsupport cutler train|selftrain|predict|eval


def _overrides(items) -> dict:
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"-o expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _cfg_from_args(a) -> dict:
    over = _overrides(a.set)
    for k in ("train_json", "image_root", "weights", "device"):
        if getattr(a, k, None) is not None:
            over[k] = getattr(a, k)
    return load_config(a.config, over)


def _cmd_train(a) -> int:
    cfg = _cfg_from_args(a)
    s = train(cfg, a.out, resume=a.resume, init=a.init, progress=not a.no_progress)
    print(json.dumps(s))
    return 0


def _cmd_selftrain(a) -> int:
    cfg = _cfg_from_args(a)
    st = cfg["selftrain"]
    r = int(a.round)
    thr = st["score_thresh"][min(r, len(st["score_thresh"])) - 1]
    rank, world, _, device = _dist_setup(cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    next_json = out / f"pseudo_round{r}.json"
    # rank 0 relabels (once: idempotent on resume, written atomically); the other ranks wait for the file
    if rank == 0 and not next_json.is_file():
        model = load_trained(a.init, device=device)
        ds = C.PseudoMaskDataset(cfg["train_json"], cfg.get("image_root"), train=False)
        preds = predict(model, ds, device, detections=st["detections"], progress=not a.no_progress)
        nxt = selftrain_annotations(ds.data, preds, thr, st["keep_iou"])
        tmp = next_json.with_name(next_json.name + ".tmp")
        tmp.write_text(json.dumps(nxt))
        os.replace(tmp, next_json)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    cfg2 = dict(cfg, **{k: st[k] for k in SELFTRAIN_TRAIN_KEYS if k in st}, train_json=str(next_json),
                image_root=cfg.get("image_root") or str(Path(cfg["train_json"]).parent / "images"))
    s = train(cfg2, out / "train", resume=a.resume, init=a.init, progress=not a.no_progress)
    print(json.dumps({**s, "pseudo_labels": str(next_json), "score_thresh": thr}))
    return 0


def _cmd_predict(a) -> int:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained(a.checkpoint, device=device)
    ds = C.PseudoMaskDataset(a.json, a.image_root, train=False)
    preds = predict(model, ds, device, detections=a.detections, progress=True)
    Path(a.out).write_text(json.dumps(preds))
    print(f"{len(preds)} detections on {len(ds)} images -> {a.out}")
    return 0


def _cmd_eval(a) -> int:
    dets = json.loads(Path(a.pred).read_text())
    table = evaluate_splits(a.gt, dets, a.overlap_by)
    print(table.round(2).to_string(index=False))
    if a.out:
        table.to_csv(a.out, index=False)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("cutler", help="CutLER detector on MaskCut pseudo-masks (train/selftrain/predict/eval)")
    sub = p.add_subparsers(dest="cutler_command", metavar="ACTION", required=True)

    def common(q):
        q.add_argument("--config", default="paper", help="recipe (smoke|paper|...) or YAML path")
        q.add_argument("--train-json", dest="train_json", help="MaskCut / pseudo-label COCO JSON")
        q.add_argument("--image-root", dest="image_root", help="image folder (default: images/ beside the JSON)")
        q.add_argument("--weights", help="ResNet backbone weights (e.g. DINO ResNet-50); default random init")
        q.add_argument("--device", help="cpu | cuda | auto")
        q.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl)")
        q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pth")
        q.add_argument("--init", help="detector checkpoint to start from")
        q.add_argument("-o", "--set", action="append", metavar="KEY=VALUE", help="config override (YAML value)")
        q.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train on pseudo-masks (torchrun for multi-GPU)")
    common(t)
    t.set_defaults(func=_cmd_train)
    s = sub.add_parser("selftrain", help="one self-training round: predict, relabel, retrain (DropLoss off)")
    common(s)
    s.add_argument("--round", type=int, default=1, help="1 (score >= 0.7) or 2 (>= 0.65)")
    s.set_defaults(func=_cmd_selftrain)
    q = sub.add_parser("predict", help="COCO results JSON of a trained detector")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--json", required=True, help="COCO JSON listing the images")
    q.add_argument("--image-root")
    q.add_argument("--out", required=True)
    q.add_argument("--detections", type=int, default=100)
    q.add_argument("--device")
    q.set_defaults(func=_cmd_predict)
    e = sub.add_parser("eval", help="class-agnostic box/segm AP, AP50 on all / without / only overlapping")
    e.add_argument("--gt", required=True)
    e.add_argument("--pred", required=True)
    e.add_argument("--overlap-by", default="box", choices=["box", "mask"])
    e.add_argument("--out", help="CSV of the table")
    e.set_defaults(func=_cmd_eval)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbsupport.cutler_engine")
    sub = ap.add_subparsers(dest="command")
    add_cli(sub)
    a = ap.parse_args(["cutler", *(argv if argv is not None else sys.argv[1:])])
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
