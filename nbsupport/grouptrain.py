"""Training and fine-tuning GroupViT (thesis sections 4.5, 4.7, 5.5-5.10, 5.14.3; Eq 21-26, 36-44, 52).

Losses (each a plain function of embeddings, tested on hand-computed cases):

- :func:`image_text_contrastive` - symmetric InfoNCE between images and captions (Eq 21-23);
- :func:`multi_label_contrastive` - images against ``K`` prompted labels each (Eq 24-26), with a
  ``<PAD>`` mask (section 5.7) and the non-noisy variant (section 5.10: identical label strings in the
  batch are positives, ``label_strings=``);
- :func:`ge_loss`, :func:`le_loss`, :func:`se_loss` - entropy regularisers (Eq 37, 41, 44) with pads;
- :func:`dino_distillation_loss` - cross-entropy of ``Attn^T Attn`` against ``softmax(DINOsim)`` (Eq 52).

Training (:func:`train`, command ``python -m nbsupport groupvit-train``): choose trainable components
(Table 5), AdamW, linear warm-up + cosine, AMP on CUDA, gradient clipping 5.0, DDP under ``torchrun``
with all-gathered embeddings, atomic checkpoints and resume, JSON-lines metrics and zero-shot mIoU on the
synthetic world's validation split after every epoch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import entropy as ent
from . import groupvit as gv
from . import text as textmod
from .data.synthetic import OBJECT_SCALE

log = logging.getLogger(__name__)


# ============================================================================================== losses
def contrastive_from_logits(logits: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor | None = None):
    """``-log(sum_pos exp(l) / sum_all exp(l))`` per row of ``logits [R, M]`` with boolean ``positives [R, M]``;
    columns where ``valid [M]`` (or ``[R, M]``) is False are dropped from both sums. Returns ``[R]``."""
    if valid is not None:
        valid = valid.expand_as(logits)
        logits = logits.masked_fill(~valid, float("-inf"))
        positives = positives & valid
    pos = logits.masked_fill(~positives, float("-inf"))
    return torch.logsumexp(logits, -1) - torch.logsumexp(pos, -1)


def image_text_contrastive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float,
                           texts: list | None = None) -> torch.Tensor:
    """Eq 21-23: ``L_{I->T} + L_{T->I}`` for L2-normalised ``img [B, P]``, ``txt [B, P]`` (pair ``i`` is positive)
    and ``scale = 1 / tau``. With ``texts`` (the caption strings) identical captions in the batch also count
    as positives (the non-noisy idea of section 5.10 applied to captions)."""
    logits = scale * img @ txt.T                                   # [B, B]
    b = len(img)
    pos = torch.eye(b, dtype=torch.bool, device=img.device)
    if texts is not None:
        if len(texts) != b:
            raise ValueError(f"texts has {len(texts)} strings for a batch of {b}")
        pos = pos | torch.tensor([[a == c for c in texts] for a in texts], device=img.device)
    return contrastive_from_logits(logits, pos).mean() + contrastive_from_logits(logits.T, pos.T).mean()


def multi_label_contrastive(img: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float,
                            pad: torch.Tensor | None = None, label_strings: list | None = None) -> torch.Tensor:
    """Eq 24-26: image ``i`` against the ``K`` labels of every image, ``img [B, P]``, ``labels [B, K, P]``
    (L2-normalised), ``scale = 1 / tau``.

    ``L_{I->{T_k}} = -1/B sum_i log(sum_k e^{s Z_i.T_ik} / sum_{j,k} e^{s Z_i.T_jk})`` and
    ``L_{{T_k}->I} = -1/(KB) sum_{i,k} log(e^{s T_ik.Z_i} / sum_j e^{s T_ik.Z_j})``.

    ``pad [B, K]`` (True = ``<PAD>``, section 5.7): those labels' embeddings are nulled and they leave
    every sum (neither positives nor negatives; their text->image terms are not averaged).
    ``label_strings`` (``B`` lists of ``K`` raw label strings): the non-noisy loss of section 5.10 - a label of
    image ``j`` equal to one of image ``i``'s is a positive for ``i`` too. Without repeats it equals the plain loss."""
    b, k, _ = labels.shape
    flat, pad = _null_pads(labels, pad)
    return _label_contrastive(scale * img @ flat.T, b, k, pad, label_strings)      # logits [B, B*K]


def _null_pads(labels: torch.Tensor, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels [B, K, P]`` flattened to ``[B*K, P]`` with the ``<PAD>`` embeddings nulled (section 5.7), and
    ``pad [B, K]`` as a bool tensor on their device (all False when ``None``)."""
    b, k, p = labels.shape
    pad = torch.zeros(b, k, dtype=torch.bool) if pad is None else pad
    pad = pad.to(labels.device).bool()
    return labels.masked_fill(pad[..., None], 0.0).reshape(b * k, p), pad


def _label_contrastive(logits: torch.Tensor, b: int, k: int, pad: torch.Tensor, label_strings=None) -> torch.Tensor:
    """Both directions of Eq 24-26 from image-label ``logits [B, B*K]`` (label ``j*K + k`` is image ``j``'s
    ``k``-th); ``pad`` and ``label_strings`` as in :func:`multi_label_contrastive`."""
    dev = logits.device
    pad = pad.to(dev).bool()
    owner = torch.arange(b, device=dev).repeat_interleave(k)        # image of each label
    pos = owner[None, :] == torch.arange(b, device=dev)[:, None]    # [B, B*K]
    if label_strings is not None:
        if len(label_strings) != b or any(len(s) != k for s in label_strings):
            raise ValueError(f"label_strings must be {b} lists of {k} strings")
        flat_s = [s for row in label_strings for s in row]
        sets = [set(s for s, m in zip(row, pm) if not m) for row, pm in zip(label_strings, pad.tolist())]
        pos = pos | torch.tensor([[s in sets[i] for s in flat_s] for i in range(b)], device=dev)
    valid = ~pad.reshape(-1)
    has = (pos & valid).any(1)                                      # images with at least one real label
    i2t = contrastive_from_logits(logits[has], pos[has], valid).mean() if has.any() else logits.sum() * 0
    t_logits = logits.T[valid]                                      # [L, B] real labels
    t_pos = pos.T[valid]
    t2i = contrastive_from_logits(t_logits, t_pos).mean() if len(t_logits) else logits.sum() * 0
    return i2t + t2i


def group_label_contrastive(group_embeds: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float,
                            pad: torch.Tensor | None = None, label_strings: list | None = None) -> torch.Tensor:
    """The multi-label loss (Eq 24-26) with each image represented, for each label, by its best-matching
    final group: ``logit(i, label) = scale * max_g Z_ig . T_label`` for ``group_embeds [B, G, P]`` and
    ``labels [B, K, P]`` (L2-normalised; ``pad`` / ``label_strings`` as in :func:`multi_label_contrastive`).
    Not in the thesis: the image-level loss is satisfied by the mean of the groups, so nothing asks a group
    to stand for one label; here a label is found only if one group alone matches it, which is what
    zero-shot segmentation reads (each group takes the label it matches best)."""
    b, k, _ = labels.shape
    flat, pad = _null_pads(labels, pad)
    sims = torch.einsum("igp,lp->igl", group_embeds, flat)                          # [B, G, B*K]
    return _label_contrastive(scale * sims.max(1).values, b, k, pad, label_strings)


def affinity_logits(group_embeds: torch.Tensor, label_embeds: torch.Tensor, scale: torch.Tensor | float):
    """Eq 28 per image: ``A_ST = scale K^I Z^T``, ``[B, G, P] x [B, K, P] -> [B, G, K]``."""
    return scale * group_embeds @ label_embeds.transpose(-1, -2)


def ge_loss(attn: torch.Tensor) -> torch.Tensor:
    """Eq 37, GE: mean entropy of every patch over the final groups, ``attn [B, G, N]`` (Eq 32)."""
    return ent.group_entropy_loss(attn)


def group_balance_loss(soft: list) -> torch.Tensor:
    """Group usage balance, an addition that is not in the thesis: per image and grouping stage,
    ``1 - H(u) / log G`` of the mean soft assignment ``u = mean_j soft[:, :, j]`` over the stage's ``G``
    groups; 0 when the groups take equal shares, 1 when one group takes every segment. ``soft``: the stages'
    ``[B, G, N]`` assignments (``ImageOutput.soft``).

    Why: a small GroupViT trained from scratch keeps its soft assignments flat, so during training the
    Gumbel noise groups at random and at inference the argmax puts everything in one group; sharpening them
    with GE (Eq 37) alone makes the last stage collapse onto one group. GE sharpens each patch's assignment,
    this term spreads the patches over the groups (measured in the README, "Tiny offline GroupViT")."""
    terms = []
    for a in soft:
        g = a.shape[1]
        if g < 2:
            continue
        terms.append(1 - ent.entropy(a.float().mean(-1), -1) / math.log(g))           # [B]
    if not terms:
        return soft[0].sum() * 0 if soft else torch.zeros(())
    return torch.stack(terms).mean()


def le_loss(attn: torch.Tensor, a_st: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Eq 39-41, LE: mean entropy of every patch over the image's labels; ``a_st [B, G, K]`` logits, ``<PAD>``
    labels (``pad [B, K]``) removed from the softmax. Images without real labels are skipped."""
    if pad is None:
        return ent.label_entropy_loss(attn, a_st)
    keep = ~pad.all(1)
    if not keep.any():
        return a_st.sum() * 0
    a = a_st[keep].masked_fill(pad[keep][:, None, :], float("-inf"))
    return ent.label_entropy_loss(attn[keep], a)


def se_loss(a_st: torch.Tensor, pad: torch.Tensor | None = None, w_groups: float = 0.2, w_labels: float = 0.1):
    """Eq 42-44, SE: ``0.2 * mean_i H(row i over labels) + 0.1 * mean_j H(column j over groups)`` of ``a_st
    [B, G, K]``; ``<PAD>`` columns are left out of both terms."""
    if pad is None:
        return ent.segment_affinity_entropy(a_st, w_groups, w_labels)
    keep = ~pad.all(1)
    if not keep.any():
        return a_st.sum() * 0
    a, m = a_st[keep], pad[keep]
    rows = ent.entropy(F.softmax(a.masked_fill(m[:, None, :], float("-inf")), -1), -1).mean(-1)   # [B']
    cols = ent.entropy(F.softmax(a, -2), -2)                                                      # [B', K]
    real = (~m).float()
    cols = (cols * real).sum(-1) / real.sum(-1)
    return (w_groups * rows + w_labels * cols).mean()


def dino_similarity(feats: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Cosine similarity of DINO patch features ``[B, N, D]`` (or ``[B, h, w, D]``) -> ``DINOsim [B, N, N]``.
    ``center``: subtract each image's mean feature first, for backbones whose patch features share a large
    common component (the tiny DINO's keys: every raw cosine near 1, so a softmax target would be flat)."""
    f = feats.reshape(feats.shape[0], -1, feats.shape[-1]).float()
    if center:
        f = f - f.mean(1, keepdim=True)
    f = F.normalize(f, dim=-1)
    return f @ f.transpose(1, 2)


def dino_distillation_loss(attn: torch.Tensor, dino_sim: torch.Tensor, temperature: float = 1.0,
                           reduction: str = "mean", eps: float = 1e-8, row_normalize: bool = False) -> torch.Tensor:
    """Eq 52: ``-sum_ij softmax(DINOsim / t)_ij log((Attn^T Attn)_ij)`` with ``attn [B, G, N]`` (soft chained
    attention, Eq 32) and ``dino_sim [B, N, N]`` (row-wise softmax, teacher). ``reduction="sum"`` is Eq 52
    per image (then the batch mean); ``"mean"`` divides by ``N`` (mean cross-entropy per row).

    As written, Eq 52 has a trivial minimum: with every patch in one group ``Attn^T Attn`` is all ones and
    the loss is 0 whatever the target (entries are <= 1, so no grouping scores better). ``row_normalize``
    (not in the thesis) divides each row of ``Attn^T Attn`` by its sum, making it a distribution, so the
    loss is a proper cross-entropy: the one-group collapse then scores ``log N`` and a grouping that follows
    DINO's affinity scores lower."""
    if attn.shape[-1] != dino_sim.shape[-1] or dino_sim.shape[-1] != dino_sim.shape[-2]:
        raise ValueError(f"attn {tuple(attn.shape)} and dino_sim {tuple(dino_sim.shape)} disagree on the patches")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    target = F.softmax(dino_sim.float() / temperature, dim=-1)
    student = attn.transpose(1, 2) @ attn                            # [B, N, N], entries in [0, 1]
    if row_normalize:
        student = student / student.sum(-1, keepdim=True).clamp_min(eps)
    ce = -(target * torch.log(student.clamp_min(eps))).sum((-1, -2))
    if reduction == "mean":
        ce = ce / attn.shape[-1]
    return ce.mean()


# ============================================================================================== components
def components(model: gv.GroupViT) -> dict[str, list[str]]:
    """Trainable component name -> module prefixes (thesis Table 5): ``grouping_blocks`` (all),
    ``grouping_block1`` / ``grouping_block2`` ..., ``img_projector``, ``text_projector``, ``projectors``
    (both), ``img_encoder``, ``text_encoder``, ``logit_scale`` (both temperatures), ``all``."""
    n = sum(1 for st in model.img_encoder.layers if st.downsample is not None)
    gbs = [f"img_encoder.layers.{i}.downsample." for i in range(n)]
    out = {"grouping_blocks": gbs, "img_projector": ["img_projector."], "text_projector": ["text_projector."],
           "projectors": ["img_projector.", "text_projector."], "img_encoder": ["img_encoder."],
           "text_encoder": ["text_encoder."], "logit_scale": ["logit_scale", "multi_label_logit_scale"],
           "all": [""]}
    out.update({f"grouping_block{i + 1}": [p] for i, p in enumerate(gbs)})
    return out


def set_trainable(model: gv.GroupViT, names) -> list[str]:
    """Freeze everything except the named components (a list or a ``"+"``/``","``-separated string, e.g.
    ``"grouping_blocks+img_projector"``); returns the trainable parameter names."""
    if isinstance(names, str):
        names = [n for n in names.replace("+", ",").split(",") if n.strip()]
    table = components(model)
    bad = [n for n in names if n.strip() not in table]
    if bad or not names:
        raise ValueError(f"unknown trainable components {bad or names!r}; choose from {sorted(table)}")
    prefixes = [p for n in names for p in table[n.strip()]]
    keep = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
        if p.requires_grad:
            keep.append(name)
    return keep


def init_image_encoder(model: gv.GroupViT, vit) -> list[str]:
    """Start GroupViT's image encoder from a plain ViT (a timm ``VisionTransformer`` such as the tiny DINO):
    its patch projection, its patch position embeddings (CLS dropped, resized to the GroupViT grid) and its
    first blocks, in order, as the stages' blocks (``[segments; groups]`` blocks have the same layout). Not
    in the thesis, which fine-tunes a pretrained GroupViT: a GroupViT trained from scratch then starts with
    patch features that already differ between objects and background, instead of flat assignments.
    Group tokens, grouping blocks, the patch LayerNorm and the text side keep their init. Returns the
    GroupViT parameter names that were copied."""
    enc, cfg = model.img_encoder, model.cfg
    d = vit.patch_embed.proj.out_channels
    p = vit.patch_embed.proj.kernel_size[0]
    heads = vit.blocks[0].attn.num_heads
    blocks = [b for st in enc.layers for b in st.blocks]
    if (d, p, heads) != (cfg.embed_dim, cfg.patch_size, cfg.num_heads):
        raise ValueError(f"ViT (width {d}, patch {p}, {heads} heads) does not fit GroupViT (width {cfg.embed_dim}, "
                         f"patch {cfg.patch_size}, {cfg.num_heads} heads); e.g. tiny_dino_synth fits 'random:small128'")
    if len(vit.blocks) < len(blocks):
        raise ValueError(f"ViT has {len(vit.blocks)} blocks, GroupViT's image encoder needs {len(blocks)}")
    names = {id(m): n for n, m in model.named_modules()}
    copied = []
    with torch.no_grad():
        enc.patch_embed.proj.load_state_dict(vit.patch_embed.proj.state_dict())
        copied += ["img_encoder.patch_embed.proj.weight", "img_encoder.patch_embed.proj.bias"]
        pos = vit.pos_embed[:, getattr(vit, "num_prefix_tokens", 1):]
        enc.pos_embed.copy_(gv.interpolate_pos_embed(pos, (cfg.grid, cfg.grid)))
        copied.append("img_encoder.pos_embed")
        for dst, src in zip(blocks, vit.blocks):
            ref = src.state_dict()
            dst.load_state_dict({k: ref[k] for k in dst.state_dict()}, strict=True)
            copied += [f"{names[id(dst)]}.{k}" for k in dst.state_dict()]
    return copied


# ============================================================================================== schedule
def lr_at(step: int, total: int, warmup: int, base: float, min_lr: float, warmup_lr: float,
          cycles: int = 1) -> float:
    """Linear warm-up from ``warmup_lr`` to ``base`` over ``warmup`` steps, then cosine annealing to ``min_lr``
    in ``cycles`` equal restarts (SGDR; the thesis anneals in 2 cycles) until ``total``."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / max(1, warmup)
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    t = (t * cycles) % 1.0 if t < 1.0 else 1.0
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))


# ============================================================================================== data
class CaptionImages(torch.utils.data.Dataset):
    """Images with captions from a COCO captions file (``{"images": [{id, file_name}], "annotations":
    [{image_id, caption}]}``, as COCO's ``captions_train2017.json`` and the synthetic world write it).
    Item: ``(image [3, S, S] ImageNet-normalised, captions list[str])``; ``preload`` keeps decoded tensors
    (small datasets); ``augment="crop"`` adds a random resized crop (scale 0.6-1)."""

    def __init__(self, ann_file, image_root=None, image_size: int = 224, preload: bool = False,
                 augment: str = "none"):
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"captions file {ann_file} not found")
        data = json.loads(ann_file.read_text())
        if "images" not in data or "annotations" not in data:
            raise ValueError(f"{ann_file} is not a COCO captions file (needs 'images' and 'annotations')")
        if augment not in ("none", "crop"):
            raise ValueError(f"augment must be 'none' or 'crop', got {augment!r}")
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        self.images = [im for im in data["images"] if im["id"] in caps]
        self.captions = [caps[im["id"]] for im in self.images]
        self.root = Path(image_root) if image_root else ann_file.parent / "images"
        self.size, self.augment = int(image_size), augment
        self._cache = [self._load(i) for i in range(len(self.images))] if preload else None

    def __len__(self):
        return len(self.images)

    def _load(self, i):
        from .data import image_to_tensor, load_image
        return image_to_tensor(load_image(self.root / self.images[i]["file_name"]), self.size)

    def __getitem__(self, i):
        x = self._cache[i] if self._cache is not None else self._load(i)
        if self.augment == "crop":
            s = self.size
            scale = random.uniform(0.6, 1.0)
            c = max(8, int(round(s * math.sqrt(scale))))
            y0, x0 = random.randint(0, s - c), random.randint(0, s - c)
            x = F.interpolate(x[None, :, y0:y0 + c, x0:x0 + c], size=(s, s), mode="bilinear",
                              align_corners=False)[0]
        return x, self.captions[i]


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def synthetic_captions(n_images: int, seed: int = 0, size: int = 64, split: str = "train", n_objects=(1, 3),
                       scale=OBJECT_SCALE) -> Path:
    """The cached synthetic world split (``captions_<split>.json`` path; images under ``images/``);
    ``scale``: object diameters as fractions of the image side (:func:`nbsupport.data.synthetic.render_scene`)."""
    from .data.synthetic import synthetic_dataset
    scale = tuple(float(x) for x in scale)
    kw = {} if scale == OBJECT_SCALE else {"scale": scale}       # the default keeps the plain world's cache key
    return synthetic_dataset(n_images=n_images, seed=seed, size=size, split=split,
                             n_objects=tuple(n_objects), **kw) / f"captions_{split}.json"


# ============================================================================================== validation
def synthetic_class_names(kind: str = "name"):
    """Object class names of the synthetic world (``"name"``: "striped triangle", ``"noun"``: "triangle")
    and its background names (scored as extra classes that map to background 0)."""
    from .data.synthetic import BACKGROUNDS, CLASSES
    if kind not in ("name", "noun"):
        raise ValueError(f"class name kind must be 'name' or 'noun', got {kind!r}")
    return [c.name if kind == "name" else c.noun for c in CLASSES], list(BACKGROUNDS)


def synthetic_scenes(n_images: int, seed: int = 0, size: int = 64, split: str = "val"):
    """``(images [n, 3, size, size] normalised, semantic [n, size, size] int64)`` of the synthetic split's
    first ``n_images`` scenes (the same scenes ``synthetic_dataset(split=...)`` writes)."""
    from .data import image_to_tensor
    from .data.synthetic import render_scene, scene_rng
    scenes = [render_scene(scene_rng(seed, split, i), size=size) for i in range(n_images)]
    return (torch.stack([image_to_tensor(s.image) for s in scenes]),
            torch.from_numpy(np.stack([s.semantic for s in scenes]).astype(np.int64)))


@torch.no_grad()
def zero_shot_miou(model: gv.GroupViT, images: torch.Tensor, semantic: torch.Tensor, class_names,
                   background_names=(), templates=textmod.TEMPLATES, bg_thresh: float | None = None,
                   batch_size: int = 32) -> dict:
    """Zero-shot segmentation mIoU (thesis section 4.6) with :func:`nbsupport.groupvit.segment_logits`:
    object classes ``1..C`` = ``class_names``; ``background_names`` are scored as classes too and map to 0;
    ``bg_thresh`` adds GroupViT's background threshold. Returns ``{"miou", "iou" (per class incl. 0),
    "conf"}`` (percent)."""
    from . import metrics
    was = model.training
    model.eval()
    names = list(class_names) + list(background_names)
    te = gv.text_embeddings(model, names, templates)
    dev = next(model.parameters()).device
    n_obj = len(class_names)
    conf = np.zeros((n_obj + 1, n_obj + 1), np.int64)
    for s in range(0, len(images), batch_size):
        lg = gv.segment_logits(model, images[s:s + batch_size].to(dev), te, topk=5, bg_thresh=bg_thresh)
        pred = lg.argmax(1).cpu()
        if bg_thresh is None:
            pred = torch.where(pred < n_obj, pred + 1, torch.zeros_like(pred))
        else:                                  # channel 0 = background, 1..C objects, then background names
            pred = torch.where(pred <= n_obj, pred, torch.zeros_like(pred))
        conf += metrics.confusion_matrix(pred.numpy(), semantic[s:s + batch_size].numpy(), n_obj + 1)
    model.train(was)
    return {"miou": metrics.miou(conf), "iou": (metrics.iou_per_class(conf) * 100).tolist(), "conf": conf}


# ============================================================================================== training
@dataclass
class TrainConfig:
    """Everything a run needs; every field is also a ``groupvit-train`` option (``--field-name``)."""
    out_dir: str = "runs/groupvit-train"
    model: str = "small"            # groupvit.load name or path (official weights to fine-tune, random:<config>)
    seed: int = 0
    data: str = "synthetic"         # synthetic | path to a COCO captions JSON (e.g. captions_train2017.json)
    image_root: str = ""            # image folder for a COCO captions file (default: images/ beside it)
    n_train: int = 512              # synthetic training scenes
    min_objects: int = 1            # objects per synthetic training scene (validation always uses 1-3)
    max_objects: int = 3
    min_object_scale: float = OBJECT_SCALE[0]   # synthetic training objects' diameter / image side (validation:
    max_object_scale: float = OBJECT_SCALE[1]   # always the world's default, synthetic.OBJECT_SCALE)
    image_size: int = 64            # training resolution (the thesis: 224, then 384)
    augment: str = "none"           # none | crop
    epochs: int = 2
    batch_size: int = 32            # per process; global = batch_size x world size
    lr: float = 1e-3                # base learning rate (thesis fine-tuning: 1.6e-3 x 256/4096 = 1e-4)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    cycles: int = 1                 # cosine restarts (the thesis: 2)
    weight_decay: float = 0.05
    clip: float = 5.0
    trainable: str = "all"          # '+'-joined components: grouping_blocks, img_projector, projectors, ...
    num_labels: int = 3             # K labels per caption (0: caption-only contrastive loss)
    label_kind: str = "nouns"       # nouns | np | np+nouns
    pad: str = "pad"                # pad (<PAD> nulled, thesis 5.7) | repeat (the caption, original)
    tagger: str = "auto"            # auto | perceptron | wordnet | lexicon
    min_label_count: int = 0        # > 0: curated labels seen >= this many times come first (thesis 5.7.1)
    non_noisy: bool = False         # identical label strings in the batch are positives (thesis 5.10)
    w_multi_label: float = 1.0
    w_ge: float = 0.0
    w_le: float = 0.0
    w_se: float = 0.0
    w_dino: float = 0.0
    w_balance: float = 0.0          # group usage balance (group_balance_loss; not in the thesis)
    w_group_label: float = 0.0      # group_label_contrastive (best group per label; not in the thesis)
    dino_backbone: str = "random_tiny8"
    dino_layer: int = 9
    dino_variant: str = "eq52"      # eq52 (thesis) | rownorm (row-normalised Attn^T Attn, per-image centred keys)
    dino_temperature: float = 1.0   # softmax temperature of the DINO affinity target
    context_length: int = 77        # text tokens (shorter is faster for short captions)
    amp: bool = True                # autocast on CUDA only
    device: str = "auto"            # auto | cpu | cuda
    num_workers: int = 0
    log_every: int = 10
    val_images: int = 64            # synthetic validation scenes for per-epoch mIoU (0: off)
    val_size: int = 64
    val_class_names: str = "name"   # name ("striped triangle") | noun ("triangle")
    max_minutes: float = 0.0        # > 0: stop (checkpoint + validation) after this many minutes
    resume: bool = True             # continue from out_dir/last.pt when present
    threads: int = 0                # > 0: torch.set_num_threads
    init_image: str = ""            # a timm ViT (backbones.load name/path, e.g. tiny_dino_synth) whose patch
                                    # embedding, position embedding and blocks initialise the image encoder

    def validate(self):
        if self.label_kind not in textmod.KINDS:
            raise ValueError(f"label_kind must be one of {textmod.KINDS}, got {self.label_kind!r}")
        if self.pad not in ("pad", "repeat"):
            raise ValueError(f"pad must be 'pad' or 'repeat', got {self.pad!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (contrastive losses need negatives)")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.dino_variant not in ("eq52", "rownorm"):
            raise ValueError(f"dino_variant must be 'eq52' or 'rownorm', got {self.dino_variant!r}")
        if self.dino_temperature <= 0:
            raise ValueError(f"dino_temperature must be > 0, got {self.dino_temperature}")


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping gradients (``torch.distributed.nn``); identity without DDP."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return x
    import warnings
    from torch.distributed.nn.functional import all_gather     # differentiable (backward: reduce-scatter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), 0)


def gather_objects(obj: list) -> list:
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return [x for part in out for x in part]


class LabelSampler:
    """Per-caption labels (:func:`nbsupport.text.extract_labels`) with the caption's candidate pool cached."""

    def __init__(self, cfg: TrainConfig, vocabulary=None, seed: int = 0):
        self.cfg, self.vocab = cfg, vocabulary
        self.tagger = textmod.get_tagger(cfg.tagger)
        self.rng = random.Random(seed)
        self._pools: dict[str, list[str]] = {}

    def __call__(self, caption: str) -> textmod.Labels:
        pool = self._pools.get(caption)
        if pool is None:
            pool = self._pools[caption] = textmod.candidates(caption, self.cfg.label_kind, self.tagger)
        return textmod.labels_from_candidates(caption, pool, self.cfg.num_labels, self.cfg.pad,
                                              textmod.TEMPLATES, self.rng, self.vocab)


def compute_losses(model: gv.GroupViT, images: torch.Tensor, captions: list[str], labels: list | None,
                   cfg: TrainConfig, dino: dict | None = None) -> dict[str, torch.Tensor]:
    """One forward pass and every loss of the run (weights from ``cfg``): ``{"loss", "itc", "mlc", "ge",
    "le", "se", "dino"}`` (only the active terms). ``labels``: one :class:`nbsupport.text.Labels` per image."""
    core = model.module if hasattr(model, "module") else model
    tok = gv.tokenizer()
    dev = images.device
    L = cfg.context_length
    out = core.encode_image(images)
    cap = core.encode_text(tok(captions, context_length=L).to(dev))
    img_all, cap_all = gather(out.image_embeds), gather(cap)
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
        strings = gather_objects([l.raw for l in labels]) if cfg.non_noisy else None
        if cfg.w_multi_label:
            losses["mlc"] = cfg.w_multi_label * multi_label_contrastive(img_all, gather(lab), ml_scale,
                                                                        gather(pad), strings)
        if cfg.w_group_label:
            losses["glc"] = cfg.w_group_label * group_label_contrastive(gather(out.group_embeds), gather(lab),
                                                                        ml_scale, gather(pad), strings)
    if cfg.w_ge:
        losses["ge"] = cfg.w_ge * ge_loss(out.attn)
    if cfg.w_balance:
        losses["balance"] = cfg.w_balance * group_balance_loss(out.soft)
    if (cfg.w_le or cfg.w_se) and lab is not None:
        a_st = affinity_logits(out.group_embeds, lab, core.scale)
        if cfg.w_le:
            losses["le"] = cfg.w_le * le_loss(out.attn, a_st, pad)
        if cfg.w_se:
            losses["se"] = cfg.w_se * se_loss(a_st, pad)
    if cfg.w_dino and dino is not None:
        from . import features
        with torch.no_grad():
            f = features.extract(dino["model"], images, "key", dino["layer"])         # [B, h, w, D]
            if tuple(f.shape[1:3]) != tuple(out.grid):
                f = F.interpolate(f.permute(0, 3, 1, 2), size=out.grid, mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            rownorm = cfg.dino_variant == "rownorm"
            sim = dino_similarity(f, center=rownorm)
        losses["dino"] = cfg.w_dino * dino_distillation_loss(out.attn, sim, cfg.dino_temperature,
                                                             row_normalize=rownorm)
    losses["loss"] = sum(losses.values())
    return losses


class _LossModule(torch.nn.Module):
    """``forward(images, captions, labels) -> losses`` around the model, so DDP wraps the whole loss step."""

    def __init__(self, model, cfg, dino):
        super().__init__()
        self.model, self.cfg, self.dino = model, cfg, dino

    def forward(self, images, captions, labels):
        return compute_losses(self.model, images, captions, labels, self.cfg, self.dino)


def save_checkpoint(path, model, optimizer=None, scaler=None, **meta) -> Path:
    """Atomic checkpoint (write ``<path>.tmp``, then ``os.replace``) holding tensors, numbers and strings only,
    so :func:`load_checkpoint` reads it with ``weights_only=True``."""
    core = model.module if hasattr(model, "module") else model
    state = {"model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
             "optimizer": optimizer.state_dict() if optimizer is not None else {},
             "scaler": scaler.state_dict() if scaler is not None else {}, **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code from the file runs)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def export_safetensors(model, path, description: str = "") -> Path:
    """The model's weights as ``.safetensors`` (loadable by :func:`nbsupport.groupvit.load`)."""
    from safetensors.torch import save_file
    core = model.module if hasattr(model, "module") else model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}, str(path),
              metadata={"description": description} if description else None)
    return path


def _append_jsonl(path: Path, rec: dict):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_metrics(path) -> list[dict]:
    """Records of a run's ``metrics.jsonl``."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def train(cfg: TrainConfig, model: gv.GroupViT | None = None, progress=None) -> dict:
    """Train / fine-tune a GroupViT (see the module docstring); returns ``{"model", "out_dir", "history",
    "val"}``. Under ``torchrun`` each process trains on its shard; rank 0 writes ``out_dir``: ``last.pt``
    (atomic, resumed when ``cfg.resume``), ``metrics.jsonl``, ``config.json``, ``final.safetensors``."""
    cfg.validate()
    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world, rank, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), \
        int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if world > 1 and _dist() is None:
        import torch.distributed as dist
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(dev)
    main = rank == 0
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    # data
    if cfg.data == "synthetic":
        ann = synthetic_captions(cfg.n_train, cfg.seed, cfg.image_size, "train", (cfg.min_objects, cfg.max_objects),
                                 (cfg.min_object_scale, cfg.max_object_scale))
        ds = CaptionImages(ann, None, cfg.image_size, preload=True, augment=cfg.augment)
    else:
        ds = CaptionImages(cfg.data, cfg.image_root or None, cfg.image_size, preload=False, augment=cfg.augment)
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=cfg.seed, drop_last=True) \
        if world > 1 else None
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                                         drop_last=True, collate_fn=_collate, num_workers=cfg.num_workers,
                                         generator=g)
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
    model = model if model is not None else gv.load(cfg.model, seed=cfg.seed)
    if cfg.init_image and not resuming:     # a resumed run has its own weights
        from . import backbones
        copied = init_image_encoder(model, backbones.load(cfg.init_image))
        if main:
            log.info("groupvit-train: image encoder initialised from %s (%d tensors)", cfg.init_image, len(copied))
    model = model.to(dev).train()
    trainable = set_trainable(model, cfg.trainable)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "token" not in n
             and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim > 1 and "token" not in n
                                                                                    and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    dino = None
    if cfg.w_dino:
        from . import backbones
        dino = {"model": backbones.load(cfg.dino_backbone, device=dev), "layer": cfg.dino_layer}
    steps_per_epoch, step, start_epoch = len(loader), 0, 0
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if resuming:
        st = load_checkpoint(ckpt)
        model.load_state_dict(st["model"])
        if st.get("optimizer"):
            opt.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        step, start_epoch = int(st["step"]), int(st["epoch"])
        if main:
            log.info("groupvit-train: resumed from %s at epoch %d step %d", ckpt, start_epoch, step)
    net = _LossModule(model, cfg, dino)
    if world > 1:   # the forward must go through DDP for its gradient all-reduce
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local] if use_cuda else None,
                                                        find_unused_parameters=True)
    val_data = synthetic_scenes(cfg.val_images, cfg.seed, cfg.val_size) if (main and cfg.val_images) else None
    names, bgs = synthetic_class_names(cfg.val_class_names)
    metrics_path = out_dir / "metrics.jsonl"
    history, val = [], None
    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        g.manual_seed(cfg.seed + epoch)
        model.train()
        for images, caps in loader:
            lr = lr_at(step, total, warm, cfg.lr, cfg.min_lr, cfg.warmup_lr, cfg.cycles)
            for grp in opt.param_groups:
                grp["lr"] = lr
            captions = [labeler.rng.choice(c) for c in caps]
            labels = [labeler(c) for c in captions] if cfg.num_labels > 0 else None
            images = images.to(dev, non_blocking=True)
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
            if main and (step % cfg.log_every == 0 or step == 1):
                rec = {"type": "train", "epoch": epoch, "step": step, "lr": lr, "grad_norm": float(gnorm),
                       "minutes": (time.time() - t0) / 60, **{k: float(v.detach()) for k, v in losses.items()}}
                _append_jsonl(metrics_path, rec)
                history.append(rec)
                if progress:
                    progress(rec)
            if cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes:
                stop = True
                break
        done_epoch = epoch + (0 if stop else 1)
        if main:
            save_checkpoint(ckpt, model, opt, scaler, epoch=done_epoch, step=step,
                            config=json.dumps(dataclasses.asdict(cfg)))
            if val_data is not None:
                r = zero_shot_miou(model, *val_data, names, bgs)
                val = {"type": "val", "epoch": done_epoch, "step": step, "miou": r["miou"], "iou": r["iou"],
                       "minutes": (time.time() - t0) / 60}
                _append_jsonl(metrics_path, val)
                history.append(val)
                if progress:
                    progress(val)
        if stop:
            if main:
                log.info("groupvit-train: max_minutes %.1f reached at step %d", cfg.max_minutes, step)
            break
    model.eval()
    if main:
        export_safetensors(model, out_dir / "final.safetensors", f"groupvit-train {cfg.model} {cfg.data}")
    return {"model": model, "out_dir": out_dir, "history": history, "val": val, "trainable": trainable}


# ============================================================================================== CLI
#: Named runs: ``groupvit-train --recipe NAME`` starts from these values (explicit options still override).
RECIPES = {
    # the offline model to ship as data/weights/tiny_groupvit_synth.safetensors: GroupViT "small" from scratch
    # on 1000 synthetic 64 px scenes with their captions, noun-phrase + noun labels, non-noisy multi-label loss;
    # ~25 min on one CPU thread. Measured (200 val scenes): zero-shot mIoU 9.0 vs 0.9-10.1 for random inits and
    # 12.7 for "all background" - NOT yet above the bar, so no weights are shipped (see the README)
    "tiny_groupvit_synth": dict(out_dir="runs/tiny_groupvit_synth", model="small", seed=0, n_train=1000,
                                image_size=64, batch_size=32, epochs=100, lr=5e-4, min_lr=1e-5, warmup_epochs=2.0,
                                label_kind="np+nouns", num_labels=3, pad="pad", non_noisy=True, context_length=24,
                                val_images=64, val_size=64, threads=1, log_every=25, max_minutes=48.0),
}
RECIPE_EXPORTS = {"tiny_groupvit_synth": "data/weights/tiny_groupvit_synth.safetensors"}

def _add_config_args(p: argparse.ArgumentParser):
    from .__main__ import cli_bool
    for f in dataclasses.fields(TrainConfig):
        opt = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(opt, type=cli_bool, default=None,
                           metavar="BOOL", help=f"(default {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            p.add_argument(opt, type=typ, default=None, help=f"(default {f.default!r})")


def add_cli(subparsers):
    """Registers ``python -m nbsupport groupvit-train`` (every :class:`TrainConfig` field is an option)."""
    p = subparsers.add_parser("groupvit-train", help="train / fine-tune GroupViT (thesis 5.5-5.10)",
                              description=__doc__.split("\n\n")[0])
    _add_config_args(p)
    p.add_argument("--export", default="", help="also copy the final weights to this .safetensors path")
    p.add_argument("--recipe", default="", choices=[""] + sorted(RECIPES),
                   help="start from a named configuration (RECIPES); explicit options override it")
    p.set_defaults(func=_run_cli)


def beats_floors(model, cfg: TrainConfig, margin: float = 5.0, n_images: int = 200) -> tuple[bool, str]:
    """Whether ``model``'s zero-shot mIoU on ``n_images`` synthetic validation scenes beats a random init of the
    same architecture (seeds 0-2) and the all-background prediction by ``margin`` points; and the numbers."""
    from . import metrics
    imgs, sem = synthetic_scenes(n_images, 0, cfg.val_size)
    names, bgs = synthetic_class_names(cfg.val_class_names)
    core = model.module if hasattr(model, "module") else model
    trained = zero_shot_miou(core, imgs, sem, names, bgs)["miou"]
    rand = max(zero_shot_miou(init_like(core, s), imgs, sem, names, bgs)["miou"] for s in range(3))
    bg = metrics.miou(metrics.confusion_matrix(np.zeros_like(sem.numpy()), sem.numpy(), len(names) + 1))
    floor = max(rand, bg)
    return trained > floor + margin, f"(mIoU {trained:.2f}; best random init {rand:.2f}, all-background {bg:.2f})"


def init_like(model: gv.GroupViT, seed: int = 0) -> gv.GroupViT:
    """A seeded random init of ``model``'s architecture (eval mode)."""
    return gv.init_weights(gv.GroupViT(model.cfg), seed).eval()


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``groupvit-train`` options: defaults, then the ``--recipe`` values,
    then every option given explicitly; a recipe also sets ``--export`` to its shipped file."""
    vals = dict(RECIPES.get(args.recipe, {}))
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name, None) is not None:
            vals[f.name] = getattr(args, f.name)
    if args.recipe and not args.export and args.recipe in RECIPE_EXPORTS:
        from . import paths
        args.export = str(paths.project_root() / RECIPE_EXPORTS[args.recipe])
    return TrainConfig(**vals)


def _run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = config_from_args(args)
    res = train(cfg, progress=lambda r: print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                            for k, v in r.items() if k != "iou"}), flush=True))
    if args.export and int(os.environ.get("RANK", 0)) == 0:
        ok, why = True, ""
        if args.recipe in RECIPE_EXPORTS:     # shipped weights must beat the floors clearly
            ok, why = beats_floors(res["model"], cfg)
        if ok:
            export_safetensors(res["model"], args.export, f"groupvit-train {cfg.model} {cfg.data}")
            print("exported", args.export, why)
        else:
            print(f"not exported to {args.export}: {why}; the weights are in {res['out_dir']}/final.safetensors")
    d = _dist()
    if d is not None:
        d.destroy_process_group()
    return 0
