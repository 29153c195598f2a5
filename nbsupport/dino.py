"""A compact DINO self-distillation trainer (thesis section 3.2, Eq 10-11) for timm ViTs of any size.

A student and a momentum teacher see different crops of the same image: 2 global crops go through the
teacher, all crops (global + local) through the student. Each network ends in a projection head with a
weight-normalised last layer producing ``K`` prototype scores. The loss is the cross-entropy between the
teacher's *centred and sharpened* distribution (temperature ``tau_t``, centre ``c`` an EMA of teacher
outputs) and the student's distribution (``tau_s``) over every pair of different views (Eq 11). The
teacher is an exponential moving average of the student (momentum cosine-scheduled to 1).

Runs on CPU (tests, the tiny offline model), one GPU (AMP) or several with ``torchrun`` (DDP; the centre
is averaged across processes). Data: the synthetic scene world rendered on the fly, or an image folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import backbones


# --------------------------------------------------------------------------------------------------
# Model parts


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer to ``out_dim`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 512, bottleneck: int = 128,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Network(nn.Module):
    """Backbone (CLS token after the final norm) + head; crops of different sizes run as separate groups."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        outs, i = [], 0
        while i < len(crops):  # group consecutive crops of the same resolution into one forward
            j = i
            while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
                j += 1
            outs.append(self.backbone(torch.cat(crops[i:j])))
            i = j
        return self.head(torch.cat(outs))


class DINOLoss(nn.Module):
    """Eq 11: cross-entropy between centred, sharpened teacher outputs and student outputs over all pairs
    of different views. ``center`` is an EMA (``center_momentum``) of the teacher's batch mean."""

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        s = (student_out / self.student_temp).chunk(self.n_crops)
        t = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, n = 0.0, 0
        for it, q in enumerate(t):
            for iv, p in enumerate(s):
                if iv == it:
                    continue  # the same view is never its own target
                total = total + torch.sum(-q * F.log_softmax(p, dim=-1), dim=-1).mean()
                n += 1
        self.update_center(teacher_out)
        return total / n

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        mean = teacher_out.mean(0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def cosine_schedule(base: float, final: float, steps: int, warmup_steps: int = 0, start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``start`` to ``base`` over ``warmup_steps``, then cosine from ``base`` to ``final``."""
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest, 1)))
    return np.concatenate([warm, cos])


# --------------------------------------------------------------------------------------------------
# Data


class MultiCrop:
    """DINO multi-crop on a uint8 image ``[H, W, 3]``: ``n_global`` crops (scale 0.4-1) and ``n_local``
    smaller crops (scale 0.05-0.4), flips and strong colour jitter (class is not colour in the world)."""

    def __init__(self, global_size: int = 64, local_size: int = 32, n_local: int = 4):
        from torchvision.transforms import v2

        from .data import IMAGENET_MEAN, IMAGENET_STD

        common = [v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.3, 0.2)], p=0.8),
                  v2.RandomGrayscale(0.2), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.glob = v2.Compose([v2.RandomResizedCrop(global_size, scale=(0.4, 1.0), antialias=True), *common])
        self.loc = v2.Compose([v2.RandomResizedCrop(local_size, scale=(0.05, 0.4), antialias=True), *common])
        self.n_local = n_local

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return [self.glob(t), self.glob(t)] + [self.loc(t) for _ in range(self.n_local)]


class SyntheticStream(torch.utils.data.IterableDataset):
    """Endless synthetic train-split scenes, scene ``i`` from seed ``(seed, train, i)``; resumable by
    ``start`` and split across data-loader workers and DDP ranks without overlap."""

    def __init__(self, transform, size: int = 64, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1):
        self.transform, self.size, self.seed, self.start, self.rank, self.world = transform, size, seed, start, rank, world

    def __iter__(self):
        from .data.synthetic import render_scene, scene_rng

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        i = self.start + self.rank * nw + wid
        while True:
            sc = render_scene(scene_rng(self.seed, "train", i), size=self.size)
            torch.manual_seed(hash((self.seed, i)) % (2 ** 31))
            yield self.transform(sc.image)
            i += self.world * nw


def collate_crops(batch):
    return [torch.stack([b[v] for b in batch]) for v in range(len(batch[0]))]


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class Config:
    out: str = "runs/dino"
    arch: str = "tiny"            # tiny | small (ViT-S/8) | base
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    image_size: int = 64          # global crop and scene size
    local_size: int = 32
    n_local: int = 4
    out_dim: int = 1024
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4              # for batch 256, scaled linearly
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.02
    warmup_teacher_steps: int = 100
    clip_grad: float = 3.0
    checkpoint_every: int = 200
    workers: int = 0
    seed: int = 0
    device: str = "auto"


ARCHS = {"small": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
         "base": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12)}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_networks(cfg: Config):
    arch = backbones.Arch(cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, img_size=cfg.image_size)
    torch.manual_seed(cfg.seed)
    student = Network(backbones.build(arch), DINOHead(cfg.embed_dim, cfg.out_dim))
    teacher = Network(backbones.build(arch), DINOHead(cfg.embed_dim, cfg.out_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, arch


def train(cfg: Config, resume: bool = True, log=print, max_steps: int | None = None) -> dict:
    """Train (or continue) a DINO run in ``cfg.out``; returns the last metrics. ``max_steps`` stops early
    (tests, or a wall-clock-bounded session) without changing the schedules."""
    from tqdm.auto import tqdm

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    student, teacher, arch = build_networks(cfg)
    student.to(device), teacher.to(device)
    n_crops = 2 + cfg.n_local
    loss_fn = DINOLoss(cfg.out_dim, n_crops).to(device)
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    lr = cosine_schedule(cfg.lr * cfg.batch_size * world / 256, cfg.min_lr, cfg.steps, cfg.warmup_steps)
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.steps)
    mom = cosine_schedule(cfg.momentum, 1.0, cfg.steps)
    temp = np.concatenate([np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_steps),
                           np.full(max(0, cfg.steps - cfg.warmup_teacher_steps), cfg.teacher_temp)])
    step = 0
    ckpt = out / "checkpoint.pth"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
        step = int(state["step"])
        log(f"resumed from {ckpt} at step {step}")
    model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) if ddp else student
    data = SyntheticStream(MultiCrop(cfg.image_size, cfg.local_size, cfg.n_local), cfg.image_size, cfg.seed,
                           start=step * cfg.batch_size * world, rank=rank, world=world)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         collate_fn=collate_crops)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    stop = min(cfg.steps, max_steps if max_steps is not None else cfg.steps)
    bar = tqdm(total=stop, initial=step, desc="dino", unit="step", disable=rank != 0)
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None
    last = {}
    t0 = time.time()
    it = iter(loader)
    while step < stop:
        crops = [c.to(device, non_blocking=True) for c in next(it)]
        for i, g in enumerate(opt.param_groups):
            g["lr"] = float(lr[step])
            if i == 0:
                g["weight_decay"] = float(wd[step])
        with torch.autocast(device.type, enabled=device.type == "cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                t_out = teacher(crops[:2])
            s_out = model(crops)
            loss = loss_fn(s_out.float(), t_out.float(), float(temp[step]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        scaler.step(opt)
        scaler.update()
        ema_update(teacher, student, float(mom[step]))
        step += 1
        last = {"step": step, "loss": loss.item(), "lr": float(lr[step - 1]), "momentum": float(mom[step - 1]),
                "teacher_temp": float(temp[step - 1]), "grad_norm": float(gnorm),
                "images_per_s": step * cfg.batch_size * world / max(time.time() - t0, 1e-9)}
        if metrics_f:
            metrics_f.write(json.dumps(last) + "\n")
            metrics_f.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == stop):
            _atomic_save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                          "optimizer": opt.state_dict(), "loss": loss_fn.state_dict(), "step": step,
                          "config": json.dumps(asdict(cfg))}, ckpt)
    bar.close()
    if metrics_f:
        metrics_f.close()
    if ddp:
        torch.distributed.destroy_process_group()
    return last


def export_teacher(ckpt: str | Path, out: str | Path, description: str = "tiny DINO (synthetic world)") -> Path:
    """Write the teacher backbone of a checkpoint as safetensors loadable by :func:`backbones.load`."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = Config(**json.loads(state["config"]))
    arch = backbones.Arch(cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, img_size=cfg.image_size)
    model = backbones.build(arch)
    sd = {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    backbones.load_state(model, sd, str(ckpt))
    model.nbs_info = {"num_heads": cfg.num_heads}
    return backbones.save_safetensors(model, out, description=description, steps=str(state["step"]))


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("dino", help="DINO self-distillation: train a ViT, export its teacher")
    sub = p.add_subparsers(dest="dino_cmd", required=True)
    t = sub.add_parser("train", help="train (resumes from OUT/checkpoint.pth when present)")
    for f, v in asdict(Config()).items():
        t.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--max-steps", type=int, default=None, help="stop early (schedules still span --steps)")

    def _train(a):
        cfg = Config(**{f: getattr(a, f) for f in asdict(Config())})
        if cfg.arch in ARCHS:
            for k, v in ARCHS[cfg.arch].items():
                setattr(cfg, k, v)
        train(cfg, resume=not a.no_resume, max_steps=a.max_steps)
        return 0

    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write the teacher backbone as .safetensors")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.set_defaults(func=lambda a: (print(export_teacher(a.checkpoint, a.out)), 0)[1])
