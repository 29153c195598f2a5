"""GroupViT's zero-shot semantic segmentation scored on a whole benchmark (thesis 4.6, 5.3; GroupViT's
``main_seg.py`` protocol): every image of a split in its official layout goes through
:func:`~nbsupport.models.groupvit.inference.segment` (short side 448, 448 / 224 sliding window, top-5 classes,
the dataset's background threshold, "a photo of a {}."), is scored at the full resolution of its ground
truth, and one dataset-wide confusion matrix over every pixel that is not 255 gives mIoU (Eq 45-46), per-class
IoU and pixel accuracy.

Long runs: with ``out_dir`` every image's confusion matrix is appended (sparse) to
``out_dir/parts/rank<r>.jsonl`` as it is computed, so a killed run restarts where it stopped and sums to
exactly the numbers of an uninterrupted one; ``distributed=True`` (under ``torchrun``) gives rank ``r`` the
images ``i % world == r`` and sums the matrices over ranks. An image that cannot be read is recorded with
its error and the run goes on; the results name it. :func:`validate` is the same computation in memory, for a
trainer's per-epoch validation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nbsupport.analysis import metrics
from nbsupport.analysis.zero_shot_protocol import (
    EvalSettings,
    class_references,
    differences,
    references,
    resolve,
)
from nbsupport.core import distributed as dist
from nbsupport.core.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, truncate_jsonl
from nbsupport.data.datasets.base import IGNORE, SegmentationDataset
from nbsupport.data.images import IMAGENET_MEAN, IMAGENET_STD
from nbsupport.data.segmentation import open_dataset
from nbsupport.models import groupvit as gv

#: Errors of reading one image or its labels: recorded for that image, the run goes on.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ResumeMismatch(RuntimeError):
    """``out_dir`` holds per-image results of another evaluation (model weights, dataset or settings differ)."""


# ---------------------------------------------------------------------------------------------- per image
def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in key order): which weights were
    evaluated, and the check that a resumed run uses the same ones."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def image_confusion(pred: torch.Tensor, gt: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Flattened confusion counts ``[n_classes**2]`` (index ``gt * n_classes + pred``) of one image; pixels with
    ``gt == 255`` are never counted."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in size")
    keep = gt != IGNORE
    idx = gt[keep].long() * n_classes + pred[keep].long()
    return torch.bincount(idx, minlength=n_classes * n_classes)


def to_sparse(flat: np.ndarray) -> dict:
    """Non-zero cells of a flattened confusion matrix: ``{"cells": [...], "counts": [...]}``."""
    nz = np.flatnonzero(flat)
    return {"cells": nz.tolist(), "counts": flat[nz].astype(np.int64).tolist()}


def from_sparse(rec: dict, n_classes: int) -> np.ndarray:
    """The ``[n_classes, n_classes]`` matrix of one per-image record."""
    flat = np.zeros(n_classes * n_classes, np.int64)
    np.add.at(flat, np.asarray(rec["cells"], np.int64), np.asarray(rec["counts"], np.int64))
    return flat.reshape(n_classes, n_classes)


def scores(conf: np.ndarray) -> dict:
    """mIoU (Eq 46, classes present in ground truth or prediction), per-class IoU and accuracy, pixel
    accuracy and mean accuracy, in percent (NaN -> None: a class never seen)."""
    iou = metrics.iou_per_class(conf) * 100
    gt = conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(gt > 0, np.diag(conf) / np.maximum(gt, 1), np.nan) * 100
    total = conf.sum()

    def clean(a):
        return [None if not np.isfinite(v) else float(v) for v in a]

    return {
        "miou": metrics.miou(conf) if total else float("nan"),
        "pixel_accuracy": float(np.trace(conf) / total * 100) if total else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "iou": clean(iou),
        "accuracy": clean(acc),
    }


class _Items(torch.utils.data.Dataset):
    """``(index, uint8 pixels [3, H, W], labels [H, W], None)`` of the given indices, or ``(index, None, None,
    error)`` for an image that cannot be read (decoded in loader workers)."""

    def __init__(self, ds: SegmentationDataset, indices: list[int]):
        self.ds, self.indices = ds, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            img, mask = self.ds[i]
            arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
            pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
            return i, pixels, torch.from_numpy(np.asarray(mask, np.int64)), None
        except READ_ERRORS as e:
            return i, None, None, f"{type(e).__name__}: {e}"


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=pixels.device)[:, None, None]
    return (pixels.float() / 255.0 - mean) / std


# ---------------------------------------------------------------------------------------------- resume
def _parts(out_dir: Path) -> Path:
    return out_dir / "parts"


def _read_done(out_dir: Path, ds: SegmentationDataset) -> dict[int, dict]:
    """Per-image records of earlier (or other ranks') runs in ``out_dir/parts/*.jsonl``, by index (a success
    over a recorded failure); a record whose image id is not the dataset's at that index means the split changed (:class:`ResumeMismatch`)."""
    done: dict[int, dict] = {}
    for f in sorted(_parts(out_dir).glob("rank*.jsonl")):
        for rec in read_jsonl(f):
            i = int(rec["i"])
            if i >= len(ds) or str(ds.ids[i]) != rec["id"]:
                have = str(ds.ids[i]) if i < len(ds) else "none"
                raise ResumeMismatch(
                    f"{f}: image {i} was {rec['id']!r} but {ds.name} {ds.split} has {have!r} there: "
                    "the split changed; use another out_dir or fresh=True"
                )
            if i not in done or ("error" in done[i] and "error" not in rec):
                done[i] = rec  # a later success (a retried image) wins over a recorded failure
    return done


def _check_header(out_dir: Path, header: dict, is_main: bool, sync: Callable[[], None]) -> None:
    """``out_dir/run.json`` holds what the per-image records depend on (model weights, dataset, settings):
    written by the first run, compared by every resumed one (``sync``: a barrier between the ranks)."""
    path = out_dir / "run.json"
    key = {k: header[k] for k in ("model_sha256", "dataset", "split", "classes", "settings", "bg_thresh")}
    if is_main and not path.is_file():
        atomic_write_json(path, {**header, "key": key}, indent=1)
    sync()
    old = json.loads(path.read_text()).get("key", {})
    diff = [k for k in key if old.get(k) != key[k]]
    if diff:
        lines = "; ".join(f"{k}: was {old.get(k)!r}, now {key[k]!r}" for k in diff)
        raise ResumeMismatch(
            f"{out_dir} holds results of another evaluation ({lines[:600]}); use another out_dir, or "
            "fresh=True / --fresh to discard them"
        )


# ---------------------------------------------------------------------------------------------- evaluation
def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model.module, gv.GroupViT) else model


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_zero_shot(
    model: gv.GroupViT,
    dataset,
    out_dir=None,
    settings: EvalSettings | None = None,
    *,
    root=None,
    split: str = "val",
    n_images: int | None = None,
    device=None,
    workers: int = 0,
    window_batch: int = 4,
    distributed: bool = False,
    fresh: bool = False,
    progress: bool = True,
    on_image: Callable[[dict], None] | None = None,
    model_name: str | None = None,
) -> dict:
    """Zero-shot mIoU of ``model`` on ``dataset`` (a :class:`SegmentationDataset`, or a name of
    :func:`~nbsupport.data.datasets.segmentation_dataset` with ``root`` and ``split``) with the protocol
    ``settings`` (:class:`~nbsupport.analysis.zero_shot_protocol.EvalSettings`; default the thesis's), over the
    first ``n_images`` of the split (None: all). Returns the results (see :func:`results_dict`); with
    ``out_dir`` also writes ``results.json``, ``per_class_iou.csv`` and the resumable per-image records.

    ``distributed``: this process is one of a ``torchrun`` group (every rank calls this): rank ``r`` takes
    images ``i % world == r``, matrices are summed over ranks, rank 0 writes. ``fresh``: discard earlier
    records in ``out_dir`` (a resumed run keeps them and tries the images that failed again). ``on_image(record)``: called after each image's record is stored (a test hook; an
    exception there stops the run as a kill would). ``window_batch``: sliding-window crops per forward pass
    (speed only)."""
    t0 = time.time()
    ds = open_dataset(dataset, split, root)
    core = _unwrap(model)
    if device is not None:
        core.to(device)
    dev = _device_of(core)
    rank, world = (torch.distributed.get_rank(), dist.world_size()) if distributed and dist.is_initialized() else (0, 1)
    sync = dist.barrier if world > 1 else (lambda: None)  # never a collective when only this process calls
    n_req = len(ds) if n_images is None else int(n_images)
    if n_req < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images!r}")
    n = min(n_req, len(ds))
    proto = resolve(ds.name, ds.classes, settings)
    s = proto.settings
    C = len(ds.classes)
    info = getattr(core, "nbs_info", {}) or {}
    name = model_name or info.get("name", "groupvit")
    out = Path(out_dir) if out_dir is not None else None
    sha = weights_sha256(core) if out is not None else None
    header = {
        "model": name,
        "model_sha256": sha,
        "dataset": ds.name,
        "root": str(ds.root),
        "split": ds.split,
        "classes": list(ds.classes),
        "settings": s.to_dict(),
        "bg_thresh": proto.bg_thresh,
    }
    done: dict[int, dict] = {}
    own_part = None
    if out is not None:
        if fresh and rank == 0:
            shutil.rmtree(_parts(out), ignore_errors=True)
            for f in ("run.json", "results.json", "per_class_iou.csv"):
                (out / f).unlink(missing_ok=True)
        sync()
        out.mkdir(parents=True, exist_ok=True)
        _check_header(out, header, rank == 0, sync)
        done = _read_done(out, ds)
        own_part = _parts(out) / f"rank{rank}.jsonl"
        truncate_jsonl(own_part, lambda r: True)  # a torn last line of a killed run: new records start clean
    owned = [i for i in range(n) if i % world == rank]
    todo = [i for i in owned if i not in done or "error" in done[i]]  # failed images are tried again
    names = list(ds.classes[1:] if proto.with_background else ds.classes)
    was = core.training
    core.eval()
    records: dict[int, dict] = {i: done[i] for i in owned if i in done and "error" not in done[i]}
    t_compute, n_new = 0.0, 0
    n_failed = sum("error" in r for r in records.values())
    try:
        te = gv.text_embeddings(core, names, s.templates)
        loader = torch.utils.data.DataLoader(_Items(ds, todo), batch_size=None, num_workers=int(workers))
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(todo),
            desc=f"groupvit-eval {ds.name}",
            unit="img",
            unit_scale=world if world > 1 else False,
            disable=not progress or rank != 0 or not todo,
        )
        t_start = time.time()
        for i, pixels, gt, err in loader:
            rec = {"i": int(i), "id": str(ds.ids[i])}
            if err is not None:
                rec["error"] = err
            else:
                pred = gv.segment(
                    core,
                    _normalise(pixels.to(dev)),
                    text_embeds=te,
                    short_side=s.short_side,
                    window=s.window,
                    stride=s.stride,
                    topk=s.topk,
                    bg_thresh=proto.bg_thresh,
                    max_long=s.max_long,
                    window_batch=window_batch,
                )
                flat = image_confusion(pred, gt.to(dev), C).cpu().numpy()
                rec.update(hw=list(gt.shape), **to_sparse(flat))
            if own_part is not None:
                append_jsonl(own_part, rec)
            records[int(i)] = rec
            n_new += 1
            n_failed += "error" in rec
            bar.update(1)
            bar.set_postfix(failed=n_failed, refresh=False)
            if on_image is not None:
                on_image(rec)
        t_compute = time.time() - t_start
        bar.close()
    finally:
        core.train(was)
    conf = np.zeros((C, C), np.int64)
    for rec in records.values():
        if "error" not in rec:
            conf += from_sparse(rec, C)
    failed = [{"index": r["i"], "id": r["id"], "error": r["error"]} for r in records.values() if "error" in r]
    if world > 1:
        t = torch.from_numpy(conf).to(dev)
        torch.distributed.all_reduce(t)
        conf = t.cpu().numpy()
        gathered = dist.all_gather_objects((failed, n_new, t_compute))
        failed = [f for g in gathered for f in g[0]]
        n_new = sum(g[1] for g in gathered)
        t_compute = max(g[2] for g in gathered)
    failed.sort(key=lambda f: f["index"])
    res = results_dict(conf, ds, proto, n_req, n, failed, name, info, sha)
    res["run"] = {
        "world_size": world,
        "device": str(dev),
        "new_images": n_new,
        "resumed_images": n - n_new,
        "seconds": round(time.time() - t0, 3),
        "images_per_s": round(n_new / t_compute, 3) if t_compute > 0 else None,
    }
    if out is not None and rank == 0:
        write_results(out, res)
    sync()
    return res


def results_dict(conf, ds, proto, n_req, n, failed, name, info, sha) -> dict:
    """Everything ``results.json`` holds: scores, the confusion matrix (rows ground truth, columns prediction),
    the model (name, description, fixture flag, weights hash), the dataset, the settings, the failures, the
    published reference mIoU beside ours and the settings that differ from the reference run."""
    sc = scores(conf)
    classes = list(ds.classes)
    refs = references(name, ds.name)
    for r in refs:
        r["delta"] = None if not np.isfinite(sc["miou"]) else round(sc["miou"] - r["miou"], 2)
    fixture = bool(info.get("fixture", False))
    return {
        "miou": None if not np.isfinite(sc["miou"]) else sc["miou"],
        "pixel_accuracy": None if not np.isfinite(sc["pixel_accuracy"]) else sc["pixel_accuracy"],
        "mean_accuracy": None if not np.isfinite(sc["mean_accuracy"]) else sc["mean_accuracy"],
        "iou": dict(zip(classes, sc["iou"])),
        "accuracy": dict(zip(classes, sc["accuracy"])),
        "classes": classes,
        "confusion": conf.tolist(),
        "model": {
            "name": name,
            "description": info.get("description", name),
            "fixture": fixture,
            "weights_sha256": sha,
        },
        "dataset": {"name": ds.name, "root": str(ds.root), "split": ds.split, "n_split": len(ds)},
        "n_requested": n_req,
        "n_images": n - len(failed),
        "n_failed": len(failed),
        "failed": failed,
        "settings": {
            **proto.settings.to_dict(),
            "bg_thresh": proto.bg_thresh,
            "bg_source": proto.bg_source,
            "with_background": proto.with_background,
        },
        "reference": refs,
        "class_reference": class_references(name, ds.name),
        "differences": differences(proto, ds.name, ds.split, n - len(failed), fixture),
        "notes": list(proto.notes),
    }


# ---------------------------------------------------------------------------------------------- outputs
def per_class_csv(res: dict) -> str:
    """``class_id,class,iou,accuracy,gt_pixels,pred_pixels[,reference_iou]`` rows of a results dict."""
    conf = np.asarray(res["confusion"], np.int64)
    ref = res.get("class_reference")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["class_id", "class", "iou", "accuracy", "gt_pixels", "pred_pixels"] + (["reference_iou"] if ref else [])
    )
    for k, c in enumerate(res["classes"]):
        iou, acc = res["iou"][c], res["accuracy"][c]
        row = [k, c, "" if iou is None else f"{iou:.4f}", "" if acc is None else f"{acc:.4f}"]
        row += [int(conf[k].sum()), int(conf[:, k].sum())] + ([ref[k]] if ref else [])
        w.writerow(row)
    return buf.getvalue()


def format_report(res: dict) -> str:
    """The results as a few printed lines: ours beside the published numbers, the settings used and those that
    differ from the reference run, the images that failed."""
    d, m, s = res["dataset"], res["model"], res["settings"]

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = [
        f"GroupViT zero-shot segmentation: {d['name']} {d['split']}, {res['n_images']} images"
        f" ({res['n_failed']} failed), {m['description']}",
        f"  mIoU {f(res['miou'])}   pixel acc {f(res['pixel_accuracy'])}   mean acc {f(res['mean_accuracy'])}",
    ]
    for r in res["reference"]:
        lines.append(f"  reference {r['source']} ({r['model']}): {r['miou']:.2f}  (ours - reference {f(r['delta'])})")
    bg = "none (no background class)" if s["bg_thresh"] is None else f"{s['bg_thresh']} ({s['bg_source']})"
    size = "as is" if s["short_side"] is None else f"short side {s['short_side']} (long <= {s['max_long']})"
    win = "whole image" if s["window"] is None else f"window {s['window']} / stride {s['stride']}"
    lines.append(f"  settings: {size}, {win}, bg_thresh {bg}, top-{s['topk']}, templates {s['templates']}")
    for k in res["differences"]:
        lines.append(f"  differs from the reference run: {k}")
    for k in res["notes"]:
        lines.append(f"  note: {k}")
    for fl in res["failed"][:10]:
        lines.append(f"  failed: image {fl['index']} ({fl['id']}): {fl['error']}")
    if res["n_failed"] > 10:
        lines.append(f"  ... {res['n_failed'] - 10} more failures in results.json")
    return "\n".join(lines)


def write_results(out_dir, res: dict) -> dict[str, Path]:
    """``results.json`` and ``per_class_iou.csv`` in ``out_dir`` (atomically)."""
    out = Path(out_dir)
    return {
        "results": atomic_write_json(out / "results.json", res, indent=1),
        "per_class": atomic_write_text(out / "per_class_iou.csv", per_class_csv(res)),
    }


def validate(
    model: gv.GroupViT,
    dataset,
    *,
    root=None,
    split: str = "val",
    n_images: int | None = None,
    settings: EvalSettings | None = None,
    distributed: bool = False,
) -> dict:
    """Per-epoch validation for a trainer or notebook: :func:`evaluate_zero_shot` in memory (no files, no
    progress bar) on ``dataset`` (a name of the four benchmarks with ``root``, or a dataset object: open it
    once and pass it every epoch), the first ``n_images`` of ``split``, the thesis protocol unless
    ``settings``. Returns the results dict: ``["miou"]`` (percent), ``["iou"]`` per class, ``["failed"]``.
    The model's train/eval mode is restored. ``distributed``: every rank calls it and the images are split."""
    return evaluate_zero_shot(
        model,
        dataset,
        None,
        settings,
        root=root,
        split=split,
        n_images=n_images,
        distributed=distributed,
        progress=False,
    )
