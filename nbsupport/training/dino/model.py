"""DINO's networks: a ViT backbone with a projection head whose last layer is weight-normalised, and the
EMA teacher update (thesis Eq 10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------
# Model parts


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer to ``out_dim`` prototypes.
    ``[..., in_dim] -> [..., out_dim]``; the last layer's norm is fixed to 1 when ``norm_last_layer``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1024,
        hidden: int = 512,
        bottleneck: int = 128,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
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

    def forward(
        self, crops: list[torch.Tensor], masks: list | None = None, dense: bool = False, features: bool = False
    ):
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
                m = torch.cat(
                    [
                        g if g is not None else torch.zeros(c.shape[0], h, w, dtype=torch.bool, device=c.device)
                        for g, c in zip(masks[i:j], crops[i:j])
                    ]
                )
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
        cls_out, k, patch_out = out[: len(cls)], len(cls), []
        for q in patches:
            n = q.shape[0] * q.shape[1] * q.shape[2]
            patch_out.append(out[k : k + n].reshape(*q.shape[:3], -1))
            k += n
        return (cls_out, patch_out) + extra


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Eq 10: ``teacher <- m * teacher + (1 - m) * student`` for every parameter."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
