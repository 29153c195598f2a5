"""CutLER's training loop: the reference solver (SGD, warm-up + steps, AMP on CUDA, gradient clipping 1.0,
NaN losses skipped and counted), atomic checkpoints and an exact resume, torchrun DDP.

Each iteration reseeds the RNGs from ``(seed, iteration, rank)`` and the data stream restarts at
``iteration x batch``, so "N steps" and "N/2 steps, kill, resume" give the same weights; SyncBatchNorm
only when the world size is > 1.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from nbsupport.core import distributed
from nbsupport.core.config import config_from_dict, config_to_dict, write_config
from nbsupport.core.io import atomic_write_json
from nbsupport.training.common import (
    MetricsLog,
    StepLogger,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    warmup_multistep_lr,
)
from nbsupport.training.cutler.augment import augment_batch
from nbsupport.training.cutler.config import CutlerConfig, model_kwargs
from nbsupport.training.cutler.data import (
    GroupedStreamBatchSampler,
    PseudoMaskDataset,
    StreamSampler,
    aspect_groups,
    collate,
)
from nbsupport.training.cutler.model import build_model

# --------------------------------------------------------------------------------------------------
# Checkpoints


def lr_schedule(it: int, cfg: CutlerConfig) -> float:
    """The learning rate of iteration ``it``: linear warm-up from ``lr x warmup_factor`` over ``warmup_iters``,
    then x ``gamma`` at each of ``steps`` (detectron2's WarmupMultiStepLR)."""
    return warmup_multistep_lr(it, cfg.lr, cfg.steps, cfg.gamma, cfg.warmup_iters, cfg.warmup_factor)


#: What a checkpoint written before these fields existed was built with (torchvision's plain Mask R-CNN).
LEGACY_MODEL = {"head": "mask_rcnn", "fpn_norm": False, "aligned_roi": False}


def load_trained(path, device="cpu", **model_overrides):
    """A detector from a checkpoint written by :func:`train` (``checkpoint_last.pth`` or ``model_final.pth``),
    built with the checkpoint's own config (``model_overrides`` change build keywords, e.g.
    ``detections_per_img``); no backbone weights are loaded on top. A config without the ``head`` /
    ``fpn_norm`` / ``aligned_roi`` fields is an older run's: its model was the plain Mask R-CNN."""
    ck = load_checkpoint(path)
    stored = dict(ck.get("config") or {})
    for k, v in LEGACY_MODEL.items():
        stored.setdefault(k, v)
    conf = config_from_dict(CutlerConfig, stored, f"checkpoint {path}")
    kw = model_kwargs(conf)
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


def loss_record(loss, losses: dict, grad_norm) -> dict:
    """The logged numbers of a step: ``loss``, every term of ``losses``, ``grad_norm``, and for a cascade the
    sums over its stages (``loss_classifier`` = the ``loss_classifier_stage<k>`` summed, same for
    ``loss_box_reg``), so plots read the same keys for either head. One device-to-host copy."""
    names = list(losses)
    vals = torch.stack([loss.detach(), *(losses[k].detach() for k in names), grad_norm.detach()]).float().tolist()
    out = {"loss": vals[0], **dict(zip(names, vals[1:-1])), "grad_norm": vals[-1]}
    for k in names:
        base, sep, stage = k.rpartition("_stage")
        if sep and stage.isdigit():
            out[base] = out.get(base, 0.0) + out[k]
    return out


def _param_groups(model, cfg):
    norm, other = [], []
    for m in model.modules():
        is_norm = isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                (norm if is_norm else other).append(p)
    return [
        {"params": other, "weight_decay": cfg.weight_decay},
        {"params": norm, "weight_decay": cfg.weight_decay_norm},
    ]


def train(
    cfg: CutlerConfig,
    out_dir,
    resume: bool = False,
    init=None,
    stop_after: int | None = None,
    progress: bool = True,
    dataset=None,
) -> dict:
    """Train a CutLER detector; returns a summary dict (also in ``out_dir/summary.json``).

    ``cfg``: a :class:`CutlerConfig` (:func:`load_config`; needs ``train_json``, or pass ``dataset``).
    ``init``: detector checkpoint to start from (self-training). ``resume``: continue from
    ``out_dir/checkpoint_last.pth`` (same data order and RNG streams; the metrics log is cut back to the
    checkpoint). ``stop_after``: leave after that iteration as if killed (tests). Writes ``config.yaml``,
    ``metrics.jsonl`` (one record per ``log_period``), ``checkpoint_last.pth`` every ``checkpoint_period`` and
    ``model_final.pth`` (both hold the config, so :func:`load_trained` rebuilds the model).
    """
    if not isinstance(cfg, CutlerConfig):
        raise TypeError(f"cfg must be a CutlerConfig (cutler.load_config(...)), got {type(cfg).__name__}")
    ctx = distributed.setup(cfg.device)
    rank, world, device = ctx.rank, ctx.world, ctx.device
    out = Path(out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    seed_everything(seed)
    if dataset is None:
        if not cfg.train_json:
            raise ValueError("config has no train_json (the MaskCut / pseudo-label COCO JSON to train on)")
        dataset = PseudoMaskDataset(cfg.train_json, cfg.image_root, train=True)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
    per_rank = cfg.batch_size // world

    model = build_model(**model_kwargs(cfg))
    if init is not None:
        ck = load_checkpoint(init)
        model.load_state_dict(ck["model"] if "model" in ck else ck)
    if world > 1 and device.type == "cuda":  # SyncBN only when there is more than one process (and GPUs)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and ctx.is_main:
        warnings.warn(
            "multi-process CPU run (gloo): SyncBatchNorm needs CUDA, BatchNorm statistics stay per process",
            RuntimeWarning,
        )
    model.to(device)
    opt = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    use_amp = bool(cfg.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start, nan_skipped, empty_batches = 0, 0, 0
    ck_path = out / "checkpoint_last.pth"
    metrics = MetricsLog(out, enabled=ctx.is_main)
    if resume and ck_path.is_file():
        ck = load_checkpoint(ck_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if use_amp and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start, nan_skipped, empty_batches = (
            int(ck["iteration"]),
            int(ck["nan_skipped"]),
            int(ck.get("empty_batches", 0)),
        )
        metrics.start(resume_keep=lambda r: r.get("iter", 0) <= start)
    else:
        metrics.start(resume_keep=None)
    if ctx.is_main:
        write_config(cfg, out)
    stored = config_to_dict(cfg)
    ddp = distributed.wrap_ddp(model, ctx)

    workers = int(cfg.num_workers)
    common = dict(  # workers decode ahead of the step (prefetch) and pinned batches copy asynchronously
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=int(cfg.prefetch_factor) if workers > 0 else None,
    )
    groups = aspect_groups(dataset) if cfg.aspect_grouping and hasattr(dataset, "records") else None
    if groups is not None and len(set(groups)) > 1:  # landscape and portrait batches (detectron2's default)
        batches = GroupedStreamBatchSampler(
            StreamSampler(len(dataset), seed, rank, world), groups, per_rank, skip=start
        )
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    else:
        sampler = StreamSampler(len(dataset), seed, rank, world, start=start * per_rank)
        loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler, **common)
    max_iter = int(cfg.max_iter)
    logger = StepLogger(
        metrics,
        max_iter,
        start,
        log_every=int(cfg.log_period),
        always=(max_iter,),
        desc="cutler",
        unit="it",
        show=progress,
        main=ctx.is_main,
    )
    ddp.train()
    it = start
    data_iter = iter(loader)
    try:
        while it < max_iter:
            t0 = time.perf_counter()
            images, targets = next(data_iter)
            t_data = time.perf_counter() - t0
            step_seed = (seed * 1_000_003 + it) * 64 + rank
            torch.manual_seed(step_seed)
            gen = torch.Generator().manual_seed(step_seed)
            lr = lr_schedule(it, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            record, n_images = None, 0
            if not distributed.all_true(len(images) > 0, device):
                empty_batches += 1  # every image of the batch unreadable: skip (counted)
            else:
                images, targets = _to_device(images, targets, device)
                images, targets = augment_batch(
                    images,
                    targets,
                    gen,
                    cfg.flip,
                    cfg.copy_paste,
                    tuple(cfg.copy_paste_scale),
                    cfg.copy_paste_max_cover,
                )
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    losses = ddp(images, targets)
                loss = sum(losses.values())
                if not distributed.all_true(bool(torch.isfinite(loss)), device):
                    nan_skipped += 1
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(opt)
                    scaler.update()
                    n_images = len(images) * world
                    if logger.due(it + 1):  # one device-to-host copy, only on logged steps
                        record = loss_record(loss, losses, gnorm)
            it += 1
            if record is not None:
                record = {"iter": it, "lr": lr, **record, "data_time": t_data}
                record.update(nan_skipped=nan_skipped, empty_batches=empty_batches)
                logger.step(it, n_images, record, loss=record["loss"], lr=lr)
            else:
                logger.step(it, n_images, None, nan_skipped=nan_skipped)
            if ctx.is_main and (it % int(cfg.checkpoint_period) == 0 or it == max_iter):
                save_checkpoint(
                    ck_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict() if use_amp else {},
                        "iteration": it,
                        "nan_skipped": nan_skipped,
                        "empty_batches": empty_batches,
                        "config": stored,
                    },
                )
            if stop_after is not None and it >= stop_after:
                return {"iteration": it, "stopped": True}
    finally:
        logger.close()
    summary = {
        "iteration": it,
        "nan_skipped": nan_skipped,
        "empty_batches": empty_batches,
        "world_size": world,
        "device": str(device),
        "amp": use_amp,
        "problems": dict(getattr(dataset, "problems", {})),
    }
    if ctx.is_main:
        save_checkpoint(out / "model_final.pth", {"model": model.state_dict(), "config": stored, "iteration": it})
        if not cfg.keep_checkpoint:  # finished: the resumable checkpoint is no longer needed
            ck_path.unlink(missing_ok=True)
        atomic_write_json(out / "summary.json", summary, indent=1)
    return summary
