"""A compact DINO self-distillation trainer (thesis section 3.2, Eq 10-11) for timm ViTs of any size.

A student and a momentum teacher see different crops of the same image: the 2 global crops go through
the teacher, all crops (global + local) through the student. Each network ends in a projection head
with a weight-normalised last layer producing ``K`` prototype scores. The image-level loss is the
cross-entropy between the teacher's *centred and sharpened* distribution (temperature ``tau_t``, centre
``c`` an EMA of teacher outputs) and the student's distribution (``tau_s``) over every pair of different
views (Eq 11). The teacher is an exponential moving average of the student (Eq 10), momentum
cosine-scheduled to 1.

Plain CLS-token DINO learns *dense* (patch) features slowly at small budgets, so an optional patch-level
term (``dense_weight > 0``) applies the same centred/sharpened cross-entropy to patch tokens: each student
patch predicts the teacher's patch distribution at the *same image location* in the other global crop
(crop geometry is tracked, the teacher grid is bilinearly sampled there), and, when ``mask_ratio > 0``,
iBOT-style masked patches of a global crop predict the teacher's unmasked view of that crop.
The patch term has its own centre. With ``dense_weight=0`` it is plain DINO.

Runs on CPU (tests, the tiny offline model), one GPU (bf16 autocast) or several with ``torchrun`` (DDP;
centres averaged across processes). Data: the synthetic scene world rendered on the fly (seeded, endless)
or an image folder (``--data PATH``). Checkpoints are written atomically; a run resumes by default with
the same data order and schedules.

    python -m nbsupport dino train --out runs/dino --steps 6000 --max-minutes 50
    python -m nbsupport dino export runs/dino/checkpoint.pth --out data/weights/tiny_dino_synth.safetensors
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
    """MLP -> L2 normalisation -> weight-normalised linear layer to ``out_dim`` prototypes.
    ``[..., in_dim] -> [..., out_dim]``; the last layer's norm is fixed to 1 when ``norm_last_layer``."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 512, bottleneck: int = 128,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Network(nn.Module):
    """Backbone + head. ``forward(crops, masks, dense)`` -> ``(cls [V*B, K], patches)``: ``patches`` is a
    list of ``[B, h, w, K]`` per crop, or ``None`` when ``dense=False``; with ``features=True`` a third
    value, the backbone's CLS features ``[V*B, D]`` (for the KoLeo term). Crops of one resolution run as one
    batch. ``masks``: per crop a bool ``[B, h, w]`` or ``None``: masked patch embeddings are replaced by a
    learned mask token before the position embedding (iBOT)."""

    def __init__(self, backbone: nn.Module, head: DINOHead, mask_token: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, backbone.embed_dim)) if mask_token else None

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm tokens ``[B, 1 + h*w, D]`` of images ``[B, 3, H, W]`` (timm's forward_features, with
        the mask token inserted after the patch embedding)."""
        bb = self.backbone
        x = bb.patch_embed(x)  # [B, h, w, D] (dynamic_img_size)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("masks given but the network has no mask token (built with mask_ratio=0)")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(x)))
        return bb.norm(bb.blocks(x))

    def forward(self, crops: list[torch.Tensor], masks: list | None = None, dense: bool = False,
                features: bool = False):
        masks = masks or [None] * len(crops)
        p = self.backbone.patch_embed.patch_size[0]
        cls, patches, i = [], [], 0
        while i < len(crops):  # group consecutive crops of the same resolution into one forward
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            h, w = crops[i].shape[-2] // p, crops[i].shape[-1] // p
            m = None
            if any(g is not None for g in masks[i:j]):
                m = torch.cat([g if g is not None else torch.zeros(c.shape[0], h, w, dtype=torch.bool, device=c.device)
                               for g, c in zip(masks[i:j], crops[i:j])])
            tok = self.tokens(torch.cat(crops[i:j]), m)
            cls.append(tok[:, 0])
            if dense:
                patches.extend(tok[:, 1:].reshape(-1, h, w, tok.shape[-1]).chunk(j - i))
            i = j
        cls = torch.cat(cls)
        extra = (cls,) if features else ()
        if not dense:
            return (self.head(cls), None) + extra
        out = self.head(torch.cat([cls] + [q.reshape(-1, q.shape[-1]) for q in patches]))  # one head call
        cls_out, k, patch_out = out[:len(cls)], len(cls), []
        for q in patches:
            n = q.shape[0] * q.shape[1] * q.shape[2]
            patch_out.append(out[k:k + n].reshape(*q.shape[:3], -1))
            k += n
        return (cls_out, patch_out) + extra


# --------------------------------------------------------------------------------------------------
# Losses


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (DINOv2; Sablayrolles et al. 2019): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` over
    the L2-normalised rows of ``x [N, D]``. Minimising it spreads the batch over the sphere, a direct push
    against the collapse of every image to one output."""
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 rows, got {x.shape[0]}")
    z = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():  # nearest neighbour by the largest dot product, oneself excluded
        dots = z @ z.T
        dots.fill_diagonal_(-float("inf"))
        nn_idx = dots.argmax(1)
    return -torch.log((z - z[nn_idx]).norm(dim=-1) + eps).mean()


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x


#: Teacher-target schemes of the CLS and patch terms: EMA centre + sharpen (DINO), or Sinkhorn-Knopp (DINOv2).
CENTERINGS = ("center", "sinkhorn")


def check_centering(centering: str) -> None:
    """Raise ``ValueError`` unless ``centering`` is one of :data:`CENTERINGS`."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Balanced teacher targets ``[N, K]`` (SwAV / DINOv2 "Sinkhorn-Knopp centering"): rows of
    ``exp(logits / temp)`` are rescaled alternately so that every prototype receives ``1/K`` of the batch's
    mass and every sample ``1/N``; each returned row sums to 1. An alternative to centre + sharpen that
    cannot collapse to one prototype nor to the uniform distribution. DDP: sums over all processes."""
    q = (logits.float() / temp)
    q = torch.exp(q - q.max()).t()  # [K, N]
    n = torch.tensor(float(q.shape[1]), device=q.device)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist:
        torch.distributed.all_reduce(n)
    k = q.shape[0]

    def total(x):
        if dist:
            torch.distributed.all_reduce(x)
        return x

    q /= total(q.sum())
    for _ in range(iters):
        q /= total(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


class DINOLoss(nn.Module):
    """Eq 11: cross-entropy between centred, sharpened teacher outputs and student outputs over all pairs
    of different views. ``center`` is an EMA of the teacher's batch mean,
    ``c <- m c + (1 - m) mean(teacher_out)`` (``m = center_momentum``), updated after the loss."""

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center"):
        super().__init__()
        check_centering(centering)
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher distributions ``softmax((t - c) / tau_t)`` (or Sinkhorn-Knopp)."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp)
        return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """``student_out``: ``[n_crops * B, K]``; ``teacher_out``: ``[2 * B, K]`` (view-major); ``targets``:
        ``self.targets(teacher_out, teacher_temp)`` when the caller already has them."""
        s = (student_out / self.student_temp).chunk(self.n_crops)
        t = (self.targets(teacher_out, teacher_temp) if targets is None else targets).chunk(2)
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
        mean = _all_reduce_mean(teacher_out.reshape(-1, teacher_out.shape[-1]).mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


def _rot_forward(u: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised crop coordinates ``(u, v)`` (x, y in [0, 1]) before -> after ``torch.rot90(crop, k)``
    (``dims=(-2, -1)``, counter-clockwise): one quarter turn maps ``(u, v) -> (v, 1 - u)``."""
    for _ in range(3):
        turn = k > 0.5
        u, v = torch.where(turn, v, u), torch.where(turn, 1 - u, v)
        k = k - 1
    return u, v


def _rot_inverse(u: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_rot_forward`: undoing ``k`` quarter turns is ``(4 - k) mod 4`` more of them."""
    return _rot_forward(u, v, torch.remainder(4 - k, 4))


def patch_centres(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Source-image coordinates ``(y, x)`` of the patch centres of crops on an ``h x w`` grid: ``[B, h, w, 2]``.

    ``boxes``: ``[B, 5]`` = (top, left, height, width, flipped) of each crop in its source image as
    :class:`MultiCrop` records them (continuous pixel coordinates: a crop covers ``[top, top + height)``),
    or ``[B, 6]`` with the number of counter-clockwise quarter turns applied after the flip."""
    dev = boxes.device
    B = boxes.shape[0]
    v = ((torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h)[None, :, None].expand(B, h, w)
    u = ((torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w)[None, None, :].expand(B, h, w)
    top, left, bh, bw, flip = boxes.float()[:, :5].unbind(-1)
    if boxes.shape[-1] > 5:
        u, v = _rot_inverse(u, v, boxes.float()[:, 5].view(B, 1, 1))
    u = torch.where(flip.view(B, 1, 1) > 0.5, 1 - u, u)
    y = top.view(B, 1, 1) + v * bh.view(B, 1, 1)
    x = left.view(B, 1, 1) + u * bw.view(B, 1, 1)
    return torch.stack([y, x], dim=-1)


def locate_in_crop(points: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where source-image points ``[B, ..., 2]`` (y, x) fall in crops ``boxes [B, 5 or 6]``: ``grid_sample``
    coordinates ``[B, ..., 2]`` (x, y in [-1, 1], align_corners=False) and a bool ``[B, ...]`` inside mask."""
    top, left, bh, bw, flip = boxes.float()[:, :5].unbind(-1)
    shape = (-1,) + (1,) * (points.dim() - 2)
    v = (points[..., 0] - top.view(shape)) / bh.view(shape)
    u = (points[..., 1] - left.view(shape)) / bw.view(shape)
    u = torch.where(flip.view(shape) > 0.5, 1 - u, u)
    if boxes.shape[-1] > 5:
        u, v = _rot_forward(u, v, boxes.float()[:, 5].view(shape))
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return torch.stack([2 * u - 1, 2 * v - 1], dim=-1), inside


class DensePatchLoss(nn.Module):
    """Patch-level DINO term (optional, iBOT-like). For each teacher global view ``t`` and student view
    ``v``: if ``v != t``, every student patch whose centre lies inside crop ``t`` predicts the teacher's
    patch distribution bilinearly sampled at that image location; if ``v == t``, only the student's
    *masked* patches count, predicting the teacher's patch at the same position (masked image modelling).
    Teacher patch outputs are centred by their own EMA centre and sharpened like the CLS term.

    ``image_center=True`` also subtracts, before sharpening, each teacher view's mean patch output
    (per image): the targets then say how a patch differs from the rest of its image, so a feature
    shared by every patch of an image (background, palette: an image "fingerprint", which satisfies the
    plain dense term and is what a tiny model learns first on the synthetic world) no longer helps."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", image_center: bool = False):
        super().__init__()
        check_centering(centering)
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.image_center = image_center
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _image_centred(self, teacher_patches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher outputs the targets are made of: minus each image's mean patch output if ``image_center``."""
        if not self.image_center:
            return teacher_patches
        return [t - t.mean((1, 2), keepdim=True) for t in teacher_patches]

    def targets(self, teacher_patches: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """Per view ``[B, h, w, K]`` target distributions (centre + sharpen, or Sinkhorn-Knopp over all
        patches of both views)."""
        return self._sharpen(self._image_centred(teacher_patches), teacher_temp)

    def _sharpen(self, teacher_patches: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        if self.centering == "sinkhorn":
            flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_patches])
            q = sinkhorn_knopp(flat, teacher_temp).split([t[..., 0].numel() for t in teacher_patches])
            return [x.reshape(t.shape) for x, t in zip(q, teacher_patches)]
        return [F.softmax((t - self.center) / teacher_temp, dim=-1).detach() for t in teacher_patches]

    def forward(self, student_patches: list[torch.Tensor], teacher_patches: list[torch.Tensor],
                boxes: list[torch.Tensor], teacher_temp: float, masks: list | None = None) -> torch.Tensor:
        """``student_patches``: V x ``[B, h_v, w_v, K]``; ``teacher_patches``: 2 x ``[B, h, w, K]``;
        ``boxes``: V x ``[B, 5]``; ``masks``: V x (bool ``[B, h_v, w_v]`` or None)."""
        masks = masks or [None] * len(student_patches)
        total, n = student_patches[0].new_zeros(()), 0
        teacher_patches = self._image_centred(teacher_patches)
        for it, q in enumerate(self._sharpen(teacher_patches, teacher_temp)):  # q: [B, h, w, K]
            q_chw = q.permute(0, 3, 1, 2)
            for iv, sp in enumerate(student_patches):
                if iv == it:
                    if masks[iv] is None or not masks[iv].any():
                        continue
                    valid, qs = masks[iv], q
                else:
                    grid, valid = locate_in_crop(patch_centres(boxes[iv], sp.shape[1], sp.shape[2]), boxes[it])
                    if not valid.any():
                        continue
                    qs = F.grid_sample(q_chw, grid.to(q_chw.dtype), mode="bilinear", padding_mode="border",
                                       align_corners=False).permute(0, 2, 3, 1)  # [B, h_v, w_v, K]
                ce = torch.sum(-qs * F.log_softmax(sp / self.student_temp, dim=-1), dim=-1)
                total = total + ce[valid].mean()
                n += 1
        self.update_center(torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_patches]))
        return total / max(n, 1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        mean = _all_reduce_mean(teacher_out.mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Eq 10: ``teacher <- m * teacher + (1 - m) * student`` for every parameter."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def cosine_schedule(base: float, final: float, steps: int, warmup_steps: int = 0, start: float = 0.0) -> np.ndarray:
    """``[steps]``: linear warm-up from ``start`` to ``base`` over ``warmup_steps``, then cosine from ``base``
    to ``final``: ``final + (base - final) (1 + cos(pi t / T)) / 2`` for ``t = 0..T-1``."""
    if warmup_steps > steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed steps ({steps})")
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest, 1)))
    return np.concatenate([warm, cos])


# --------------------------------------------------------------------------------------------------
# Data


def sample_box(rng: np.random.Generator, H: int, W: int, scale: tuple[float, float],
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(top, left, h, w)``: area fraction in ``scale``, log-uniform aspect ratio;
    the central square after 10 failed tries (as torchvision does)."""
    for _ in range(10):
        a = H * W * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    s = min(H, W)
    return (H - s) // 2, (W - s) // 2, s, s


def block_mask(rng: np.random.Generator, h: int, w: int, ratio: float) -> np.ndarray:
    """bool ``[h, w]`` with about ``ratio * h * w`` patches masked in random rectangles (BEiT/iBOT style)."""
    m = np.zeros((h, w), bool)
    target = int(round(ratio * h * w))
    for _ in range(100):
        if m.sum() >= target:
            break
        area = rng.uniform(1, target - m.sum() + 1)
        r = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        bh = int(np.clip(round(math.sqrt(area * r)), 1, h))
        bw = int(np.clip(round(math.sqrt(area / r)), 1, w))
        y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        m[y:y + bh, x:x + bw] = True
    return m


class MultiCrop:
    """DINO multi-crop on a uint8 image ``[H, W, 3]``, called as ``mc(image, rng)``.

    Returns ``(crops, boxes, masks)``: 2 global crops of ``global_size`` (area scale ``global_scale``) and
    ``n_local`` crops of ``local_size`` (``local_scale``), each float ``[3, S, S]`` ImageNet-normalised;
    ``boxes``: float ``[V, 5]`` (top, left, h, w, flipped; ``[V, 6]`` with the quarter turns when ``rotate > 0``)
    for the dense loss; ``masks``: bool ``[h, w]`` per
    global crop (all False unless ``mask_ratio > 0``: then a crop is masked with probability ``mask_prob``
    at a ratio drawn from ``[0.1, mask_ratio]``). Colour augmentation is strong (jitter with hue rotation,
    channel permutation, grayscale, solarisation on the second view; ``color`` scales it) because in the
    synthetic world colour never tells the class. ``rotate``: probability that a crop is also turned by a
    random non-zero multiple of 90 degrees (recorded in ``boxes``, so the dense term still pairs the same image
    locations): the dense term then rewards orientation-invariant features, as the world's textures have a
    random orientation per instance. Geometry comes from ``rng``, colour from torch's RNG.
    """

    def __init__(self, global_size: int = 64, local_size: int = 32, n_local: int = 4, patch_size: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), color: float = 1.0,
                 mask_ratio: float = 0.0, mask_prob: float = 0.5, rotate: float = 0.0):
        from torchvision.transforms import v2

        from .data import IMAGENET_MEAN, IMAGENET_STD

        for name, s in (("global_size", global_size), ("local_size", local_size)):
            if s <= 0 or s % patch_size:
                raise ValueError(f"{name}={s} must be a positive multiple of patch_size={patch_size}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0 <= rotate <= 1:
            raise ValueError(f"rotate must be a probability in [0, 1], got {rotate}")
        self.rotate = rotate
        self.global_size, self.local_size, self.n_local, self.patch = global_size, local_size, n_local, patch_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.mask_ratio, self.mask_prob = mask_ratio, mask_prob
        colour = []
        if color > 0:
            jitter = v2.ColorJitter(0.4 * color, 0.4 * color, 0.5 * color, min(0.5, 0.5 * color))
            colour = [v2.RandomApply([jitter], p=0.8),
                      v2.RandomApply([v2.RandomChannelPermutation()], p=min(0.5 * color, 1.0)),
                      v2.RandomGrayscale(0.2)]
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.first = v2.Compose(colour + tail)
        self.second = v2.Compose(colour + ([v2.RandomSolarize(128, p=0.2)] if color > 0 else []) + tail)
        self._resized_crop = v2.functional.resized_crop
        self._hflip = v2.functional.horizontal_flip

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def _crop(self, t, rng, size, scale):
        top, left, h, w = sample_box(rng, t.shape[-2], t.shape[-1], scale)
        c = self._resized_crop(t, top, left, h, w, [size, size], antialias=True)
        flip = bool(rng.random() < 0.5)
        if flip:
            c = self._hflip(c)
        box = [top, left, h, w, float(flip)]
        if self.rotate > 0:
            k = int(rng.integers(1, 4)) if rng.random() < self.rotate else 0
            c = torch.rot90(c, k, dims=(-2, -1)) if k else c
            box.append(float(k))
        return c, box

    def __call__(self, image, rng: np.random.Generator):
        """``image``: one uint8 ``[H, W, 3]`` array, or a list of them showing one scene in several
        appearances (same geometry): global crop ``k`` is cut from ``image[k % n]``, the local crops from
        ``image[-1]``."""
        views = [image] if isinstance(image, np.ndarray) else list(image)
        ts = [torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1) for v in views]
        if len({tuple(t.shape) for t in ts}) != 1:
            raise ValueError(f"the appearances of one image must have one shape, got {[tuple(t.shape) for t in ts]}")
        crops, boxes, masks = [], [], []
        g = self.global_size // self.patch
        for k in range(2):
            c, b = self._crop(ts[k % len(ts)], rng, self.global_size, self.global_scale)
            crops.append((self.first if k == 0 else self.second)(c))
            boxes.append(b)
            m = np.zeros((g, g), bool)
            if self.mask_ratio > 0 and rng.random() < self.mask_prob:
                m = block_mask(rng, g, g, rng.uniform(min(0.1, self.mask_ratio), self.mask_ratio))
            masks.append(torch.from_numpy(m))
        for _ in range(self.n_local):
            c, b = self._crop(ts[-1], rng, self.local_size, self.local_scale)
            crops.append(self.first(c))
            boxes.append(b)
        return crops, torch.tensor(boxes, dtype=torch.float32), masks


class CropBatches(torch.utils.data.IterableDataset):
    """Endless, resumable batches of multi-crops. Batch ``b`` of rank ``r`` holds images
    ``(b * world + r) * B + k``, ``k < B``; image ``i`` is synthetic train scene ``i`` (seed ``seed``) or,
    with ``files``, file ``perm_e[i mod n]`` of a per-epoch seeded permutation. Every random choice for
    image ``i`` is seeded by ``(seed, i)``, so a step always sees the same crops: exact resume with any
    number of workers (worker ``w`` makes batches ``w, w + workers, ...``, which the DataLoader reads in
    order). Yields ``(crops: V x [B,3,S,S], boxes: V x [B,5], masks: 2 x [B,h,w])``.

    ``appearance`` (synthetic world only): ``"shared"`` - every crop is cut from one rendering of the scene;
    ``"per-view"`` - the scene is rendered three times with the same geometry and texture patterns but its
    own background and object colours (``render_scene(appearance=...)``): one rendering per global crop and
    one for the local crops. ``per_view_ramp`` > 0 (a curriculum): the image trained on at step ``b`` keeps
    one shared rendering with probability ``max(0, 1 - b / per_view_ramp)``. Not in the thesis: per-view
    removes the shortcut a tiny DINO learns first on this world, an image "fingerprint" (background and
    palette shared by all crops of an image), so that what the views share is the objects. It uses no
    labels, but only a renderer can do it."""

    APPEARANCES = ("shared", "per-view")

    @classmethod
    def check_appearance(cls, appearance: str, synthetic: bool) -> None:
        """Raise ``ValueError`` for an unknown ``appearance`` or a re-rendering one on image-folder data."""
        if appearance not in cls.APPEARANCES:
            raise ValueError(f"appearance must be one of {cls.APPEARANCES}, got {appearance!r}")
        if appearance != "shared" and not synthetic:
            raise ValueError(f"appearance={appearance!r} needs the synthetic world (it re-renders scenes); "
                             "an image folder has one appearance per image")

    def __init__(self, transform: MultiCrop, batch_size: int, size: int = 64, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world: int = 1, files=None, appearance: str = "shared", scene: dict | None = None,
                 per_view_ramp: int = 0):
        self.check_appearance(appearance, synthetic=files is None)
        self.per_view_ramp = per_view_ramp
        self.scene = dict(scene or {})  # extra render_scene arguments (n_objects, scale) for the synthetic world
        self.transform, self.batch_size, self.size, self.seed = transform, batch_size, size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world
        self.files = list(files) if files is not None else None
        self.appearance = appearance

    def image(self, i: int):
        """uint8 ``[H, W, 3]`` image number ``i`` of the stream (a list of 3 with ``appearance="per-view"``)."""
        if self.files is None:
            from .data.synthetic import render_scene, scene_rng

            b = i // (self.batch_size * self.world)  # the step that trains on image i
            shared = (self.per_view_ramp > 0
                      and np.random.default_rng([self.seed, 13, i]).random() < 1 - b / self.per_view_ramp)
            if self.appearance == "per-view" and not shared:
                return [render_scene(scene_rng(self.seed, "train", i), size=self.size, **self.scene,
                                     appearance=np.random.default_rng([self.seed, 11, i, v])).image
                        for v in range(3)]
            return render_scene(scene_rng(self.seed, "train", i), size=self.size, **self.scene).image
        from .data import ImageLoadError, load_image

        n = len(self.files)
        for j in range(i, i + n):
            perm = np.random.default_rng([self.seed, j // n]).permutation(n)
            try:
                return np.asarray(load_image(self.files[perm[j % n]]))
            except ImageLoadError:
                continue  # unreadable file: take the next one in the order
        raise RuntimeError(f"none of the {n} data files is a readable image")

    def sample(self, i: int):
        rng = np.random.default_rng([self.seed, 7, i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 31)))
            return self.transform(self.image(i), rng)

    def batch(self, b: int):
        items = [self.sample((b * self.world + self.rank) * self.batch_size + k) for k in range(self.batch_size)]
        n_views = len(items[0][0])
        crops = [torch.stack([it[0][v] for it in items]) for v in range(n_views)]
        boxes = [torch.stack([it[1][v] for it in items]) for v in range(n_views)]
        masks = [torch.stack([it[2][v] for it in items]) for v in range(2)]
        return crops, boxes, masks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + wid
        while True:
            yield self.batch(b)
            b += nw


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class Config:
    out: str = "runs/dino"
    arch: str = "custom"          # custom (the fields below) | small (ViT-S/8) | base (ViT-B/8)
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    data: str = "synthetic"       # synthetic | path to an image folder
    image_size: int = 64          # global crop size (and synthetic scene size unless scene_size is set)
    scene_size: int = 0           # synthetic world: render scenes at this size (0 = image_size); crops are resized
    max_objects: int = 3          # synthetic world: 1..max objects per scene (1 = object-centric, like ImageNet)
    object_scale_min: float = 0.2  # synthetic world: object diameter range, fraction of the scene side
    object_scale_max: float = 0.45
    local_size: int = 32
    n_local: int = 4
    global_scale_min: float = 0.4
    global_scale_max: float = 1.0
    local_scale_min: float = 0.05
    local_scale_max: float = 0.4
    color: float = 1.0            # colour-augmentation strength (0 = none)
    appearance: str = "shared"    # shared | per-view (synthetic world: each view re-rendered in new colours)
    per_view_ramp: int = 0        # per-view: views share one rendering with probability 1 -> 0 over these steps
    rotate: float = 0.0           # probability of a random quarter turn per crop (0 = off)
    out_dim: int = 1024
    head_hidden: int = 512
    head_bottleneck: int = 128
    cls_weight: float = 1.0       # weight of the image-level (CLS) term (0 = patch term only; needs dense_weight)
    dense_weight: float = 0.0     # weight of the patch-level term (0 = plain CLS DINO)
    dense_image_center: bool = False  # dense targets relative to each image's mean patch output
    koleo_weight: float = 0.0     # KoLeo spreading term on the student's global-crop CLS features (DINOv2; 0 = off)
    mask_ratio: float = 0.0       # iBOT masking of the student's global crops (0 = off; needs dense_weight)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4              # for batch 256, scaled linearly
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # = weight_decay for a constant weight decay
    momentum: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_steps: int = 0
    student_temp: float = 0.1
    centering: str = "center"     # center (DINO: EMA centre + sharpen) | sinkhorn (balanced targets, DINOv2)
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 0
    clip_grad: float = 3.0
    checkpoint_every: int = 200
    snapshot_every: int = 0       # also export the teacher backbone every N steps (0 = never)
    workers: int = 0
    seed: int = 0
    device: str = "auto"


ARCHS = {"small": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
         "base": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12)}


def resolve_arch(cfg: Config) -> Config:
    """Apply a named architecture (``small``/``base``) and check the configuration."""
    if cfg.arch in ARCHS:
        for k, v in ARCHS[cfg.arch].items():
            setattr(cfg, k, v)
    elif cfg.arch != "custom":
        raise ValueError(f"arch must be one of custom, {', '.join(ARCHS)}; got {cfg.arch!r}")
    check_centering(cfg.centering)
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if not 0 < cfg.global_scale_min <= cfg.global_scale_max <= 1:
        raise ValueError(f"need 0 < global_scale_min <= global_scale_max <= 1, got "
                         f"{cfg.global_scale_min} and {cfg.global_scale_max}")
    if cfg.scene_size < 0 or (cfg.scene_size and cfg.data != "synthetic"):
        raise ValueError(f"scene_size={cfg.scene_size}: a positive render size for the synthetic world only "
                         "(0 = image_size)")
    if cfg.per_view_ramp < 0 or (cfg.per_view_ramp and cfg.appearance != "per-view"):
        raise ValueError(f"per_view_ramp={cfg.per_view_ramp}: a number of steps >= 0, only with appearance='per-view'")
    if cfg.max_objects < 1 or not 0 < cfg.object_scale_min <= cfg.object_scale_max <= 1:
        raise ValueError(f"need max_objects >= 1 and 0 < object_scale_min <= object_scale_max <= 1, got "
                         f"{cfg.max_objects}, {cfg.object_scale_min}, {cfg.object_scale_max}")
    if cfg.cls_weight < 0 or cfg.dense_weight < 0 or cfg.cls_weight + cfg.dense_weight <= 0:
        raise ValueError(f"need cls_weight, dense_weight >= 0 and not both 0, got {cfg.cls_weight}, {cfg.dense_weight}")
    if cfg.mask_ratio > 0 and cfg.dense_weight <= 0:
        raise ValueError("mask_ratio > 0 needs dense_weight > 0 (masked patches are trained by the patch term)")
    CropBatches.check_appearance(cfg.appearance, synthetic=cfg.data == "synthetic")
    return cfg


def schedules(cfg: Config, world: int = 1) -> dict[str, np.ndarray]:
    """Per-step values ``[steps]``: ``lr`` (linear warm-up to ``lr * batch * world / 256``, cosine to
    ``min_lr``), ``wd`` (cosine ``weight_decay -> weight_decay_end``), ``momentum`` (cosine
    ``momentum -> 1``) and ``teacher_temp`` (linear ``warmup_teacher_temp -> teacher_temp`` over
    ``warmup_teacher_steps``, then constant)."""
    n = cfg.steps
    wt = min(cfg.warmup_teacher_steps, n)
    temp = np.concatenate([np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, wt),
                           np.full(n - wt, cfg.teacher_temp)])
    return {"lr": cosine_schedule(cfg.lr * cfg.batch_size * world / 256, cfg.min_lr, n, cfg.warmup_steps),
            "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, n),
            "momentum": cosine_schedule(cfg.momentum, 1.0, n),
            "teacher_temp": temp}


def crop_stream(cfg: Config, start_batch: int = 0, rank: int = 0, world: int = 1, files=None) -> CropBatches:
    """The multi-crop batches a run with ``cfg`` trains on: synthetic scenes rendered at ``scene_size``
    (``image_size`` when 0), or the image ``files``; global crops of ``image_size`` pixels cut at area scale
    ``[global_scale_min, global_scale_max]`` and resized, local crops of ``local_size``."""
    crop = MultiCrop(cfg.image_size, cfg.local_size, cfg.n_local, cfg.patch_size,
                     (cfg.global_scale_min, cfg.global_scale_max), (cfg.local_scale_min, cfg.local_scale_max),
                     cfg.color, cfg.mask_ratio, rotate=cfg.rotate)
    scene = {"n_objects": (1, cfg.max_objects), "scale": (cfg.object_scale_min, cfg.object_scale_max)}
    return CropBatches(crop, cfg.batch_size, cfg.scene_size or cfg.image_size, cfg.seed, start_batch=start_batch,
                       rank=rank, world=world, files=files, appearance=cfg.appearance, scene=scene,
                       per_view_ramp=cfg.per_view_ramp)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        recipe = json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "workers")})
        return backbones.save_safetensors(bb, path, description=description, steps=str(step), recipe=recipe)
    finally:
        del bb.nbs_info


def train(cfg: Config, resume: bool = True, log=print, max_steps: int | None = None,
          max_minutes: float | None = None) -> dict:
    """Train (or continue) a DINO run in ``cfg.out``; returns the last metrics row.

    ``max_steps`` / ``max_minutes`` stop early (tests, a wall-clock-bounded session) without changing the
    schedules, which always span ``cfg.steps``; a checkpoint is written at the stop. Writes
    ``checkpoint.pth`` (atomic), ``metrics.jsonl`` (one row per step) and ``config.json``."""
    from tqdm.auto import tqdm

    cfg = resolve_arch(cfg)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    student, teacher, arch = build_networks(cfg)
    student.to(device), teacher.to(device)
    dense = cfg.dense_weight > 0
    loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.n_local, cfg.student_temp, cfg.center_momentum, cfg.centering).to(device)
    dense_fn = DensePatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering,
                              cfg.dense_image_center).to(device)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]

    def no_wd(n, p):
        return p.ndim <= 1 or any(k in n for k in ("pos_embed", "cls_token", "mask_token"))

    opt = torch.optim.AdamW([{"params": [p for n, p in named if not no_wd(n, p)]},
                             {"params": [p for n, p in named if no_wd(n, p)], "weight_decay": 0.0}])
    sch = schedules(cfg, world)
    step = 0
    ckpt = out / "checkpoint.pth"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
        if "dense_loss" in state:
            dense_fn.load_state_dict(state["dense_loss"])
        step = int(state["step"])
        log(f"resumed from {ckpt} at step {step}")
    elif rank == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    if rank == 0:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model = (torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
             if ddp else student)
    files = None
    if cfg.data != "synthetic":
        from .data import list_images

        files = list_images(cfg.data)
    data = crop_stream(cfg, start_batch=step, rank=rank, world=world, files=files)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    stop = min(cfg.steps, max_steps if max_steps is not None else cfg.steps)
    deadline = time.time() + 60 * max_minutes if max_minutes else None
    bar = tqdm(total=stop, initial=step, desc="dino", unit="step", disable=rank != 0)
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None

    def save():
        if rank == 0:
            _atomic_save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                          "optimizer": opt.state_dict(), "loss": loss_fn.state_dict(),
                          "dense_loss": dense_fn.state_dict(), "step": step,
                          "config": json.dumps(asdict(cfg))}, ckpt)

    last, saved_at = {}, step
    t0, step0 = time.time(), step
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
                k_loss = sum(koleo_loss(s_feat[v * B:(v + 1) * B]) for v in range(2)) / 2
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
            last = {"step": step, "loss": loss.item(), "cls_loss": cls_loss.item(), "dense_loss": d_loss.item(),
                    "koleo_loss": k_loss.item(),
                    "teacher_entropy": t_ent, "teacher_marginal_entropy": t_marg,
                    # what the CLS targets say about the image (mutual information, nats): 0 = either collapse
                    "teacher_mi": t_marg - t_ent, "lr": float(sch["lr"][step - 1]),
                    "momentum": float(sch["momentum"][step - 1]), "teacher_temp": temp, "grad_norm": float(gnorm),
                    "images_per_s": (step - step0) * cfg.batch_size * world / max(time.time() - t0, 1e-9),
                    "elapsed_s": time.time() - t0}
            if metrics_f:
                metrics_f.write(json.dumps(last) + "\n")
                metrics_f.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            if step % cfg.checkpoint_every == 0:
                save()
                saved_at = step
            if rank == 0 and cfg.snapshot_every and step % cfg.snapshot_every == 0:
                _save_backbone(teacher.backbone, cfg, out / "snapshots" / f"teacher_{step:06d}.safetensors", step,
                               f"DINO teacher at step {step}")
            if deadline and time.time() > deadline:
                log(f"time budget of {max_minutes} min reached at step {step}")
                break
    finally:
        if saved_at != step:
            save()
        bar.close()
        if metrics_f:
            metrics_f.close()
        if ddp:
            torch.distributed.destroy_process_group()
    return last


# --------------------------------------------------------------------------------------------------
# Evaluation


def _val_scenes(size: int, n_images: int, seed: int):
    """The synthetic validation scenes (cached on disk) as :class:`nbsupport.data.CocoInstances`."""
    from .data import CocoInstances
    from .data.synthetic import synthetic_dataset

    return CocoInstances(synthetic_dataset(n_images=n_images, seed=seed, size=size, split="val") / "instances_val.json")


def _maskcut_ap(coco, feats: torch.Tensor, size: int, tau) -> dict:
    """Class-agnostic COCO mask AP of 3 MaskCut masks per image from patch features ``[B, h, w, D]`` (one
    per ``coco.image_ids``, in order) against ``coco``'s ground truth, images ``size x size``."""
    from . import maskcut as mc, metrics

    dets = []
    for image_id, m in zip(coco.image_ids, mc.maskcut(feats, 3, tau)):
        dets += mc.coco_annotations(mc.pixel_masks(m.numpy(), (size, size), (size, size)), image_id)
    return metrics.coco_ap(coco.coco.dataset, dets)


def _class_separability(coco, feats: torch.Tensor, seed: int) -> dict:
    """Same- vs different-class cosine similarity of object patches (``feats [B, h, w, D]``, one grid per
    ``coco.image_ids``): ROC AUC and distribution overlap, 20000 seeded pairs of each kind."""
    from . import affinity

    sem = np.stack([affinity.labels_on_grid(coco.semantic_mask(i), feats.shape[1:3]) for i in coco.image_ids])
    sep = affinity.separability(*affinity.patch_pairs(feats, sem, "cosine", 20000, seed))
    return {"patch AUC": sep["auc"], "overlap": sep["overlap"]}


def backbone_quality(model, size: int = 128, n_images: int = 200, tau="median", seed: int = 0) -> dict:
    """How much a backbone has learned, on ``n_images`` synthetic validation scenes (``seed``) at ``size`` px
    (issue 8's three measures): ``patch AUC`` / ``overlap`` of same- vs different-class last-block key
    cosine similarities (objects only); class-agnostic MaskCut (3 masks, ``tau``) ``mask AP`` / ``mask AP50``
    against the ground truth; ``BB precision``: the fraction of salient best-buddy pairs (last-block keys,
    CLS saliency > 0.05) between consecutive scenes sharing a class that land on the same class."""
    from . import correspondences as cc, features
    from .data import image_to_tensor

    coco = _val_scenes(size, n_images, seed)
    ids = coco.image_ids
    imgs = torch.stack([image_to_tensor(coco.load(i), size) for i in ids])
    p = model.nbs_info["patch_size"]
    keys = torch.cat([features.extract(model, imgs[i:i + 16], "key", -1) for i in range(0, len(imgs), 16)])
    sep = _class_separability(coco, keys, seed)
    ap = _maskcut_ap(coco, keys, size, tau)
    # best buddies between consecutive scenes that share a class
    precs, desc = [], {}  # an image's descriptors serve both pairs it is in
    for a, b in zip(ids[:-1], ids[1:]):
        if not set(coco.category_ids(a)) & set(coco.category_ids(b)):
            continue
        for i in (a, b):
            if i not in desc:
                desc[i] = cc.descriptors(model, imgs[i - 1], -1, "key", False, p)
        res = cc.match(desc[a], desc[b], (size, size), (size, size), size, p, p, n_pairs=0, thresh=0.05)
        pa, pb = cc.all_salient_points(res, p, p, size, (size, size), (size, size))
        if len(pa):
            precs.append(cc.pair_precision(pa, pb, coco.semantic_mask(a), coco.semantic_mask(b)))
    return {**sep, "mask AP": ap["AP"], "mask AP50": ap["AP50"],
            "BB precision": float(np.mean(precs)) if precs else float("nan")}


def maskcut_ceiling(size: int = 128, n_images: int = 200, tau="median", seed: int = 0, patch: int = 8,
                    noise: float = 0.1) -> dict:
    """MaskCut mask AP / AP50 on ground-truth features: one-hot semantic class per ``patch`` cell (background
    its own class) plus ``noise`` x N(0, 1), seeded. About the best any backbone's keys can give in
    :func:`backbone_quality` (the grid, not the features, limits it: ~24 AP50 at 64 px, ~67 at 128 px)."""
    from . import affinity
    from .data.synthetic import CLASSES

    coco = _val_scenes(size, n_images, seed)
    g = size // patch
    sem = np.stack([affinity.labels_on_grid(coco.semantic_mask(i), (g, g), min_fraction=0.0) for i in coco.image_ids])
    feats = np.eye(len(CLASSES) + 1)[sem] + noise * np.random.default_rng(seed).standard_normal(sem.shape + (len(CLASSES) + 1,))
    ap = _maskcut_ap(coco, torch.tensor(feats, dtype=torch.float32), size, tau)
    return {"mask AP": ap["AP"], "mask AP50": ap["AP50"]}


def fft_texture(grey: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """Hand-made colour- and phase-invariant texture descriptor ``[B, h, w, patch**2]`` of grey images
    ``[B, H, W]``: per ``patch`` x ``patch`` cell, the magnitudes of the 2-D FFT of its values after
    subtracting the cell's mean and dividing by its std."""
    cells = grey.unfold(1, patch, patch).unfold(2, patch, patch)   # [B, h, w, p, p]
    cells = cells - cells.mean((-1, -2), keepdim=True)
    cells = cells / (cells.std((-1, -2), keepdim=True) + 1e-3)
    return torch.fft.fft2(cells).abs().flatten(-2)


def texture_reference(size: int = 128, n_images: int = 200, seed: int = 0, patch: int = 8) -> dict:
    """The class AUC of :func:`backbone_quality` for :func:`fft_texture` of the scenes' grey levels. No
    learning: it shows how much class information a single cell holds on this world (about 0.67 on the
    200 seed-0 scenes at 128 px, where random keys give 0.5), i.e. that issue 8's +0.15 AUC bar is
    reachable by a patch feature (``benchmarks/patch_probes.py`` adds a supervised twin)."""
    coco = _val_scenes(size, n_images, seed)
    grey = torch.stack([torch.from_numpy(np.asarray(coco.load(i), dtype=np.float32).mean(-1) / 255)
                        for i in coco.image_ids])
    return _class_separability(coco, fft_texture(grey, patch), seed)


def export_teacher(ckpt: str | Path, out: str | Path, description: str = "tiny DINO (synthetic world)") -> Path:
    """Write the teacher backbone of a checkpoint as fp32 safetensors (heads, step and the training recipe
    in the metadata), loadable by :func:`nbsupport.backbones.load`."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = Config(**json.loads(state["config"]))
    model = backbones.build(_arch(cfg))
    sd = {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    backbones.load_state(model, sd, str(ckpt))
    return _save_backbone(model, cfg, Path(out), int(state["step"]), description)


def add_cli(subparsers) -> None:
    from .__main__ import cli_bool
    p = subparsers.add_parser("dino", help="DINO self-distillation: train a ViT, export its teacher")
    sub = p.add_subparsers(dest="dino_cmd", required=True)
    t = sub.add_parser("train", help="train (resumes from OUT/checkpoint.pth when present)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f, v in asdict(Config()).items():
        typ = cli_bool if isinstance(v, bool) else type(v)
        choices = {"appearance": CropBatches.APPEARANCES, "centering": CENTERINGS}.get(f)
        t.add_argument(f"--{f.replace('_', '-')}", type=typ, default=v, choices=choices)
    t.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    t.add_argument("--max-steps", type=int, default=None, help="stop early (schedules still span --steps)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this wall-clock time")

    def _train(a):
        cfg = Config(**{f: getattr(a, f) for f in asdict(Config())})
        last = train(cfg, resume=not a.no_resume, max_steps=a.max_steps, max_minutes=a.max_minutes)
        print(json.dumps(last))
        return 0

    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write the teacher backbone as .safetensors")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--description", default="tiny DINO (synthetic world)")
    e.set_defaults(func=lambda a: (print(export_teacher(a.checkpoint, a.out, a.description)), 0)[1])
