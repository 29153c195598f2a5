"""Linear probe on frozen features: a 1x1 convolution (one linear map per patch) trained with cross-entropy.

The logits of every patch are bilinearly upsampled to the label resolution and scored against every
labelled pixel (255 is ignored in the loss and in the scores), as STEGO's and HP's linear probes do. The
papers' settings are recipes (:data:`RECIPES`) that list only what differs from :data:`DEFAULT`:

- ``hp``: HP (and STEGO) train the probe online beside their head: Adam lr 1e-3, batch 64, for HP's
  schedule (COCO 3 epochs; Cityscapes 20 in the paper, 30 in its code; Potsdam 10);
- ``croc_voc`` / ``croc_coco``: CrOC section 4: Adam lr 1e-3, PASCAL VOC trainaug 45 epochs, COCO 10;
- ``mmc``: MMC's frozen linear segmentation: layers 6, 8, 10, 12 (1-based) concatenated, AdamW lr 1e-4,
  wd 0.05, 1,500 warm-up iterations, 40k iterations, batch 16 (mmseg's poly decay [inferred]).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.analysis.probes.matching import IGNORE, Scores, confusion, scores


@dataclass(frozen=True)
class LinearRecipe:
    """How a linear probe is trained. ``iterations`` (when set) replaces ``epochs``; ``schedule``:
    ``constant`` or ``poly`` (power 1 to 0 after the warm-up); ``layers``: the blocks whose features are
    concatenated (read by the caller that extracts them; 0-based, -1 = last)."""

    name: str = "default"
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10
    iterations: int | None = None
    batch_size: int = 16
    warmup_iters: int = 0
    schedule: str = "constant"  # constant | poly
    layers: tuple[int, ...] = (-1,)
    source: str = "Adam lr 1e-3 (HP, CrOC), 10 epochs"


DEFAULT = LinearRecipe()

RECIPES: dict[str, LinearRecipe] = {
    "default": DEFAULT,
    "hp": dataclasses.replace(
        DEFAULT, name="hp", batch_size=64, epochs=3, source="HP: online Adam lr 1e-3, batch 64, COCO 3 epochs"
    ),
    "croc_voc": dataclasses.replace(DEFAULT, name="croc_voc", epochs=45, source="CrOC: VOC trainaug, 45 epochs"),
    "croc_coco": dataclasses.replace(DEFAULT, name="croc_coco", epochs=10, source="CrOC: COCO, 10 epochs"),
    "mmc": dataclasses.replace(
        DEFAULT,
        name="mmc",
        optimizer="adamw",
        lr=1e-4,
        weight_decay=0.05,
        iterations=40_000,
        warmup_iters=1500,
        schedule="poly",
        layers=(5, 7, 9, 11),
        source="MMC: layers 6/8/10/12, AdamW 1e-4 wd 0.05, 1.5k warm-up, 40k it, batch 16",
    ),
}


def recipe(name: str = "default", **overrides) -> LinearRecipe:
    """The recipe ``name`` of :data:`RECIPES` with ``overrides`` (e.g. fewer epochs for a smoke run);
    unknown names or fields raise ValueError naming the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown linear-probe recipe {name!r}: use one of {sorted(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(LinearRecipe)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown recipe fields {bad}: known {sorted(fields)}")
    if "layers" in overrides:
        overrides["layers"] = tuple(int(x) for x in overrides["layers"])
    return dataclasses.replace(RECIPES[name], **overrides)


def recipe_diff(r: LinearRecipe) -> dict:
    """The fields where ``r`` differs from :data:`DEFAULT` (name and source left out): what the recipe is."""
    skip = {"name", "source"}
    return {
        f.name: getattr(r, f.name)
        for f in dataclasses.fields(r)
        if f.name not in skip and getattr(r, f.name) != getattr(DEFAULT, f.name)
    }


def _optimizer(r: LinearRecipe, params) -> torch.optim.Optimizer:
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=0.9, weight_decay=r.weight_decay)
    raise ValueError(f"unknown optimizer {r.optimizer!r}: adam | adamw | sgd")


def lr_factor(r: LinearRecipe, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: linear warm-up over ``warmup_iters``, then
    constant or linear (poly power 1) decay to 0."""
    if r.warmup_iters and step < r.warmup_iters:
        return (step + 1) / r.warmup_iters
    if r.schedule == "poly":
        rest = max(1, total - r.warmup_iters)
        return max(0.0, 1.0 - (step - r.warmup_iters) / rest)
    if r.schedule != "constant":
        raise ValueError(f"unknown schedule {r.schedule!r}: constant | poly")
    return 1.0


def logits_at(probe: nn.Module, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` logits of ``grid [B, h, w, D]``, bilinearly upsampled to ``size`` when it differs."""
    x = grid.float().permute(0, 3, 1, 2)
    out = probe(x)
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
    return out


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    r: LinearRecipe = DEFAULT,
    seed: int = 0,
    device=None,
    ignore: int = IGNORE,
    log_every: int = 0,
) -> tuple[nn.Conv2d, list[float]]:
    """A ``Conv2d(D, n_classes, 1)`` trained on frozen ``features [N, h, w, D]`` against ``labels [N, H, W]``
    (``ignore`` = no loss) by recipe ``r``: shuffled batches of images, cross-entropy of the upsampled
    logits. Returns the probe (eval mode) and the loss of every step."""
    device = torch.device(device or features.device)
    labels = torch.as_tensor(labels)
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature grids but {len(labels)} label maps")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Conv2d(features.shape[-1], n_classes, 1).to(device)
    opt = _optimizer(r, probe.parameters())
    n = len(features)
    per_epoch = math.ceil(n / r.batch_size)
    total = r.iterations if r.iterations is not None else r.epochs * per_epoch
    size = tuple(labels.shape[-2:])
    losses: list[float] = []
    step = 0
    probe.train()
    with torch.enable_grad():
        while step < total:
            order = torch.randperm(n, generator=g)
            for i in range(0, n, r.batch_size):
                if step >= total:
                    break
                idx = order[i : i + r.batch_size]
                x = features[idx.to(features.device)].to(device)
                y = labels[idx.to(labels.device)].to(device).long()
                loss = F.cross_entropy(logits_at(probe, x, size), y, ignore_index=ignore)
                for group in opt.param_groups:
                    group["lr"] = r.lr * lr_factor(r, step, total)
                opt.zero_grad()
                if torch.isfinite(loss):  # a batch with only ignored pixels gives NaN: skip it
                    loss.backward()
                    opt.step()
                losses.append(loss.item())
                if log_every and step % log_every == 0:
                    print(f"linear probe step {step}/{total}: loss {float(loss):.4f}", flush=True)
                step += 1
    return probe.eval(), losses


def evaluate_linear(
    probe: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    batch_size: int = 16,
    images: torch.Tensor | None = None,
    crf_params: dict | None = None,
    n_keep: int = 0,
    ignore: int = IGNORE,
    crf_workers: int = 0,
) -> tuple[Scores, np.ndarray, torch.Tensor | None]:
    """``(scores, confusion [C, C], predictions of the first n_keep images or None)`` of a trained probe on
    ``features [N, h, w, D]`` against ``labels [N, H, W]``. With ``images`` (uint8 ``[N, 3, H, W]`` at the
    label resolution) the softmax output is refined by the dense CRF (:mod:`.crf`, in ``crf_workers``
    processes) first."""
    from nbsupport.analysis.probes import crf

    labels = torch.as_tensor(labels)
    size = tuple(labels.shape[-2:])
    device = next(probe.parameters()).device
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    kept = []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            logits = logits_at(probe, features[i : i + batch_size].to(device), size)
            if images is not None:
                probs = logits.softmax(1).cpu().numpy()
                ims = images[i : i + batch_size].permute(0, 2, 3, 1).cpu().numpy()
                pred = torch.from_numpy(crf.dense_crf_many(ims, probs, crf_params, crf_workers))
                pred = pred.argmax(1)
            else:
                pred = logits.argmax(1).cpu()
            lab = labels[i : i + batch_size].cpu()
            conf += confusion(pred, lab, n_classes, n_classes, ignore)
            if i < n_keep:
                p = pred[: n_keep - i].clone()
                p[lab[: n_keep - i] == ignore] = ignore
                kept.append(p)
    return scores(conf), conf, (torch.cat(kept) if kept else None)
