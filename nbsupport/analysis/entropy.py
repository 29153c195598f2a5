"""Entropy maps and entropy regularisers of GroupViT (thesis section 4.7, Eq 36-44).

Conventions (batch dimension optional and leading everywhere):

- ``attn``: the chained soft attention over final-stage groups, ``[G, P]`` (thesis Eq 32: ``Attn =
  A^2 A^1``), each column a distribution of one patch over the ``G`` groups;
- ``a_st``: the segment affinity metric ``[G, K]`` between final segment embeddings and ``K`` label
  embeddings (Eq 28), as logits;
- ``l_affinity``: per-pixel label scores ``[H*W, N]`` or ``[H, W, N]`` (Eq 34), probabilities.

All entropies are in nats: a uniform distribution over ``n`` outcomes has entropy ``log n``, a one-hot 0.
:func:`groupvit_entropy` runs a GroupViT on images and returns all of these at once (thesis Fig 12-13, 17-18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nbsupport.models.groupvit.inference import TEMPLATES, segment_logits, text_embeddings
from nbsupport.models.groupvit.model import GroupViT


def entropy(p: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy ``-sum p log p`` along ``dim`` of a probability tensor (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim)


def group_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Eq 36: entropy of every patch over the groups, ``[..., G, P] -> [..., P]``."""
    return entropy(attn, dim=-2)


def group_entropy_loss(attn: torch.Tensor) -> torch.Tensor:
    """Eq 37, GE: mean over patches of :func:`group_entropy` (then over the batch)."""
    return group_entropy(attn).mean()


def label_affinity(attn: torch.Tensor, a_st: torch.Tensor) -> torch.Tensor:
    """Eq 39: ``T_affinity = Attn^T softmax(A_ST)``, ``[..., G, P], [..., G, K] -> [..., P, K]``: each patch's
    distribution over the labels, mixed through its group assignment."""
    return attn.transpose(-1, -2) @ F.softmax(a_st, dim=-1)


def label_entropy(attn: torch.Tensor, a_st: torch.Tensor) -> torch.Tensor:
    """Eq 40: entropy of every patch over the labels, ``[..., P]``."""
    return entropy(label_affinity(attn, a_st), dim=-1)


def label_entropy_loss(attn: torch.Tensor, a_st: torch.Tensor) -> torch.Tensor:
    """Eq 41, LE: mean over patches (then over the batch) of :func:`label_entropy`."""
    return label_entropy(attn, a_st).mean()


def pixel_label_entropy(l_affinity: torch.Tensor) -> torch.Tensor:
    """Eq 38: entropy of each pixel over the labels of ``L_affinity`` ``[..., N]`` (rows normalised first)."""
    p = l_affinity / l_affinity.sum(-1, keepdim=True).clamp_min(1e-12)
    return entropy(p, dim=-1)


@torch.no_grad()
def inference_label_entropy(
    model: GroupViT, images: torch.Tensor, class_names, topk: int = 5, templates=TEMPLATES["simple"]
) -> torch.Tensor:
    """Thesis Fig 13c at inference: GroupViT's ``L_affinity`` of Eq 34 (one-hot Attn times Â_ST with the
    top-``topk`` classes, no background threshold) per pixel of ``images [B, 3, H, W]``, then its entropy over
    the labels (Eq 38, :func:`pixel_label_entropy`): ``[B, H, W]`` in nats, at most ``log min(topk, N)``."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        te = text_embeddings(model, class_names, templates)
        la = segment_logits(model, images.to(dev), te, topk=topk, bg_thresh=None)  # [B, N, H, W]
    finally:
        model.train(was)
    return pixel_label_entropy(la.movedim(1, -1)).cpu()


def segment_affinity_entropy(a_st: torch.Tensor, w_groups: float = 0.2, w_labels: float = 0.1) -> torch.Tensor:
    """Eq 42-44, SE: ``0.2 * mean_i H(softmax over labels of row i) + 0.1 * mean_j H(softmax over groups of
    column j)`` of the segment affinity metric ``[..., G, K]`` (weights as in the thesis, after TIER)."""
    h_groups = entropy(F.softmax(a_st, dim=-1), dim=-1).mean(-1)  # Eq 42, per group over labels
    h_labels = entropy(F.softmax(a_st, dim=-2), dim=-2).mean(-1)  # Eq 43, per label over groups
    return (w_groups * h_groups + w_labels * h_labels).mean()


def to_maps(values: torch.Tensor, grid: tuple[int, int], out_hw: tuple[int, int] | None = None):
    """Per-patch values ``[..., P]`` -> patch map ``[..., h, w]`` and, with ``out_hw``, a bilinearly
    upsampled pixel map ``[..., H, W]`` (thesis Fig 13 draws these). Returns ``(patch_map, pixel_map)``."""
    h, w = grid
    if values.shape[-1] != h * w:
        raise ValueError(f"{values.shape[-1]} patch values do not fit a {h}x{w} grid")
    pm = values.reshape(*values.shape[:-1], h, w)
    if out_hw is None:
        return pm, None
    flat = pm.reshape(-1, 1, h, w).float()
    px = F.interpolate(flat, size=out_hw, mode="bilinear", align_corners=False)
    return pm, px.reshape(*pm.shape[:-2], *out_hw)


def max_entropy(n: int) -> float:
    """``log n``: the entropy of a uniform distribution over ``n`` outcomes (the top of a colour scale)."""
    return math.log(n)


def segment_affinity_terms(a_st: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two entropy vectors behind SE: per group over labels (Eq 42) ``[..., G]`` and per label over
    groups (Eq 43) ``[..., K]``."""
    return entropy(F.softmax(a_st, dim=-1), dim=-1), entropy(F.softmax(a_st, dim=-2), dim=-2)


def entropy_maps(
    attn: torch.Tensor, grid: tuple[int, int], out_hw: tuple[int, int] | None = None, a_st: torch.Tensor | None = None
) -> dict:
    """Thesis Fig 13 maps for one image or a batch: ``attn [..., G, N]`` (Eq 32) and optional segment affinity
    ``a_st [..., G, K]`` (Eq 28, logits) -> ``{"group": (patch [..., h, w], pixel [..., H, W] or None),
    "label": (...)}`` (``label`` only with ``a_st``). Values in nats (0 .. log G, 0 .. log K). The thesis
    averages the per-group terms over groups after interpolation: that map is this one divided by G."""
    out = {"group": to_maps(group_entropy(attn), grid, out_hw)}
    if a_st is not None:
        out["label"] = to_maps(label_entropy(attn, a_st), grid, out_hw)
    return out


@dataclass
class GroupViTEntropy:
    """A GroupViT's grouping of ``B`` images and its entropies (CPU tensors): ``attn [B, G, N]`` (Eq 32) on the
    patch ``grid``, ``a_st [B, G, K]`` (Eq 28, logits), pixel maps ``group [B, H, W]`` (GE per patch, Eq 36)
    and ``label [B, H, W]`` (LE per patch, Eq 39-40), bilinear at the image size."""

    attn: torch.Tensor
    grid: tuple[int, int]
    a_st: torch.Tensor
    group: torch.Tensor
    label: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.attn.shape[-2]

    @property
    def n_labels(self) -> int:
        return self.a_st.shape[-1]

    def scores(self) -> dict[str, float]:
        """Image-averaged GE (Eq 37), LE (Eq 41) and SE (Eq 44), the penalties of thesis Table 11."""
        return {
            "GE (Eq 37)": group_entropy_loss(self.attn).item(),
            "LE (Eq 41)": label_entropy_loss(self.attn, self.a_st).item(),
            "SE (Eq 44)": segment_affinity_entropy(self.a_st).item(),
        }


@torch.no_grad()
def groupvit_entropy(
    model: GroupViT, images: torch.Tensor, class_names, templates=TEMPLATES["simple"]
) -> GroupViTEntropy:
    """Run ``model`` (in eval mode, restored after) on ``images [B, 3, H, W]`` in one batch and return its
    chained attention, segment affinity against the prompted ``class_names`` (``A_ST = scale K^I Z^T``,
    Eq 28) and the GE / LE maps of thesis Fig 13 and 17-18 (:func:`entropy_maps`)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        out = model.encode_image(images.to(dev))
        a_st = float(model.scale) * out.group_embeds @ text_embeddings(model, class_names, templates).T
        maps = entropy_maps(out.attn, out.grid, tuple(images.shape[-2:]), a_st)
    finally:
        model.train(was)
    return GroupViTEntropy(out.attn.cpu(), tuple(out.grid), a_st.cpu(), maps["group"][1].cpu(), maps["label"][1].cpu())
