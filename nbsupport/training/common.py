"""What every trainer shares: learning-rate / weight-decay schedules, checkpoints, the metrics log, seeding,
and the logging loop (a rank-0 progress bar with images/s and a metrics record every ``log_every`` steps).

The schedules are the three the trainers use: DINO's per-step cosine arrays with linear warm-up (thesis
3.2), GroupViT's warm-up + cosine with restarts (thesis 5.5: two cycles) and CutLER's warm-up + multi-step
decay (the detectron2 solver). Checkpoints are written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from nbsupport.core.io import append_jsonl, atomic_torch_save, read_jsonl, truncate_jsonl

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------
# Schedules


def cosine_schedule(base: float, final: float, steps: int, warmup_steps: int = 0, start: float = 0.0) -> np.ndarray:
    """``[steps]``: linear warm-up from ``start`` to ``base`` over ``warmup_steps``, then cosine from ``base``
    to ``final``: ``final + (base - final) (1 + cos(pi t / T)) / 2`` for ``t = 0..T-1`` (DINO's lr, weight
    decay and teacher momentum)."""
    if warmup_steps > steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed steps ({steps})")
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest, 1)))
    return np.concatenate([warm, cos])


def warmup_cosine_lr(
    step: int, total: int, warmup: int, base: float, min_lr: float, warmup_lr: float, cycles: int = 1
) -> float:
    """Linear warm-up from ``warmup_lr`` to ``base`` over ``warmup`` steps, then cosine annealing to ``min_lr``
    in ``cycles`` equal restarts (SGDR; the thesis anneals in 2 cycles) until ``total``; ``min_lr`` after."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / max(1, warmup)
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    t = (t * cycles) % 1.0 if t < 1.0 else 1.0
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))


def warmup_multistep_lr(
    it: int, base: float, steps: Iterable[int], gamma: float, warmup_iters: int, warmup_factor: float
) -> float:
    """detectron2's WarmupMultiStepLR: ``base x gamma^(number of steps <= it)``, times a linear warm-up factor
    from ``warmup_factor`` (at ``it = 0``) to 1 (at ``it = warmup_iters``)."""
    lr = base * gamma ** sum(it >= s for s in steps)
    if it < warmup_iters:
        a = it / max(1, warmup_iters)
        lr *= warmup_factor * (1 - a) + a
    return lr


def decay_param_groups(named_params: Iterable, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as GroupViT sets them: weight decay on matrices, none on biases, norms, group /
    class tokens and position embeddings; parameters that do not require a gradient are left out."""
    decay, rest = [], []
    for n, p in named_params:
        if p.requires_grad:
            (decay if p.ndim > 1 and "token" not in n and "pos_embed" not in n else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# Checkpoints and seeding


def save_checkpoint(path, state: dict) -> Path:
    """Write a checkpoint atomically (``<path>.tmp`` + ``os.replace``). ``state`` should hold tensors, numbers,
    strings and plain containers only, so :func:`load_checkpoint` can read it with ``weights_only=True``."""
    return atomic_torch_save(state, path)


def load_checkpoint(path) -> dict:
    """A checkpoint on the CPU with ``torch.load(weights_only=True)``: no code from the file runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_state(model: torch.nn.Module) -> dict:
    """The detached CPU state dict of ``model`` (unwrapping DDP's ``.module``)."""
    core = getattr(model, "module", model)
    return {k: v.detach().cpu() for k, v in core.state_dict().items()}


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python's and NumPy's global RNGs with ``seed + rank`` (per-process streams, e.g. label sampling)
    and torch's with ``seed`` (every rank builds the same initial weights)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Metrics log


def read_metrics(path) -> list[dict]:
    """Records of a run's ``metrics.jsonl`` (``path``: the file or its run folder); a torn last line (a killed
    run) is dropped, a corrupt line in the middle raises."""
    path = Path(path)
    return read_jsonl(path / METRICS_FILE if path.is_dir() else path)


class MetricsLog:
    """A run's ``metrics.jsonl`` on :mod:`nbsupport.core.io`'s JSON-lines log; writes happen only when
    ``enabled`` (rank 0), so every rank can hold one."""

    def __init__(self, run_dir, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, record)

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def start(self, resume_keep: Callable[[dict], bool] | None) -> None:
        """Begin writing: a fresh run (``resume_keep`` None) deletes an old log; a resumed one keeps only the
        records ``resume_keep`` accepts (those up to its checkpoint), so the log reads as one run."""
        if not self.enabled:
            return
        if resume_keep is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_jsonl(self.path, resume_keep)


class StepLogger:
    """The logging part of a training loop: a tqdm bar on the main process (``show``) with the loss and
    images/s, and a metrics record every ``log_every`` steps (and at the steps in ``always``).

    Call :meth:`step` once per optimisation step with the number of images it trained on (all ranks) and,
    when :meth:`due`, the record to log; the logged record gains ``images_per_s``, measured over the images
    since the previous record. Steps with ``record=None`` (e.g. skipped for a NaN loss) write nothing."""

    def __init__(
        self,
        log: MetricsLog,
        total: int,
        start: int = 0,
        log_every: int = 1,
        always: Iterable[int] = (),
        desc: str = "train",
        unit: str = "step",
        show: bool = True,
        main: bool = True,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.log, self.log_every, self.always, self.main = log, int(log_every), set(always), main
        self.bar = None
        if show and main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True)
        self._t, self._images, self.rate = time.perf_counter(), 0, float("nan")

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based: the number of steps done) is logged."""
        return self.main and (step % self.log_every == 0 or step in self.always)

    def step(self, step: int, images: int = 0, record: dict | None = None, **postfix) -> dict | None:
        """Count ``images``, write ``record`` (+ ``images_per_s``) if the step is due, advance the bar; returns
        the written record or None."""
        self._images += images
        out = None
        if record is not None and self.due(step):
            now = time.perf_counter()
            self.rate = self._images / max(now - self._t, 1e-9)
            out = {**record, "images_per_s": self.rate}
            self._t, self._images = now, 0
            self.log.append(out)
        if self.bar is not None:
            self.bar.update(1)
            if postfix or out is not None:
                shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()}
                self.bar.set_postfix({**shown, "img/s": f"{self.rate:.1f}"}, refresh=False)
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
