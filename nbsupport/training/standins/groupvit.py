"""The supervised GroupViT stand-in (``tiny_groupvit_synth_supervised``): a tiny GroupViT trained with the
captions' contrastive loss plus terms that use the synthetic world's instance masks, so that its final groups
follow objects (low group entropy on objects, high at borders) and zero-shot segmentation works offline.

Terms (weights in :class:`~nbsupport.training.standins.config.GroupvitConfig`):

- ``itc``: image-caption contrastive (thesis Eq 21-23), identical captions counted as positives;
- ``group``: the final groups are matched to the scene's segments (background and each instance on the
  patch grid) by the Hungarian algorithm on ``-mean log Attn``; then every labelled patch's chained
  assignment ``Attn`` (Eq 32, what inference takes the argmax of) is trained by cross-entropy towards its
  segment's group;
- ``group_text``: each matched group's embedding against the prompts of all class and background names
  (the zero-shot prompts), labelled with its segment's class or background;
- ``image_text``: the image embedding against the same prompts, its target spread over the classes and the
  background the scene shows (so the top-5 filter of Eq 31 keeps them);
- ``purity``: the entropy of the segments each first-stage group covers, weighted by the group's mass.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from nbsupport.analysis.zero_shot import zero_shot_miou
from nbsupport.core.config import write_config
from nbsupport.data.scenes import synthetic_class_names, synthetic_scenes
from nbsupport.models import groupvit as gv
from nbsupport.training.common import (
    MetricsLog,
    StepLogger,
    decay_param_groups,
    model_state,
    save_checkpoint,
    seed_everything,
)
from nbsupport.training.groupvit.losses import image_text_contrastive
from nbsupport.training.standins.config import GroupvitConfig
from nbsupport.training.standins.data import N_CLASSES, scene_pool
from nbsupport.training.standins.vit import lr_at

#: The description figure titles print.
DESCRIPTION = "tiny GroupViT, supervised stand-in (synthetic world)"

#: The prompt of training and of the zero-shot evaluation (:data:`nbsupport.models.groupvit.TEMPLATES`).
TEMPLATE = gv.TEMPLATES["simple"][0]


def build_model(cfg: GroupvitConfig) -> gv.GroupViT:
    """A seeded GroupViT of ``cfg.model``, its image encoder started from ``cfg.init_vit`` when set."""
    model = gv.build(cfg.model, cfg.seed)
    if cfg.init_vit:
        from nbsupport.models import backbones
        from nbsupport.training.groupvit.components import init_image_encoder

        init_image_encoder(model, backbones.load(cfg.init_vit))
    return model


def prompts() -> list[str]:
    """The prompts of the object class names (ids 1..K) then of the background names."""
    names, bgs = synthetic_class_names("name")
    return [TEMPLATE.format(n) for n in [*names, *bgs]]


def match_groups(log_attn: torch.Tensor, segments: torch.Tensor, background_group: bool = True):
    """Match groups to segments: ``log_attn [B, G, N]``, ``segments [B, N]`` (0 = background, k = object k,
    -1 = unlabelled). With ``background_group`` the background is always group 0 and the objects are
    Hungarian-matched to groups ``1..G-1`` (a fixed background group gives the matching a consistent
    anchor from the first step, when every assignment is still uniform); otherwise all segments are matched
    to all groups. Cost of a pair: ``-mean log Attn`` of the segment's patches in the group. Returns the
    target group of every patch ``[B, N]`` (-1 = unlabelled or unmatched) and, per image, the matched
    ``(group, segment)`` pairs."""
    from scipy.optimize import linear_sum_assignment

    target = torch.full_like(segments, -1)
    pairs = []
    la = log_attn.detach().cpu()
    first = 1 if background_group else 0
    for b in range(len(segments)):
        seg = segments[b].cpu()
        ids = [int(s) for s in torch.unique(seg) if s >= first]
        pb = [(0, 0)] if background_group and bool((seg == 0).any()) else []
        if ids:
            onehot = torch.stack([(seg == s).float() for s in ids], 1)  # [N, S]
            cost = -(la[b, first:] @ onehot) / onehot.sum(0)  # [G - first, S]
            rows, cols = linear_sum_assignment(cost.numpy())
            pb += [(int(g) + first, ids[c]) for g, c in zip(rows, cols)]
        for g, s in pb:
            target[b][segments[b] == s] = g
        pairs.append(pb)
    return target, pairs


def purity_loss(soft: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mass-weighted entropy of the segment distribution each group of ``soft [B, G, N]`` covers
    (``segments [B, N]``, -1 left out): 0 when every group lies inside one segment."""
    onehot = F.one_hot(segments.clamp(min=0), n_segments).to(soft.dtype) * (segments >= 0)[..., None]
    mass = soft @ onehot  # [B, G, S]
    total = mass.sum(-1)
    q = mass / total.clamp(min=1e-6)[..., None]
    ent = -(q * q.clamp(min=1e-9).log()).sum(-1)
    return (ent * total).sum() / total.sum().clamp(min=1e-6)


def losses(model: gv.GroupViT, batch: dict, cfg: GroupvitConfig) -> dict:
    """Every term of one step (weights applied) and ``loss``, their sum."""
    tok = gv.tokenizer()
    out = model.encode_image(batch["images"])
    scale = model.scale
    seg = batch["instance"].flatten(1)  # [B, N]: 0 background, k object k, -1 mixed
    terms = {}
    if cfg.w_itc:
        cap = model.encode_text(tok(batch["captions"], context_length=cfg.context_length))
        terms["itc"] = cfg.w_itc * image_text_contrastive(out.image_embeds, cap, scale, batch["captions"])
    text = model.encode_text(tok(prompts(), context_length=cfg.context_length))  # [K + backgrounds, P]
    log_attn = out.attn.clamp(min=1e-8).log()
    target, pairs = match_groups(log_attn, seg, cfg.background_group)
    if cfg.w_group:
        terms["group"] = cfg.w_group * F.nll_loss(log_attn, target, ignore_index=-1)
    if cfg.w_group_text:
        bi, gi, lab = [], [], []
        for b, pb in enumerate(pairs):
            for g, s in pb:
                bi.append(b)
                gi.append(g)
                lab.append(
                    N_CLASSES + int(batch["background"][b]) if s == 0 else int(batch["object_class"][b, s - 1]) - 1
                )
        logits = scale * out.group_embeds[torch.tensor(bi), torch.tensor(gi)] @ text.T
        terms["group_text"] = cfg.w_group_text * F.cross_entropy(logits, torch.tensor(lab))
    if cfg.w_image_text:
        present = torch.cat([batch["classes"], F.one_hot(batch["background"], len(text) - N_CLASSES).float()], 1)
        logp = (scale * out.image_embeds @ text.T).log_softmax(-1)
        terms["image_text"] = cfg.w_image_text * -(present / present.sum(1, keepdim=True) * logp).sum(1).mean()
    if cfg.w_purity:
        terms["purity"] = cfg.w_purity * purity_loss(out.soft[0], seg, cfg.max_objects + 1)
    terms["loss"] = sum(terms.values())
    return terms


@torch.no_grad()
def matched_embeddings(model: gv.GroupViT, pool, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode group embeddings of ``pool``'s scenes matched to their segments (as :func:`losses` matches
    them) and each one's prompt index (class, or background name): ``([M, P], [M])``."""
    was = model.training
    model.eval()
    embs, labs = [], []
    for s in range(0, len(pool), batch):
        b = pool.batch(torch.arange(s, min(s + batch, len(pool))))
        out = model.encode_image(b["images"])
        _, pairs = match_groups(out.attn.clamp(min=1e-8).log(), b["instance"].flatten(1))
        for i, pb in enumerate(pairs):
            for g, seg in pb:
                embs.append(out.group_embeds[i, g])
                labs.append(N_CLASSES + int(b["background"][i]) if seg == 0 else int(b["object_class"][i, seg - 1]) - 1)
    model.train(was)
    return torch.stack(embs), torch.tensor(labs)


def align_text(model: gv.GroupViT, pool, steps: int, lr: float = 1e-3, context_length: int = 24) -> list[float]:
    """Fit the text side (encoder, projector) so that each prompt lands on the eval-mode group embeddings of
    its class: cross-entropy of the frozen matched group embeddings of ``pool`` against the prompts, ``steps``
    Adam steps on the text parameters only. The image side is untouched; returns the losses."""
    emb, lab = matched_embeddings(model, pool)
    params = [p for n, p in model.named_parameters() if n.startswith(("text_encoder.", "text_projector."))]
    opt = torch.optim.Adam(params, lr=lr)
    ids = gv.tokenizer()(prompts(), context_length=context_length)
    scale = float(model.scale.detach())
    was = model.training
    model.train()
    hist = []
    for _ in range(steps):
        loss = F.cross_entropy(scale * emb @ model.encode_text(ids).T, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(float(loss))
    model.train(was)
    return hist


def validate(model: gv.GroupViT, n_images: int, size: int, seed: int = 0) -> dict:
    """Zero-shot mIoU (:func:`nbsupport.analysis.zero_shot.zero_shot_miou`) on ``n_images`` synthetic
    validation scenes at ``size`` px: class names as prompts, background names scored as background."""
    imgs, sem = synthetic_scenes(n_images, seed, size)
    names, bgs = synthetic_class_names("name")
    r = zero_shot_miou(model, imgs, sem, names, bgs)
    return {"miou": r["miou"], "iou": r["iou"]}


def train(cfg: GroupvitConfig, command: str = "", log=print) -> dict:
    """Train the stand-in in ``cfg.out`` (``config.yaml``, ``metrics.jsonl``, ``checkpoint.pth``,
    ``final.safetensors``; and ``cfg.export`` when set); stops after ``cfg.steps`` or ``cfg.max_minutes``.
    Returns ``{"steps", "minutes", "val"}`` (val: zero-shot mIoU on ``cfg.val_images`` scenes)."""
    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    pool = scene_pool(cfg.n_train, cfg.image_size, cfg.seed, "train", 8, cfg.max_objects)
    mix = None
    if cfg.mix_size:
        mix = scene_pool(cfg.n_mix, cfg.mix_size, cfg.seed + 1, "train", 8, cfg.max_objects)
    log(f"standin groupvit: {len(pool)} train scenes rendered in {time.time() - t0:.0f} s")
    model = build_model(cfg).train()
    if model.cfg.patch_size != 8:
        raise ValueError(f"the scene pool is labelled on a patch-8 grid; {cfg.model} has patch {model.cfg.patch_size}")
    opt = torch.optim.AdamW(decay_param_groups(model.named_parameters(), cfg.weight_decay))
    g = torch.Generator().manual_seed(cfg.seed)
    t_train = time.time()
    metrics = MetricsLog(out)
    metrics.start(resume_keep=None)
    logger = StepLogger(metrics, cfg.steps, log_every=cfg.log_every, always=(1,), desc="standin groupvit", show=False)
    step = 0
    while step < cfg.steps:
        if cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes:
            log(f"standin groupvit: max_minutes {cfg.max_minutes} reached at step {step}")
            break
        lr = lr_at(step, (time.time() - t_train) / 60, cfg)
        for grp in opt.param_groups:
            grp["lr"] = lr
        if mix is not None and step % cfg.mix_every == cfg.mix_every - 1:
            batch = mix.batch(torch.randint(len(mix), (max(2, cfg.batch_size // 2),), generator=g))
        else:
            batch = pool.batch(torch.randint(len(pool), (cfg.batch_size,), generator=g))
        terms = losses(model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        step += 1
        rec = {"step": step, "lr": lr, "minutes": (time.time() - t0) / 60}
        rec.update({k: float(v.detach()) for k, v in terms.items()})
        if logger.step(step, cfg.batch_size, rec if logger.due(step) else None) is not None:
            log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
    logger.close()
    model.eval()
    save_checkpoint(out / "checkpoint.pth", {"model": model_state(model), "step": step})
    val = {}
    if cfg.val_images:
        val = validate(model, cfg.val_images, cfg.image_size, cfg.seed)
        metrics.append({"type": "val", "step": step, **val})
        log(f"standin groupvit: zero-shot mIoU on {cfg.val_images} val scenes {val['miou']:.2f}")
    minutes = (time.time() - t0) / 60
    for path in {out / "final.safetensors", *([Path(cfg.export)] if cfg.export else [])}:
        export(model, path, cfg, command, step, minutes)
    return {"steps": step, "minutes": minutes, "val": {"miou": val.get("miou")}}


def export(model: gv.GroupViT, path, cfg: GroupvitConfig, command: str, step: int, minutes: float) -> Path:
    """The weights as fp16 safetensors (half the size; loaded back into fp32 by
    :func:`nbsupport.models.groupvit.load`), with the description, the recipe (merged configuration), the
    command, the steps and minutes in the metadata."""
    from safetensors.torch import save_file

    sd = {
        k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    skip = ("out", "export", "threads")
    meta = {
        "description": DESCRIPTION,
        "recipe": json.dumps({k: v for k, v in asdict(cfg).items() if k not in skip}),
        "command": command,
        "steps": str(step),
        "minutes": f"{minutes:.1f}",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return path


def group_stats(model: gv.GroupViT, n_images: int = 64, size: int = 64, seed: int = 0) -> dict:
    """How the final groups follow objects on validation scenes: mean group entropy of ``Attn`` (nats) on
    patches inside one object, inside the background, and on border patches (cells holding two labels)."""
    from nbsupport.analysis import entropy
    from nbsupport.data.synthetic.world import CLASSES

    pool = scene_pool(n_images, size, seed, "val", model.cfg.patch_size, min_fraction=1.0)
    with torch.no_grad():
        ent = entropy.group_entropy(model.eval().encode_image(pool.images).attn).reshape(pool.semantic.shape)
    sem = pool.semantic
    pick = {"objects": (sem > 0) & (sem <= len(CLASSES)), "background": sem == 0, "borders": sem < 0}
    return {k: float(ent[m].mean()) if m.any() else float("nan") for k, m in pick.items()}
