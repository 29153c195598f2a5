"""The supervised ViT stand-in (``tiny_vit_synth_supervised``): the tiny DINO's architecture family (timm
ViT, patch 8) trained with the synthetic world's labels, so that class structure exists in its keys,
attention and tokens where the self-supervised tiny DINO has almost none offline.

Three terms: cross-entropy of a linear head on the patch tokens (7 labels, background 0; mixed patches
ignored), multi-label BCE of a linear head on the CLS token (the image's object classes), and a
supervised-contrastive term on the last block's keys (patches of one class are positives), since the
notebooks compare keys.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.models import backbones, features
from nbsupport.training.common import decay_param_groups, model_state, save_checkpoint
from nbsupport.training.standins.config import VitConfig
from nbsupport.training.standins.data import N_CLASSES, ScenePool, crop_batch, scene_pool
from nbsupport.training.standins.loop import export_paths, run_steps, save_weights, start_run

#: The description figure titles print (``backbones.describe`` appends the architecture).
DESCRIPTION = "supervised stand-in (synthetic world)"


class Heads(nn.Module):
    """The two linear heads: ``patch`` (patch token -> 7 labels) and ``image`` (CLS -> 6 object classes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.patch = nn.Linear(dim, N_CLASSES + 1)
        self.image = nn.Linear(dim, N_CLASSES)


def build_vit(cfg: VitConfig) -> nn.Module:
    """A timm ViT of ``cfg``'s shape (:func:`nbsupport.models.backbones.build`), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    arch = backbones.Arch(cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, img_size=cfg.image_size)
    return backbones.build(arch)


def forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys [B, h, w, D]`` of the last block, normed patch tokens ``[B, h, w, D]``, normed CLS ``[B, D])``,
    with gradients."""
    out = features.extract_many(model, x, [("key", -1), ("token", -1)], include_cls=True, no_grad=False)
    keys, _ = out[("key", -1)]
    tok, cls = out[("token", -1)]
    return keys, model.norm(tok), model.norm(cls)


def supcon(feats: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (positives: same label) of features ``[n, D]`` (cosine / ``temperature``),
    averaged over the anchors that have a positive; 0 when none has."""
    z = F.normalize(feats, dim=-1)
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1)
    if not has.any():
        return feats.sum() * 0.0
    logp = logits.log_softmax(1).masked_fill(~pos, 0.0)
    return -(logp.sum(1)[has] / pos.sum(1)[has]).mean()


def augment(x: torch.Tensor, sem: torch.Tensor, g: torch.Generator, cfg: VitConfig):
    """Horizontal flips (images and label grids) and per-image RGB permutations, drawn from ``g``."""
    if cfg.flip:
        f = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        sem = torch.where(f[:, None, None], sem.flip(-1), sem)
    if cfg.channel_shuffle:
        perm = torch.stack([torch.randperm(3, generator=g) for _ in range(len(x))])
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    return x, sem


def losses(model, heads, batch: dict, cfg: VitConfig, g: torch.Generator) -> dict:
    """Every term of one step (weights applied) and ``loss``, their sum."""
    x, sem = augment(batch["images"], batch["semantic"], g, cfg)
    keys, tok, cls = forward(model, x)
    out = {}
    if cfg.w_patch:
        out["patch"] = cfg.w_patch * F.cross_entropy(heads.patch(tok).flatten(0, 2), sem.flatten(), ignore_index=-1)
    if cfg.w_image:
        out["image"] = cfg.w_image * F.binary_cross_entropy_with_logits(heads.image(cls), batch["classes"])
    if cfg.w_keys:
        lab = sem.flatten()
        idx = torch.nonzero(lab >= 0)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)[: cfg.key_patches]]
        out["keys"] = cfg.w_keys * supcon(keys.flatten(0, 2)[idx], lab[idx], cfg.key_temperature)
    out["loss"] = sum(out.values())
    return out


@torch.no_grad()
def patch_accuracy(model, head: nn.Linear, pool: ScenePool, batch: int = 16) -> dict:
    """Accuracy of ``head`` on the patch tokens of ``pool``: ``objects`` (patches whose majority label is an
    object class) and ``all`` labelled patches."""
    preds = []
    for s in range(0, len(pool), batch):
        _, tok, _ = forward(model, pool.images[s : s + batch])
        preds.append(head(tok).argmax(-1))
    pred, sem = torch.cat(preds), pool.semantic
    obj, lab = sem > 0, sem >= 0
    return {
        "objects": float((pred[obj] == sem[obj]).float().mean()),
        "all": float((pred[lab] == sem[lab]).float().mean()),
    }


def train(cfg: VitConfig, command: str = "", log=print) -> dict:
    """Train the stand-in in ``cfg.out`` (``config.yaml``, ``metrics.jsonl``, ``checkpoint.pth``,
    ``final.safetensors``; and ``cfg.export`` when set); stops after ``cfg.steps`` or ``cfg.max_minutes``.
    Returns ``{"steps", "minutes", "val"}`` (val: :func:`patch_accuracy` on ``cfg.val_images`` scenes)."""
    t0 = time.time()
    out = start_run(cfg)
    pool = scene_pool(cfg.n_train, cfg.image_size, cfg.seed, "train", cfg.patch_size, cfg.max_objects)
    log(f"standin vit: {len(pool)} train scenes rendered in {time.time() - t0:.0f} s")
    model = build_vit(cfg).train()
    heads = Heads(cfg.embed_dim)
    params = [*model.named_parameters(), *(("head." + n, p) for n, p in heads.named_parameters())]
    opt = torch.optim.AdamW(decay_param_groups(params, cfg.weight_decay))
    g = torch.Generator().manual_seed(cfg.seed)

    def next_batch(step):
        batch = pool.batch(torch.randint(len(pool), (cfg.batch_size,), generator=g))
        return crop_batch(batch, cfg.crop_size, cfg.patch_size, g)

    step, metrics = run_steps(
        cfg,
        "standin vit",
        out,
        opt,
        [p for _, p in params],
        next_batch,
        lambda batch: losses(model, heads, batch, cfg, g),
        t0,
        log,
    )
    model.eval()
    save_checkpoint(out / "checkpoint.pth", {"model": model_state(model), "heads": model_state(heads), "step": step})
    val = {}
    if cfg.val_images:
        val = patch_accuracy(model, heads.patch, scene_pool(cfg.val_images, cfg.image_size, cfg.seed, "val"))
        metrics.append({"type": "val", "step": step, **val})
        log(f"standin vit: patch accuracy on {cfg.val_images} val scenes {val}")
    minutes = (time.time() - t0) / 60
    for path in export_paths(cfg, out):
        export(model, heads, path, cfg, command, step, minutes)
    return {"steps": step, "minutes": minutes, "val": val}


def export(model, heads: Heads, path, cfg: VitConfig, command: str, step: int, minutes: float) -> Path:
    """The backbone as safetensors in :func:`~nbsupport.models.backbones.save_safetensors`'s format, plus the
    two heads under ``head.patch.*`` / ``head.image.*`` (which the backbone loader skips), and the recipe
    (the merged configuration), the command, the steps and minutes in the metadata."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    sd.update({f"head.{k}": v.detach().contiguous().cpu() for k, v in heads.state_dict().items()})
    extra = {"num_heads": str(cfg.num_heads), "format": "nbsupport-vit"}
    return save_weights(sd, path, cfg, command, step, minutes, DESCRIPTION, **extra)


def load_heads(path) -> Heads:
    """The two heads stored beside a stand-in's backbone (:func:`export`)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    head = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
    heads = Heads(int(head["patch.weight"].shape[1]))
    heads.load_state_dict(head)
    return heads.eval()


def class_auc(model, pool: ScenePool, max_pairs: int = 20000, seed: int = 0) -> float:
    """Same- vs different-class cosine ROC AUC of last-block keys over object patches of ``pool`` (the
    notebooks' and ``benchmarks/backbone_quality.py``'s class AUC)."""
    from nbsupport.analysis import affinity

    with torch.no_grad():
        keys = torch.cat([forward(model, pool.images[s : s + 16])[0] for s in range(0, len(pool), 16)])
    intra, inter = affinity.patch_pairs(keys, np.asarray(pool.semantic), "cosine", max_pairs, seed)
    return affinity.separability(intra, inter)["auc"]
