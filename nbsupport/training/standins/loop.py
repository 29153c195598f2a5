"""What both stand-in trainers share: the run folder's start, the step loop (wall-clock stop, LR schedule,
clipped AdamW step, metrics log) and the safetensors export with the recipe in its metadata. Each trainer
(:mod:`.vit`, :mod:`.groupvit`) supplies its batches, its losses and what it saves beside the weights."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from nbsupport.core.config import write_config
from nbsupport.training.common import MetricsLog, StepLogger, seed_everything


def lr_at(step: int, minutes: float, cfg) -> float:
    """The learning rate after ``step`` steps and ``minutes`` of training: linear warm-up over
    ``cfg.warmup_steps``, then cosine to ``cfg.min_lr`` over the run's progress, the larger of
    ``step / cfg.steps`` and ``minutes / cfg.max_minutes`` (when set), so a run on a loaded machine that stops
    on the clock still ends annealed."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.max_minutes:
        t = max(t, minutes / cfg.max_minutes)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def start_run(cfg) -> Path:
    """Threads (``cfg.threads > 0``), seeds and the run folder ``cfg.out`` with its ``config.yaml``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    return out


def run_steps(
    cfg,
    name: str,
    out: Path,
    opt: torch.optim.Optimizer,
    params: list,
    next_batch: Callable[[int], dict],
    step_losses: Callable[[dict], dict],
    t0: float,
    log=print,
) -> tuple[int, MetricsLog]:
    """Train until ``cfg.steps`` or ``cfg.max_minutes`` after ``t0``: each step back-propagates
    ``step_losses(next_batch(step))["loss"]`` (the other entries are its logged terms), clips ``params`` to
    ``cfg.clip_grad`` and steps ``opt`` at :func:`lr_at`; the terms go to ``out/metrics.jsonl`` every
    ``cfg.log_every`` steps. Returns the steps done and the metrics log (for the trainer's validation record)."""
    t_train = time.time()
    metrics = MetricsLog(out)
    metrics.start(resume_keep=None)
    logger = StepLogger(metrics, cfg.steps, log_every=cfg.log_every, always=(1,), desc=name, show=False)
    step = 0
    while step < cfg.steps:
        if cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes:
            log(f"{name}: max_minutes {cfg.max_minutes} reached at step {step}")
            break
        lr = lr_at(step, (time.time() - t_train) / 60, cfg)
        for grp in opt.param_groups:
            grp["lr"] = lr
        terms = step_losses(next_batch(step))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        step += 1
        rec = {"step": step, "lr": lr, "minutes": (time.time() - t0) / 60}
        rec.update({k: float(v.detach()) for k, v in terms.items()})
        if logger.step(step, cfg.batch_size, rec if logger.due(step) else None) is not None:
            log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
    logger.close()
    return step, metrics


def export_paths(cfg, out: Path) -> set[Path]:
    """Where the weights go: ``out/final.safetensors`` and ``cfg.export`` when set."""
    return {out / "final.safetensors", *([Path(cfg.export)] if cfg.export else [])}


def save_weights(
    tensors: dict, path, cfg, command: str, step: int, minutes: float, description: str, **extra: str
) -> Path:
    """``tensors`` as safetensors at ``path``, with ``extra`` metadata first, then the description, the recipe
    (the merged configuration without the run's own paths and threads), the command, the steps and minutes."""
    from safetensors.torch import save_file

    skip = ("out", "export", "threads")
    meta = {
        **extra,
        "description": description,
        "recipe": json.dumps({k: v for k, v in asdict(cfg).items() if k not in skip}),
        "command": command,
        "steps": str(step),
        "minutes": f"{minutes:.1f}",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path
