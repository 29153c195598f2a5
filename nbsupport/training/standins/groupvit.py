"""The supervised GroupViT stand-in (``tiny_groupvit_synth_supervised``): a tiny GroupViT trained with the
captions' contrastive loss plus terms that use the synthetic world's instance masks and classes, so that its
groups follow objects and zero-shot segmentation names them offline.

Terms (weights in :class:`~nbsupport.training.standins.config.GroupvitConfig`); per-patch terms weigh every
segment (background, each object) equally (:func:`segment_weights`):

- ``itc``: image-caption contrastive (thesis Eq 21-23), identical captions counted as positives;
- ``group``: the final groups are matched to the scene's segments (background and each instance on the
  patch grid; background = group 0) by the Hungarian algorithm on ``-mean log Attn``; then every labelled
  patch's chained assignment ``Attn`` (Eq 32, what inference takes the argmax of) is trained by
  cross-entropy towards its segment's group; ``group1``: the same for the first stage's ``A^1``;
- ``group_text``: each matched group's embedding against the prompts of all class and background names
  (the zero-shot prompts, every template and their ensemble), labelled with its segment's class or background;
- ``segment_text``: the same for the first-stage groups, labelled by the patches they took;
- ``dense``: every patch's zero-shot labelling (its groups' class softmax mixed by ``Attn``, Eq 33);
- ``image_text``: the image embedding against the same prompts, its target spread over the classes and the
  background the scene shows (so the top-5 filter of Eq 31 keeps them);
- ``purity``: the entropy of the segments each first-stage group covers, weighted by the group's mass.

Three training choices matter as much as the terms (measured in ``docs/experiments/offline_models.md``):
the patch embedding and first-stage blocks come from ``tiny_vit_synth_supervised`` and stay frozen
(:func:`frozen_parameters`), new groups start as the mean of their segments (:func:`content_first_init`),
and every BatchNorm runs on its running statistics (:func:`running_stats`), as inference runs it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nbsupport.analysis.zero_shot import zero_shot_miou
from nbsupport.data.caption_labels import TEMPLATES as CLIP_TEMPLATES
from nbsupport.data.scenes import synthetic_class_names, synthetic_scenes
from nbsupport.models import groupvit as gv
from nbsupport.training.common import decay_param_groups, model_state, save_checkpoint
from nbsupport.training.groupvit.losses import image_text_contrastive
from nbsupport.training.standins.config import GroupvitConfig
from nbsupport.training.standins.data import N_CLASSES, scene_pool
from nbsupport.training.standins.loop import export_paths, run_steps, save_weights, start_run

#: The description figure titles print.
DESCRIPTION = "tiny GroupViT, supervised stand-in (synthetic world)"

#: GroupViT's single prompt (:data:`nbsupport.models.groupvit.TEMPLATES`), trained alone or with CLIP's 7.
TEMPLATE = gv.TEMPLATES["simple"][0]


def build_model(cfg: GroupvitConfig) -> gv.GroupViT:
    """A seeded GroupViT of ``cfg.model`` at ``cfg.image_size`` (its position embedding's grid), its image
    encoder started from ``cfg.init_vit`` when set."""
    from dataclasses import replace

    model = gv.build(replace(gv.CONFIGS[cfg.model], img_size=cfg.image_size), cfg.seed)
    if cfg.init_vit:
        from nbsupport.models import backbones
        from nbsupport.training.groupvit.components import init_image_encoder

        init_image_encoder(model, backbones.load(cfg.init_vit))
    if cfg.freeze_vit:
        if not cfg.init_vit:
            raise ValueError("freeze_vit keeps the layers started from init_vit frozen: set init_vit")
        for p in frozen_parameters(model):
            p.requires_grad_(False)
    if cfg.assign_init == "content":
        content_first_init(model, cfg.group_context_scale)
    elif cfg.assign_init != "default":
        raise ValueError(f"assign_init must be 'default' or 'content', got {cfg.assign_init!r}")
    return model


def frozen_parameters(model: gv.GroupViT) -> list[torch.nn.Parameter]:
    """The patch embedding (projection, LayerNorm), the position embedding and the first stage's blocks: the
    layers that turn pixels into the patch features the first grouping block groups. Started from the
    supervised ViT, whose segment-pooled stage-1 features tell the classes apart (logistic regression: 0.76
    object accuracy on validation scenes); trained along with the grouping terms they lost it (0.48)."""
    enc = model.img_encoder
    return [*enc.patch_embed.parameters(), enc.pos_embed, *enc.layers[0].blocks.parameters()]


def content_first_init(model: gv.GroupViT, context_scale: float = 0.1) -> gv.GroupViT:
    """Start every grouping block so that a new group token is, first of all, the mean of the segments it
    takes (Eq 17): the assignment's value and output projections start as the identity, and the LayerNorm
    that ends the group tokens' cross-attention (the context every group reads from the whole image) starts
    at ``context_scale`` (the assignment's query projection, which reads the same tokens, scaled by its
    inverse so the assignment logits start as they would). With the default init the assigned content is
    ~1/100 of that shared context, so each final group starts as the image's mixture and, on CPU budgets,
    stays one (the group-text loss at chance). Only the init changes: the architecture and its state-dict
    keys are the official ones."""
    with torch.no_grad():
        for st in model.img_encoder.layers:
            blk = st.downsample
            if blk is None:
                continue
            for lin in (blk.assign.v_proj, blk.assign.proj):
                lin.weight.copy_(torch.eye(lin.weight.shape[0]))
                lin.bias.zero_()
            blk.pre_assign_attn.norm_post.weight.fill_(context_scale)
            if context_scale > 0:  # the same tokens are the assignment's queries: keep their logits' scale
                blk.assign.q_proj.weight.mul_(1.0 / context_scale)
    return model


def templates(cfg: GroupvitConfig) -> tuple[str, ...]:
    """The prompt templates trained: "a photo of a {}." alone (``cfg.templates == "simple"``), or with CLIP's
    7-template ensemble the notebooks also prompt with (``"all"``;
    :data:`nbsupport.data.caption_labels.TEMPLATES`)."""
    if cfg.templates not in ("simple", "all"):
        raise ValueError(f"templates must be 'simple' or 'all', got {cfg.templates!r}")
    return (TEMPLATE,) + (tuple(CLIP_TEMPLATES) if cfg.templates == "all" else ())


def prompts(template: str = TEMPLATE) -> list[str]:
    """The prompts of the object class names (ids 1..K) then of the background names."""
    names, bgs = synthetic_class_names("name")
    return [template.format(n) for n in [*names, *bgs]]


def text_targets(model: gv.GroupViT, cfg: GroupvitConfig) -> torch.Tensor:
    """The prompt embeddings the group and image terms are scored against, ``[T, K + backgrounds, P]``: one
    row per template of :func:`templates` and, with several, their normalised mean (what
    :func:`nbsupport.models.groupvit.text_embeddings` gives inference), so each template and the ensemble
    name the classes."""
    tpl = templates(cfg)
    ids = gv.tokenizer()([q for t in tpl for q in prompts(t)], context_length=cfg.context_length)
    z = model.encode_text(ids).reshape(len(tpl), -1, model.cfg.proj_dim)
    if len(tpl) > 1:
        z = torch.cat([z, F.normalize(z[1:].mean(0), dim=-1)[None]])
    return z


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


def segment_weights(segments: torch.Tensor, balance: bool = True) -> torch.Tensor:
    """Per-patch weights ``[B, N]`` of ``segments [B, N]`` (-1 = unlabelled, weight 0) that sum to 1 per
    image: with ``balance`` every segment (the background, each object) weighs the same whatever its size,
    else every labelled patch does. Unbalanced, the background (most patches) decides every per-patch term
    and a model that only tells objects from background scores well."""
    keep = (segments >= 0).to(torch.float32)
    if not balance:
        return keep / keep.sum(1, keepdim=True).clamp(min=1)
    onehot = F.one_hot(segments.clamp(min=0), int(segments.max().clamp(min=0)) + 1).float() * keep[..., None]
    size = onehot.sum(1, keepdim=True)  # [B, 1, S]
    n_seg = (size > 0).sum(-1).clamp(min=1)  # [B, 1]
    return (onehot / size.clamp(min=1)).sum(-1) / n_seg


def any_background(scores: torch.Tensor, log: bool = True) -> torch.Tensor:
    """Fold the background prompts' columns of ``scores [..., K + backgrounds]`` into one (log-sum-exp of
    logits, or sum of probabilities with ``log=False``): zero-shot scoring maps every background name to the
    background, so naming the wrong background is no error there, and training need not teach it."""
    rest = scores[..., N_CLASSES:]
    bg = rest.logsumexp(-1, keepdim=True) if log else rest.sum(-1, keepdim=True)
    return torch.cat([scores[..., :N_CLASSES], bg], -1)


def patch_labels(batch: dict) -> torch.Tensor:
    """Every patch's prompt index ``[B, N]``: object class ``k`` -> ``k - 1``, background -> ``K +`` the
    scene's background name, mixed cells -> -1."""
    sem = batch["semantic"].flatten(1)
    bg = (N_CLASSES + batch["background"])[:, None].expand_as(sem)
    return torch.where(sem > 0, sem - 1, torch.where(sem == 0, bg, torch.full_like(sem, -1)))


def dense_loss(
    out, text: torch.Tensor, scale, batch: dict, weights: torch.Tensor, any_bg: bool = False
) -> torch.Tensor:
    """Per-patch cross-entropy of zero-shot inference's labelling (thesis Eq 33): a patch's class
    distribution is its groups' ``softmax(scale * group . text)``, mixed by its assignment ``Attn``; ``text``
    ``[T, K, P]`` (averaged over templates), labels from :func:`patch_labels`, patches weighted by
    ``weights [B, N]`` (:func:`segment_weights`; each image's sum to 1); ``any_bg``: any background name is
    right for a background patch (:func:`any_background`)."""
    lab = patch_labels(batch)  # [B, N]
    keep = weights * (lab >= 0)
    p_group = (scale * out.group_embeds[None] @ text[:, None].transpose(-1, -2)).softmax(-1)  # [T, B, G, K]
    if any_bg:
        p_group, lab = any_background(p_group, log=False), lab.clamp(max=N_CLASSES)
    p_patch = out.attn.transpose(1, 2)[None] @ p_group  # [T, B, N, K]
    picked = p_patch.gather(-1, lab.clamp(min=0)[None, ..., None].expand(len(text), -1, -1, 1))[..., 0]
    return -(picked.clamp(min=1e-8).log() * keep).sum() / (len(lab) * len(text))


def segment_text_loss(
    model: gv.GroupViT, out, text: torch.Tensor, scale, batch: dict, weights: torch.Tensor, any_bg: bool = False
) -> torch.Tensor:
    """The first-stage groups' class (what the second grouping block averages into the final groups): each
    stage-2 segment token (final LayerNorm, then the image projector, as the final groups' embeddings) is
    scored against the prompts ``text [T, K, P]``, its target the label distribution of the patches its
    hard assignment ``Â^1`` took (mixed cells left out); weighted by that mass, patches weighted by
    ``weights [B, N]`` (:func:`segment_weights`)."""
    lab = patch_labels(batch)  # [B, N]
    onehot = F.one_hot(lab.clamp(min=0), text.shape[1]).to(out.hard[0].dtype) * (weights * (lab >= 0))[..., None]
    mass = out.hard[0].detach() @ onehot  # [B, G1, K]
    total = mass.sum(-1)
    emb = F.normalize(model.img_projector(model.img_encoder.norm(out.segment_tokens[1])), dim=-1)  # [B, G1, P]
    logp = (scale * emb[None] @ text[:, None].transpose(-1, -2)).log_softmax(-1)  # [T, B, G1, K]
    q = mass / total.clamp(min=1e-6)[..., None]
    if any_bg:
        q, logp = any_background(q, log=False), any_background(logp)
    ce = -(q[None] * logp).sum(-1)  # [T, B, G1]
    return (ce * total[None]).sum() / (total.sum() * len(text)).clamp(min=1e-12)


@contextlib.contextmanager
def running_stats(module: torch.nn.Module):
    """Inside, ``module``'s BatchNorm layers normalise with their running statistics and leave them as they
    are (eval mode), whatever the module's mode. The stand-in trains every projection this way, so its
    BatchNorms stay fixed affine maps that the training learns: with batch statistics, group and segment
    tokens, images, prompts and captions would each be normalised by their own batch while inference uses
    one set of running statistics for all (measured: the image-text loss 1.2 in training, 2.5 in eval mode,
    and zero-shot inference lost the background, whose prompts fell out of Eq 31's top 5)."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was = [m.training for m in bns]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(bns, was):
            m.train(w)


def losses(model: gv.GroupViT, batch: dict, cfg: GroupvitConfig) -> dict:
    """Every term of one step (weights applied) and ``loss``, their sum."""
    with running_stats(model):  # every embedding as inference computes it (see running_stats)
        return _losses(model, batch, cfg)


def _losses(model: gv.GroupViT, batch: dict, cfg: GroupvitConfig) -> dict:
    tok = gv.tokenizer()
    out = model.encode_image(batch["images"])
    scale = model.scale
    seg = batch["instance"].flatten(1)  # [B, N]: 0 background, k object k, -1 mixed
    terms = {}
    if cfg.w_itc:
        cap = model.encode_text(tok(batch["captions"], context_length=cfg.context_length))
        terms["itc"] = cfg.w_itc * image_text_contrastive(out.image_embeds, cap, scale, batch["captions"])
    text = text_targets(model, cfg)  # [T, K + backgrounds, P]
    log_attn = out.attn.clamp(min=1e-8).log()
    target, pairs = match_groups(log_attn, seg, cfg.background_group)
    if cfg.w_group:
        w = segment_weights(torch.where(target >= 0, seg, torch.full_like(seg, -1)), cfg.balance_segments)
        picked = log_attn.gather(1, target.clamp(min=0)[:, None])[:, 0]  # [B, N]
        terms["group"] = cfg.w_group * -(picked * w).sum() / len(seg)
    if cfg.w_group1:  # the first stage too: one matched group per segment, the rest free
        log_a1 = out.soft[0].clamp(min=1e-8).log()
        target1, _ = match_groups(log_a1, seg, cfg.background_group)
        w1 = segment_weights(torch.where(target1 >= 0, seg, torch.full_like(seg, -1)), cfg.balance_segments)
        terms["group1"] = cfg.w_group1 * -(log_a1.gather(1, target1.clamp(min=0)[:, None])[:, 0] * w1).sum() / len(seg)
    if cfg.w_group_text:
        bi, gi, lab = [], [], []
        for b, pb in enumerate(pairs):
            for g, s in pb:
                bi.append(b)
                gi.append(g)
                lab.append(
                    N_CLASSES + int(batch["background"][b]) if s == 0 else int(batch["object_class"][b, s - 1]) - 1
                )
        logits = scale * out.group_embeds[torch.tensor(bi), torch.tensor(gi)] @ text.transpose(1, 2)  # [T, M, K]
        lab = torch.tensor(lab).repeat(len(text))
        if cfg.background_names == "any":
            logits, lab = any_background(logits), lab.clamp(max=N_CLASSES)
        terms["group_text"] = cfg.w_group_text * F.cross_entropy(logits.flatten(0, 1), lab)
    if cfg.w_dense:
        terms["dense"] = cfg.w_dense * dense_loss(
            out, text, scale, batch, segment_weights(seg, cfg.balance_segments), cfg.background_names == "any"
        )
    if cfg.w_segment_text:
        terms["segment_text"] = cfg.w_segment_text * segment_text_loss(
            model, out, text, scale, batch, segment_weights(seg, cfg.balance_segments), cfg.background_names == "any"
        )
    if cfg.w_image_text:
        present = torch.cat([batch["classes"], F.one_hot(batch["background"], text.shape[1] - N_CLASSES).float()], 1)
        logp = (scale * out.image_embeds @ text.transpose(1, 2)).log_softmax(-1)  # [T, B, K]
        terms["image_text"] = cfg.w_image_text * -(present / present.sum(1, keepdim=True) * logp).sum(-1).mean()
    if cfg.w_purity:
        terms["purity"] = cfg.w_purity * purity_loss(out.soft[0], seg, cfg.max_objects + 1)
    terms["loss"] = sum(terms.values())
    return terms


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
    out = start_run(cfg)
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

    def next_batch(step):
        if mix is not None and step % cfg.mix_every == cfg.mix_every - 1:
            return mix.batch(torch.randint(len(mix), (max(2, cfg.batch_size // 2),), generator=g))
        return pool.batch(torch.randint(len(pool), (cfg.batch_size,), generator=g))

    step, metrics = run_steps(
        cfg,
        "standin groupvit",
        out,
        opt,
        list(model.parameters()),
        next_batch,
        lambda batch: losses(model, batch, cfg),
        t0,
        log,
    )
    model.eval()
    save_checkpoint(out / "checkpoint.pth", {"model": model_state(model), "step": step})
    val = {}
    if cfg.val_images:
        val = validate(model, cfg.val_images, cfg.image_size, cfg.seed)
        metrics.append({"type": "val", "step": step, **val})
        log(f"standin groupvit: zero-shot mIoU on {cfg.val_images} val scenes {val['miou']:.2f}")
    minutes = (time.time() - t0) / 60
    for path in export_paths(cfg, out):
        export(model, path, cfg, command, step, minutes)
    return {"steps": step, "minutes": minutes, "val": {"miou": val.get("miou")}}


def export(model: gv.GroupViT, path, cfg: GroupvitConfig, command: str, step: int, minutes: float) -> Path:
    """The weights as fp16 safetensors (half the size; loaded back into fp32 by
    :func:`nbsupport.models.groupvit.load`), with the description, the recipe (merged configuration), the
    command, the steps and minutes in the metadata."""
    sd = {
        k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    return save_weights(sd, path, cfg, command, step, minutes, DESCRIPTION)


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
