"""The DINO training loop: networks, schedules, checkpoints with exact resume, torchrun DDP, metrics log,
export of the teacher backbone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nbsupport.core import distributed
from nbsupport.core.config import config_from_dict, write_config
from nbsupport.models import backbones
from nbsupport.training.common import (
    MetricsLog,
    StepLogger,
    cosine_schedule,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from nbsupport.training.dino.config import Config, resolve_arch
from nbsupport.training.dino.crops import CropBatches, MultiCrop
from nbsupport.training.dino.losses import DensePatchLoss, DINOLoss, koleo_loss
from nbsupport.training.dino.model import DINOHead, Network, ema_update


def schedules(cfg: Config, world: int = 1) -> dict[str, np.ndarray]:
    """Per-step values ``[steps]``: ``lr`` (linear warm-up to ``lr * batch * world / 256``, cosine to
    ``min_lr``), ``wd`` (cosine ``weight_decay -> weight_decay_end``), ``momentum`` (cosine
    ``momentum -> 1``) and ``teacher_temp`` (linear ``warmup_teacher_temp -> teacher_temp`` over
    ``warmup_teacher_steps``, then constant)."""
    n = cfg.steps
    wt = min(cfg.warmup_teacher_steps, n)
    temp = np.concatenate(
        [np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, wt), np.full(n - wt, cfg.teacher_temp)]
    )
    return {
        "lr": cosine_schedule(cfg.lr * cfg.batch_size * world / 256, cfg.min_lr, n, cfg.warmup_steps),
        "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, n),
        "momentum": cosine_schedule(cfg.momentum, 1.0, n),
        "teacher_temp": temp,
    }


def _arch(cfg: Config) -> backbones.Arch:
    return backbones.Arch(cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, img_size=cfg.image_size)


def build_networks(cfg: Config):
    """Seeded student and teacher (same initial weights; teacher frozen) and the backbone ``Arch``."""
    arch = _arch(cfg)

    def net():
        head = DINOHead(cfg.embed_dim, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck)
        return Network(backbones.build(arch), head, mask_token=cfg.mask_ratio > 0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        student = net()
        teacher = net()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, arch


def _save_backbone(bb: nn.Module, cfg: Config, path: Path, step: int, description: str) -> Path:
    bb.nbs_info = {"num_heads": cfg.num_heads}
    try:
        skip = ("out", "device", "workers", "max_minutes")
        recipe = json.dumps({k: v for k, v in asdict(cfg).items() if k not in skip})
        return backbones.save_safetensors(bb, path, description=description, steps=str(step), recipe=recipe)
    finally:
        del bb.nbs_info


def train(cfg: Config, resume: bool = True, log=print) -> dict:
    """Train (or continue) a DINO run in ``cfg.out``; returns the last metrics row.

    ``cfg.max_steps`` / ``cfg.max_minutes`` stop early (tests, a wall-clock-bounded session) without changing
    the schedules, which always span ``cfg.steps``; a checkpoint is written at the stop. Writes
    ``checkpoint.pth`` (atomic), ``metrics.jsonl`` (one row per step; cut back to the checkpoint on resume)
    and ``config.yaml``. Under ``torchrun`` the student is wrapped in DDP and rank 0 writes."""
    cfg = resolve_arch(cfg)
    ctx = distributed.setup(cfg.device)
    rank, world, device = ctx.rank, ctx.world, ctx.device
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    student, teacher, arch = build_networks(cfg)
    student.to(device), teacher.to(device)
    dense = cfg.dense_weight > 0
    loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.n_local, cfg.student_temp, cfg.center_momentum, cfg.centering).to(device)
    dense_fn = DensePatchLoss(
        cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering, cfg.dense_image_center
    ).to(device)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]

    def no_wd(n, p):
        return p.ndim <= 1 or any(k in n for k in ("pos_embed", "cls_token", "mask_token"))

    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not no_wd(n, p)]},
            {"params": [p for n, p in named if no_wd(n, p)], "weight_decay": 0.0},
        ]
    )
    sch = schedules(cfg, world)
    step = 0
    ckpt = out / "checkpoint.pth"
    metrics = MetricsLog(out, enabled=ctx.is_main)
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
        if "dense_loss" in state:
            dense_fn.load_state_dict(state["dense_loss"])
        step = int(state["step"])
        metrics.start(resume_keep=lambda r, s=step: r.get("step", 0) <= s)
        log(f"resumed from {ckpt} at step {step}")
    else:
        metrics.start(resume_keep=None)  # a fresh run starts a fresh log
    if ctx.is_main:
        write_config(cfg, out)
    model = distributed.wrap_ddp(student, ctx)
    files = None
    if cfg.data != "synthetic":
        from nbsupport.data.images import list_images

        files = list_images(cfg.data)
    data = crop_stream(cfg, start_batch=step, rank=rank, world=world, files=files)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda"
    )
    stop = min(cfg.steps, cfg.max_steps or cfg.steps)
    deadline = time.time() + 60 * cfg.max_minutes if cfg.max_minutes else None
    bar = StepLogger(metrics, stop, step, log_every=1, desc="dino", unit="step", main=ctx.is_main)

    def save():
        if ctx.is_main:
            save_checkpoint(
                ckpt,
                {
                    "student": student.state_dict(),
                    "teacher": teacher.state_dict(),
                    "optimizer": opt.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "dense_loss": dense_fn.state_dict(),
                    "step": step,
                    "config": json.dumps(asdict(cfg)),
                },
            )

    last, saved_at = {}, step
    t0 = time.time()
    it = iter(loader)
    try:
        while step < stop:
            crops, boxes, masks = next(it)
            crops = [c.to(device, non_blocking=True) for c in crops]
            boxes = [b.to(device) for b in boxes]
            s_masks = [m.to(device) for m in masks] + [None] * cfg.n_local if cfg.mask_ratio > 0 else None
            for i, g in enumerate(opt.param_groups):
                g["lr"] = float(sch["lr"][step])
                if i == 0:
                    g["weight_decay"] = float(sch["wd"][step])
            temp = float(sch["teacher_temp"][step])
            with torch.autocast(device.type, enabled=device.type == "cuda", dtype=torch.bfloat16):
                with torch.no_grad():
                    t_cls, t_patch = teacher(crops[:2], dense=dense)
                s_cls, s_patch, s_feat = model(crops, s_masks, dense=dense, features=True)
            with torch.no_grad():
                q = loss_fn.targets(t_cls.float(), temp)
                t_ent = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())  # ~ln K: uniform collapse
                qm = q.mean(0)
                t_marg = float(-(qm * qm.clamp_min(1e-12).log()).sum())  # ~0: one-prototype collapse
            cls_loss = loss_fn(s_cls.float(), t_cls.float(), temp, targets=q)
            loss, d_loss = cfg.cls_weight * cls_loss, torch.zeros(())  # (0 x keeps DDP's graph complete)
            if dense:
                d_loss = dense_fn([p.float() for p in s_patch], [p.float() for p in t_patch], boxes, temp, s_masks)
                loss = loss + cfg.dense_weight * d_loss
            k_loss = torch.zeros(())
            if cfg.koleo_weight > 0:
                B = crops[0].shape[0]
                k_loss = sum(koleo_loss(s_feat[v * B : (v + 1) * B]) for v in range(2)) / 2
                loss = loss + cfg.koleo_weight * k_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step < cfg.freeze_last_layer_steps:
                for p in student.head.last_layer.parameters():
                    p.grad = None
            gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            opt.step()
            ema_update(teacher, student, float(sch["momentum"][step]))
            step += 1
            row = {
                "step": step,
                "loss": loss.item(),
                "cls_loss": cls_loss.item(),
                "dense_loss": d_loss.item(),
                "koleo_loss": k_loss.item(),
                "teacher_entropy": t_ent,
                "teacher_marginal_entropy": t_marg,
                # what the CLS targets say about the image (mutual information, nats): 0 = either collapse
                "teacher_mi": t_marg - t_ent,
                "lr": float(sch["lr"][step - 1]),
                "momentum": float(sch["momentum"][step - 1]),
                "teacher_temp": temp,
                "grad_norm": float(gnorm),
                "elapsed_s": time.time() - t0,
            }
            last = bar.step(step, cfg.batch_size * world, row, loss=row["loss"]) or row
            if step % cfg.checkpoint_every == 0:
                save()
                saved_at = step
            if ctx.is_main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
                _save_backbone(
                    teacher.backbone,
                    cfg,
                    out / "snapshots" / f"teacher_{step:06d}.safetensors",
                    step,
                    f"DINO teacher at step {step}",
                )
            if deadline and time.time() > deadline:
                log(f"time budget of {cfg.max_minutes} min reached at step {step}")
                break
    finally:
        if saved_at != step:
            save()
        bar.close()
    return last


def export_teacher(ckpt: str | Path, out: str | Path, description: str = "tiny DINO (synthetic world)") -> Path:
    """Write the teacher backbone of a checkpoint as fp32 safetensors (heads, step and the training recipe
    in the metadata), loadable by :func:`nbsupport.models.backbones.load`."""
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(Config, json.loads(state["config"]), f"checkpoint {ckpt}")
    model = backbones.build(_arch(cfg))
    sd = {k[len("backbone.") :]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    backbones.load_state(model, sd, str(ckpt))
    return _save_backbone(model, cfg, Path(out), int(state["step"]), description)


def crop_stream(cfg: Config, start_batch: int = 0, rank: int = 0, world: int = 1, files=None) -> CropBatches:
    """The multi-crop batches a run with ``cfg`` trains on: synthetic scenes rendered at ``scene_size``
    (``image_size`` when 0), or the image ``files``; global crops of ``image_size`` pixels cut at area scale
    ``[global_scale_min, global_scale_max]`` and resized, local crops of ``local_size``."""
    crop = MultiCrop(
        cfg.image_size,
        cfg.local_size,
        cfg.n_local,
        cfg.patch_size,
        (cfg.global_scale_min, cfg.global_scale_max),
        (cfg.local_scale_min, cfg.local_scale_max),
        cfg.color,
        cfg.mask_ratio,
        rotate=cfg.rotate,
    )
    scene = {"n_objects": (1, cfg.max_objects), "scale": (cfg.object_scale_min, cfg.object_scale_max)}
    return CropBatches(
        crop,
        cfg.batch_size,
        cfg.scene_size or cfg.image_size,
        cfg.seed,
        start_batch=start_batch,
        rank=rank,
        world=world,
        files=files,
        appearance=cfg.appearance,
        scene=scene,
        per_view_ramp=cfg.per_view_ramp,
    )
