"""The GroupViT training loop: labels from captions, every loss of the run, AdamW with warm-up and cosine,
AMP, torchrun DDP with all-gathered embeddings, atomic checkpoints and resume, per-epoch validation (the
synthetic world, real benchmarks by ``val_datasets``, or any ``validate=`` callable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis.zero_shot import zero_shot_miou
from nbsupport.core import distributed
from nbsupport.core.config import write_config
from nbsupport.core.distributed import all_gather, all_gather_objects
from nbsupport.data import caption_labels as textmod
from nbsupport.data.captions import CaptionImages, _collate
from nbsupport.data.scenes import synthetic_captions, synthetic_class_names, synthetic_scenes
from nbsupport.models import groupvit as gv
from nbsupport.training.common import (
    MetricsLog,
    StepLogger,
    decay_param_groups,
    load_checkpoint,
    model_state,
    save_checkpoint,
    seed_everything,
    warmup_cosine_lr,
)
from nbsupport.training.groupvit.architecture import prepare_model
from nbsupport.training.groupvit.augment import augment_batch, step_generator
from nbsupport.training.groupvit.components import init_like, set_trainable
from nbsupport.training.groupvit.config import TrainConfig
from nbsupport.training.groupvit.losses import (
    affinity_logits,
    dino_distillation_loss,
    dino_similarity,
    ge_loss,
    group_balance_loss,
    group_label_contrastive,
    image_text_contrastive,
    le_loss,
    multi_label_contrastive,
    se_loss,
)
from nbsupport.training.groupvit.validation import val_record, validation_from_config

log = logging.getLogger(__name__)


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` (thesis 5.3): linear warm-up from ``warmup_lr`` over ``warmup_epochs``,
    then cosine annealing to ``min_lr`` in ``cycles`` cycles. ``decay_epochs`` 0: the cycles share the
    epochs after the warm-up (:func:`~nbsupport.training.common.warmup_cosine_lr`); > 0: each cycle lasts
    ``decay_epochs``, counted from step 0 as GroupViT's timm ``CosineLRScheduler(t_initial, cycle_limit,
    warmup_t)`` counts (the warm-up is the start of the first cycle), and ``min_lr`` after the last."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if not cfg.decay_epochs:
        return warmup_cosine_lr(step, total, warm, cfg.lr, cfg.min_lr, cfg.warmup_lr, cfg.cycles)
    if step < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, warm)
    period = max(1, int(round(cfg.decay_epochs * steps_per_epoch)))
    cycle, t = divmod(step, period)
    if cycle >= cfg.cycles:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / period))


class LabelSampler:
    """Per-caption labels (:func:`nbsupport.data.caption_labels.extract_labels`) with the caption's candidate pool cached."""

    def __init__(self, cfg: TrainConfig, vocabulary=None, seed: int = 0):
        self.cfg, self.vocab = cfg, vocabulary
        self.tagger = textmod.get_tagger(cfg.tagger)
        self.rng = random.Random(seed)
        self._pools: dict[str, list[str]] = {}

    def __call__(self, caption: str) -> textmod.Labels:
        pool = self._pools.get(caption)
        if pool is None:
            pool = self._pools[caption] = textmod.candidates(caption, self.cfg.label_kind, self.tagger)
        return textmod.labels_from_candidates(
            caption, pool, self.cfg.num_labels, self.cfg.pad, textmod.TEMPLATES, self.rng, self.vocab
        )


def compute_losses(
    model: gv.GroupViT,
    images: torch.Tensor,
    captions: list[str],
    labels: list | None,
    cfg: TrainConfig,
    dino: dict | None = None,
) -> dict[str, torch.Tensor]:
    """One forward pass and every loss of the run (weights from ``cfg``): ``{"loss", "itc", "mlc", "ge",
    "le", "se", "dino"}`` (only the active terms). ``labels``: one :class:`nbsupport.data.caption_labels.Labels` per image."""
    core = model.module if hasattr(model, "module") else model
    tok = gv.tokenizer()
    dev = images.device
    L = cfg.context_length
    out = core.encode_image(images)
    cap = core.encode_text(tok(captions, context_length=L).to(dev))
    img_all, cap_all = all_gather(out.image_embeds), all_gather(cap)
    losses = {"itc": image_text_contrastive(img_all, cap_all, core.scale)}

    lab = pad = None
    if labels is not None and cfg.num_labels > 0:
        b, k = len(labels), cfg.num_labels
        pad = torch.tensor([l.pad for l in labels], dtype=torch.bool, device=dev)
        flat = [p for l in labels for p in l.prompts]
        real = [p for p, m in zip(flat, pad.reshape(-1).tolist()) if not m]
        lab = torch.zeros(b * k, core.cfg.proj_dim, device=dev, dtype=out.image_embeds.dtype)
        if real:
            z = core.encode_text(tok(real, context_length=L).to(dev))
            lab = lab.index_put((torch.nonzero(~pad.reshape(-1))[:, 0],), z.to(lab.dtype))
        lab = lab.reshape(b, k, -1)
        ml_scale = core.multi_label_logit_scale.exp().clamp(max=100)
        pool, strings = label_pool(cfg, [l.raw for l in labels])
        if cfg.w_multi_label:
            losses["mlc"] = cfg.w_multi_label * multi_label_contrastive(
                pool(out.image_embeds), pool(lab), ml_scale, pool(pad), strings
            )
        if cfg.w_group_label:
            losses["glc"] = cfg.w_group_label * group_label_contrastive(
                pool(out.group_embeds), pool(lab), ml_scale, pool(pad), strings
            )
    if cfg.w_ge:
        losses["ge"] = cfg.w_ge * ge_loss(out.attn)
    if cfg.w_balance:
        losses["balance"] = cfg.w_balance * group_balance_loss(out.soft)
    if (cfg.w_le or cfg.w_se) and lab is not None:
        a_st = affinity_logits(out.group_embeds, lab, core.scale if cfg.a_st_scale == "logit_scale" else 1.0)
        if cfg.w_le:
            losses["le"] = cfg.w_le * le_loss(out.attn, a_st, pad)
        if cfg.w_se:
            losses["se"] = cfg.w_se * se_loss(a_st, pad)
    if cfg.w_dino and dino is not None:
        from nbsupport.models import features

        with torch.no_grad():
            f = features.extract(dino["model"], images, cfg.dino_facet, dino["layer"])  # [B, h, w, D]
            if tuple(f.shape[1:3]) != tuple(out.grid):
                f = F.interpolate(f.permute(0, 3, 1, 2), size=out.grid, mode="bilinear", align_corners=False).permute(
                    0, 2, 3, 1
                )
            rownorm = cfg.dino_variant == "rownorm"
            sim = dino_similarity(f, center=rownorm)
        losses["dino"] = cfg.w_dino * dino_distillation_loss(
            out.attn, sim, cfg.dino_temperature, cfg.dino_reduction, row_normalize=rownorm
        )
    losses["loss"] = sum(losses.values())
    return losses


def label_pool(cfg: TrainConfig, raw: list) -> tuple:
    """The batch the multi-label losses compare against: ``(pool, strings)`` with ``pool`` applied to each
    tensor (``all_gather``: the global batch, as GroupViT; identity: this process's mini-batch) and the label
    strings of the non-noisy loss (None without ``cfg.non_noisy``). Thesis 5.10 compares the strings within
    each process's mini-batch, so that no strings or embeddings cross processes (``non_noisy_pool: local``);
    ``global`` gathers both."""
    if not cfg.non_noisy:
        return all_gather, None
    if cfg.non_noisy_pool == "local":
        return (lambda x: x), list(raw)
    return all_gather, [x for part in all_gather_objects(list(raw)) for x in part]


class _LossModule(torch.nn.Module):
    """``forward(images, captions, labels) -> losses`` around the model, so DDP wraps the whole loss step."""

    def __init__(self, model, cfg, dino):
        super().__init__()
        self.model, self.cfg, self.dino = model, cfg, dino

    def forward(self, images, captions, labels):
        return compute_losses(self.model, images, captions, labels, self.cfg, self.dino)


def export_safetensors(model, path, description: str = "") -> Path:
    """The model's weights as ``.safetensors`` (loadable by :func:`nbsupport.models.groupvit.load`)."""
    from safetensors.torch import save_file

    core = model.module if hasattr(model, "module") else model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()},
        str(path),
        metadata={"description": description} if description else None,
    )
    return path


def train(cfg: TrainConfig, model: gv.GroupViT | None = None, progress=None, validate=None) -> dict:
    """Train / fine-tune a GroupViT (see the module docstring); returns ``{"model", "out_dir", "history",
    "val"}``. Under ``torchrun`` each process trains on its shard; rank 0 writes ``out_dir``: ``last.pt``
    (atomic, resumed when ``cfg.resume``), ``metrics.jsonl`` (cut back to the checkpoint on resume),
    ``config.yaml``, ``final.safetensors``.

    ``model``: the starting weights (default ``groupvit.load(cfg.model)``), prepared by
    :func:`~nbsupport.training.groupvit.architecture.prepare_model`. Rank 0 validates after every
    ``cfg.val_every``-th epoch and after the last: ``validate(model) -> {"miou", ...}`` when given (its
    ``name``, if any, is recorded as ``"data"``), else what ``cfg`` names
    (:func:`~nbsupport.training.groupvit.validation.validation_from_config`: ``val_datasets`` by GroupViT's
    protocol, or ``val_images`` synthetic scenes)."""
    cfg.validate()
    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ctx = distributed.setup(cfg.device)
    world, rank, dev, main = ctx.world, ctx.rank, ctx.device, ctx.is_main
    seed_everything(cfg.seed, rank)
    out_dir = Path(cfg.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out_dir)

    # data
    if cfg.data == "synthetic":
        ann = synthetic_captions(
            cfg.n_train,
            cfg.seed,
            cfg.image_size,
            "train",
            (cfg.min_objects, cfg.max_objects),
            (cfg.min_object_scale, cfg.max_object_scale),
        )
        ds = CaptionImages(ann, None, cfg.image_size, preload=True, augment=cfg.augment)
    else:
        ds = CaptionImages(cfg.data, cfg.image_root or None, cfg.image_size, preload=False, augment=cfg.augment)
    sampler = (
        torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
        if world > 1
        else None
    )
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        ds,
        cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        collate_fn=_collate,
        num_workers=cfg.num_workers,
        generator=g,
    )
    if len(loader) == 0:
        raise ValueError(f"{len(ds)} training images < batch_size {cfg.batch_size}")
    vocab = None
    if cfg.min_label_count > 0:
        freq = textmod.label_frequencies((c for cs in ds.captions for c in cs), cfg.label_kind, cfg.tagger)
        vocab = textmod.curated_vocabulary(freq, cfg.min_label_count)
    labeler = LabelSampler(cfg, vocab, cfg.seed + rank)
    if main:
        log.info("groupvit-train: tagger %s, %d images, %d steps/epoch", labeler.tagger.name, len(ds), len(loader))

    # model, optimiser
    ckpt = out_dir / "last.pt"
    resuming = cfg.resume and ckpt.is_file()
    model = prepare_model(cfg, model, resuming)  # a resumed run loads its own weights below
    model = model.to(dev).train()
    trainable = set_trainable(model, cfg.trainable)
    opt = torch.optim.AdamW(
        decay_param_groups(model.named_parameters(), cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    dino = None
    if cfg.w_dino:
        from nbsupport.models import backbones

        dino = {"model": backbones.load(cfg.dino_backbone, device=dev), "layer": cfg.dino_layer}
    steps_per_epoch, step, start_epoch = len(loader), 0, 0
    total = cfg.epochs * steps_per_epoch
    metrics = MetricsLog(out_dir, enabled=main)
    if resuming:
        st = load_checkpoint(ckpt)
        model.load_state_dict(st["model"])
        if st.get("optimizer"):
            opt.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        step, start_epoch = int(st["step"]), int(st["epoch"])
        metrics.start(resume_keep=lambda r, s=step: r.get("step", 0) <= s)
        if main:
            log.info("groupvit-train: resumed from %s at epoch %d step %d", ckpt, start_epoch, step)
    else:
        metrics.start(resume_keep=None)
    # the forward must go through DDP for its gradient all-reduce
    net = distributed.wrap_ddp(_LossModule(model, cfg, dino), ctx, find_unused_parameters=True)
    if validate is None and main:
        validate = validation_from_config(cfg)
    val_name = getattr(validate, "name", "") or ""
    history, val = [], None
    stop = False
    logger = StepLogger(metrics, total, step, cfg.log_every, always=(1,), desc="groupvit", main=main)
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        g.manual_seed(cfg.seed + epoch)
        model.train()
        for images, caps in loader:
            lr = lr_at(step, steps_per_epoch, cfg)
            for grp in opt.param_groups:
                grp["lr"] = lr
            captions = [labeler.rng.choice(c) for c in caps]
            labels = [labeler(c) for c in captions] if cfg.num_labels > 0 else None
            images = images.to(dev, non_blocking=True)
            if cfg.color_jitter or cfg.random_erase:  # thesis 4.3
                images = augment_batch(
                    images, cfg.color_jitter, cfg.random_erase, step_generator(cfg.seed, step, rank, dev)
                )
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                losses = net(images, captions, labels)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(losses["loss"]).backward()
                scaler.unscale_(opt)
            else:
                losses["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            step += 1
            rec = None
            if logger.due(step):
                rec = {
                    "type": "train",
                    "epoch": epoch,
                    "step": step,
                    "lr": lr,
                    "grad_norm": float(gnorm),
                    "minutes": (time.time() - t0) / 60,
                    **{k: float(v.detach()) for k, v in losses.items()},
                }
            rec = logger.step(step, len(images) * world, rec, loss=float(losses["loss"].detach()))
            if rec is not None:
                history.append(rec)
                if progress:
                    progress(rec)
            if cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes:
                stop = True
                break
        done_epoch = epoch + (0 if stop else 1)
        if main:
            save_checkpoint(
                ckpt,
                {
                    "model": model_state(model),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "epoch": done_epoch,
                    "step": step,
                    "config": json.dumps(dataclasses.asdict(cfg)),
                },
            )
            due = done_epoch % cfg.val_every == 0 or done_epoch >= cfg.epochs or stop
            if validate is not None and due:
                val = val_record(validate(model), done_epoch, step, t0, val_name)
                metrics.append(val)
                history.append(val)
                if progress:
                    progress(val)
        if stop:
            if main:
                log.info("groupvit-train: max_minutes %.1f reached at step %d", cfg.max_minutes, step)
            break
    logger.close()
    model.eval()
    if main:
        export_safetensors(model, out_dir / "final.safetensors", f"groupvit-train {cfg.model} {cfg.data}")
    return {"model": model, "out_dir": out_dir, "history": history, "val": val, "trainable": trainable}


def beats_floors(model, cfg: TrainConfig, margin: float = 5.0, n_images: int = 200) -> tuple[bool, str]:
    """Whether ``model``'s zero-shot mIoU on ``n_images`` synthetic validation scenes beats a random init of the
    same architecture (seeds 0-2) and the all-background prediction by ``margin`` points; and the numbers."""
    from nbsupport.analysis import metrics

    imgs, sem = synthetic_scenes(n_images, 0, cfg.val_size)
    names, bgs = synthetic_class_names(cfg.val_class_names)
    core = model.module if hasattr(model, "module") else model
    trained = zero_shot_miou(core, imgs, sem, names, bgs)["miou"]
    rand = max(zero_shot_miou(init_like(core, s), imgs, sem, names, bgs)["miou"] for s in range(3))
    bg = metrics.miou(metrics.confusion_matrix(np.zeros_like(sem.numpy()), sem.numpy(), len(names) + 1))
    floor = max(rand, bg)
    return trained > floor + margin, f"(mIoU {trained:.2f}; best random init {rand:.2f}, all-background {bg:.2f})"
