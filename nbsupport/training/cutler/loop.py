"""CutLER's training loop: the reference solver (SGD, warm-up + steps, AMP on CUDA, gradient clipping 1.0,
NaN losses skipped and counted), atomic checkpoints and an exact resume, torchrun DDP.

Each iteration reseeds the RNGs from ``(seed, iteration, rank)`` and the data stream restarts at
``iteration x batch``, so "N steps" and "N/2 steps, kill, resume" give the same weights; SyncBatchNorm
only when the world size is > 1.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch

from nbsupport.training.cutler.augment import augment_batch
from nbsupport.training.cutler.config import DEFAULTS, _model_kwargs
from nbsupport.training.cutler.data import (
    GroupedStreamBatchSampler,
    PseudoMaskDataset,
    StreamSampler,
    aspect_groups,
    collate,
)
from nbsupport.training.cutler.model import build_model

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
    model = build_model(**kw)
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Training


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def _param_groups(model, cfg):
    norm, other = [], []
    for m in model.modules():
        is_norm = isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                (norm if is_norm else other).append(p)
    return [
        {"params": other, "weight_decay": cfg["weight_decay"]},
        {"params": norm, "weight_decay": cfg["weight_decay_norm"]},
    ]


def train(
    cfg: dict,
    out_dir,
    resume: bool = False,
    init=None,
    stop_after: int | None = None,
    progress: bool = True,
    dataset=None,
) -> dict:
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
        dataset = PseudoMaskDataset(cfg["train_json"], cfg.get("image_root"), train=True)
    if cfg["batch_size"] % world:
        raise ValueError(f"batch_size {cfg['batch_size']} is not divisible by the world size {world}")
    per_rank = cfg["batch_size"] // world

    model = build_model(**_model_kwargs(cfg))
    if init is not None:
        ck = torch.load(init, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"] if "model" in ck else ck)
    if world > 1 and device.type == "cuda":  # SyncBN only when there is more than one process (and GPUs)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and rank == 0:
        warnings.warn(
            "multi-process CPU run (gloo): SyncBatchNorm needs CUDA, BatchNorm statistics stay per process",
            RuntimeWarning,
        )
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
        start, nan_skipped, empty_batches = (
            int(ck["iteration"]),
            int(ck["nan_skipped"]),
            int(ck.get("empty_batches", 0)),
        )
        if rank == 0:
            _truncate_metrics(log_path, start)
    elif rank == 0 and log_path.exists():
        log_path.unlink()
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    common = dict(
        collate_fn=collate,
        num_workers=int(cfg["num_workers"]),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    groups = aspect_groups(dataset) if cfg["aspect_grouping"] and hasattr(dataset, "records") else None
    if groups is not None and len(set(groups)) > 1:  # landscape and portrait batches (detectron2's default)
        batches = GroupedStreamBatchSampler(
            StreamSampler(len(dataset), seed, rank, world), groups, per_rank, skip=start
        )
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    else:
        sampler = StreamSampler(len(dataset), seed, rank, world, start=start * per_rank)
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
                images, targets = augment_batch(
                    images,
                    targets,
                    gen,
                    cfg["flip"],
                    cfg["copy_paste"],
                    tuple(cfg["copy_paste_scale"]),
                    cfg["copy_paste_max_cover"],
                )
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
                    record = {
                        "loss": float(loss.detach()),
                        **{k: float(v.detach()) for k, v in losses.items()},
                        "grad_norm": float(gnorm),
                    }
            it += 1
            if rank == 0 and (it % int(cfg["log_period"]) == 0 or it == max_iter) and record is not None:
                now = time.perf_counter()
                rec = {
                    "iter": it,
                    "lr": lr,
                    **record,
                    "data_time": t_data,
                    "images_per_s": imgs_since / max(now - t_last, 1e-9),
                    "nan_skipped": nan_skipped,
                    "empty_batches": empty_batches,
                }
                t_last, imgs_since = now, 0
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
            if bar is not None:
                bar.update(1)
            if rank == 0 and (it % int(cfg["checkpoint_period"]) == 0 or it == max_iter):
                save_atomic(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict() if use_amp else {},
                        "iteration": it,
                        "nan_skipped": nan_skipped,
                        "empty_batches": empty_batches,
                        "config": _plain(cfg),
                    },
                    ck_path,
                )
            if stop_after is not None and it >= stop_after:
                return {"iteration": it, "stopped": True}
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    summary = {
        "iteration": it,
        "nan_skipped": nan_skipped,
        "empty_batches": empty_batches,
        "world_size": world,
        "device": str(device),
        "amp": use_amp,
        "problems": dict(getattr(dataset, "problems", {})),
    }
    if rank == 0:
        save_atomic({"model": model.state_dict(), "config": _plain(cfg), "iteration": it}, out / "model_final.pth")
        if not cfg.get("keep_checkpoint", True):  # finished: the resumable checkpoint is no longer needed
            ck_path.unlink(missing_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
