"""GroupViT (Xu et al. 2022) with every intermediate exposed, its weights, CLIP tokenizer and the paper's
zero-shot segmentation (thesis sections 4.4-4.6, Eq 12-35; analyses of section 5.4, Eq 47-51).

The module names follow the official NVlabs checkpoint (``img_encoder.layers.i.blocks.j.attn.qkv`` ...), so
an official ``['model']`` state dict loads without renaming; :func:`hf_to_official` maps the HF
transformers layout (``nvidia/groupvit-gcc-yfcc``). Shapes: ``B`` images, ``N = h*w`` patches, ``C`` width,
``G_l`` group tokens of stage ``l``, ``P`` joint-space dimension, ``K`` texts.

- :class:`GroupViT` / :func:`build` / :data:`CONFIGS` (``group_vit_gcc_yfcc_30e``, ``group_vit_gcc_redcap_30e``,
  ``small`` for tests) ; ``model.encode_image(images) -> ImageOutput`` (soft/hard assignments, segment and
  group tokens per stage, chained attention ``Attn`` of Eq 32, image and group embeddings);
  ``model.encode_text(token_ids)``.
- :func:`load` (official names, local ``.pth`` / ``.safetensors`` / HF files, ``random:small``), a restricted
  unpickler (:func:`read_checkpoint`) that never runs code from the file.
- :class:`Tokenizer` (CLIP BPE, packaged vocabulary), :func:`text_embeddings` (prompt templates averaged).
- :func:`segment` (Eq 29-35 with top-5 classes, background threshold, sliding window).
- :func:`soft_labels`, :func:`knn_labels`, :func:`gt_group_labels` (section 5.4, Eq 47-51).
"""
from __future__ import annotations

import gzip
import html
import io
import math
import pickle
import re as _re
import zipfile
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import paths
from .backbones import WeightsUnavailableError

# ============================================================================================== configs
@dataclass(frozen=True)
class Config:
    """Architecture of a GroupViT (defaults: the official ``group_vit_gcc_yfcc_30e.yml``)."""
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depths: tuple = (6, 3, 3)
    num_heads: int = 6
    num_group_tokens: tuple = (64, 8, 0)
    num_output_groups: tuple = (64, 8)
    mlp_ratio: float = 4.0
    assign_mlp_ratio: tuple = (0.5, 4.0)
    assign_eps: float = 1.0
    hard_assignment: bool = True
    gumbel_tau: float = 1.0
    text_width: int = 256
    text_layers: int = 12
    text_heads: int = 4
    context_length: int = 77
    vocab_size: int = 49408
    proj_inner: int = 4096
    proj_dim: int = 256
    contrast_temperature: float = 0.07

    def __post_init__(self):
        n = len(self.depths)
        if len(self.num_group_tokens) != n or len(self.num_output_groups) != n - 1:
            raise ValueError("depths, num_group_tokens (one per stage) and num_output_groups (one per grouping "
                             f"stage) disagree: {self.depths}, {self.num_group_tokens}, {self.num_output_groups}")
        if self.embed_dim % self.num_heads or self.text_width % self.text_heads:
            raise ValueError("embed_dim / text_width must be divisible by num_heads / text_heads")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


CONFIGS: dict[str, Config] = {
    "group_vit_gcc_yfcc_30e": Config(),
    "group_vit_gcc_redcap_30e": Config(),
    # seconds-fast offline model: patch 8 at 64 px -> 8x8 patches, 16 then 4 groups
    "small": Config(img_size=64, patch_size=8, embed_dim=96, depths=(2, 1, 1), num_heads=3,
                    num_group_tokens=(16, 4, 0), num_output_groups=(16, 4), text_width=64, text_layers=2,
                    text_heads=1, proj_inner=128, proj_dim=32),
    # "small" at the tiny DINO's width (128, 4 heads, 4 blocks): its image encoder can start from
    # tiny_dino_synth (grouptrain.init_image_encoder)
    "small128": Config(img_size=64, patch_size=8, embed_dim=128, depths=(2, 1, 1), num_heads=4,
                       num_group_tokens=(16, 4, 0), num_output_groups=(16, 4), text_width=64, text_layers=2,
                       text_heads=1, proj_inner=128, proj_dim=32),
}

URLS = {
    "group_vit_gcc_yfcc_30e": "https://github.com/xvjiarui/GroupViT/releases/download/v1.0.0/"
                              "group_vit_gcc_yfcc_30e-879422e0.pth",
    "group_vit_gcc_redcap_30e": "https://github.com/xvjiarui/GroupViT/releases/download/v1.0.0/"
                                "group_vit_gcc_redcap_30e-3dd09a76.pth",
}
#: Small weights shipped in ``data/weights/`` (name -> file, command that retrains them; nbsupport.grouptrain).
SHIPPED = {"tiny_groupvit_synth": ("tiny_groupvit_synth.safetensors",
                                   "python -m nbsupport groupvit-train --recipe tiny_groupvit_synth "
                                   "(see README, 'Tiny offline GroupViT')")}
HF_REPOS = {"nvidia/groupvit-gcc-yfcc": "group_vit_gcc_yfcc_30e", "nvidia/groupvit-gcc-redcaps": "group_vit_gcc_redcap_30e"}


# ============================================================================================== modules
class Mlp(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_out or d_in)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixerMlp(Mlp):
    """An MLP over the token axis: ``[B, T_in, C] -> [B, T_out, C]`` (Eq 18, group-token projection)."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _heads(x, h):
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


def _merge(x):
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (official ``Attention(qkv_fuse=True)``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.proj(_merge(out))


class CrossAttention(nn.Module):
    """Queries from one token set, keys and values from another (group tokens attend to segments)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, key):
        h = self.heads
        out = F.scaled_dot_product_attention(_heads(self.q_proj(query), h), _heads(self.k_proj(key), h),
                                             _heads(self.v_proj(key), h))
        return self.proj(_merge(out))


class Block(nn.Module):
    """Pre-norm transformer block over the concatenated segment and group tokens (Eq 14)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Post-norm cross-attention block that lets the new group tokens look at the segments first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, query, key):
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


def hard_one_hot(soft: torch.Tensor, dim: int) -> torch.Tensor:
    """Eq 16: one-hot of the argmax along ``dim`` with the straight-through gradient of ``soft``."""
    index = soft.argmax(dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


class AssignAttention(nn.Module):
    """Single-head assignment of segments to groups: ``softmax over the group axis`` of ``q_g . k_s / sqrt(C)``
    (Eq 15; Gumbel noise while training), hard one-hot straight-through (Eq 16), then the
    ``1 + row sum``-normalised weighted mean of the values (Eq 17)."""

    def __init__(self, dim: int, assign_eps: float = 1.0, hard: bool = True, gumbel_tau: float = 1.0):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim ** -0.5
        self.assign_eps, self.hard, self.gumbel_tau = assign_eps, hard, gumbel_tau

    def forward(self, groups, segments):
        logits = (self.q_proj(groups) @ self.k_proj(segments).transpose(-2, -1)) * self.scale   # [B, G, M]
        soft = logits.softmax(dim=-2)
        if self.training and self.hard:
            gumbels = -torch.empty_like(logits).exponential_().log()
            y = ((logits + gumbels) / self.gumbel_tau).softmax(dim=-2)
            assign = hard_one_hot(y, dim=-2)
        elif self.hard:
            assign = hard_one_hot(soft, dim=-2)
        else:
            assign = soft
        weights = assign / (assign.sum(-1, keepdim=True) + self.assign_eps)
        return self.proj(weights @ self.v_proj(segments)), soft, assign


class GroupingBlock(nn.Module):
    """Grouping block (thesis Fig 7): MLP-mixer maps the stage's group tokens to ``num_output_group`` tokens,
    which cross-attend to the segments and then take them over by (hard) assignment."""

    def __init__(self, dim: int, heads: int, num_group_token: int, num_output_group: int, cfg: Config):
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in cfg.assign_mlp_ratio)
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = MixerMlp(num_group_token, tokens_dim, num_output_group)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossBlock(dim, heads)
        self.assign = AssignAttention(dim, cfg.assign_eps, cfg.hard_assignment, cfg.gumbel_tau)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_dim, dim)

    def forward(self, x, group_tokens):
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        groups = self.norm_post_tokens(self.mlp_inter(group_tokens))
        groups = self.pre_assign_attn(groups, x)
        new_x, soft, hard = self.assign(groups, x)
        new_x = new_x + groups
        new_x = new_x + self.mlp_channels(self.norm_new_x(new_x))
        return new_x, soft, hard


class Stage(nn.Module):
    """One stage: learnable group tokens (plus an MLP-mixer of the previous stage's, Eq 18), transformer
    blocks over ``[segments; groups]`` (Eq 14), then the grouping block (none in the last stage)."""

    def __init__(self, cfg: Config, i: int):
        super().__init__()
        dim, g = cfg.embed_dim, cfg.num_group_tokens[i]
        self.num_group_token = g
        self.group_token = nn.Parameter(torch.zeros(1, g, dim)) if g > 0 else None
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depths[i]))
        self.downsample = (GroupingBlock(dim, cfg.num_heads, g, cfg.num_output_groups[i], cfg)
                           if i < len(cfg.depths) - 1 else None)
        if i > 0 and g > 0:
            self.group_projector = nn.Sequential(nn.LayerNorm(dim),
                                                 MixerMlp(cfg.num_group_tokens[i - 1], dim // 2, g))
        else:
            self.group_projector = None

    def forward(self, x, prev_group_tokens=None):
        out = {}
        if self.group_token is not None:
            g = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None:
                g = g + self.group_projector(prev_group_tokens)
            x = torch.cat([x, g], dim=1)
        for blk in self.blocks:
            x = blk(x)
        if self.group_token is None:
            return x, None, out
        x, g = x[:, :-self.num_group_token], x[:, -self.num_group_token:]
        out.update(segment_tokens=x, group_tokens=g)
        if self.downsample is not None:
            x, out["soft"], out["hard"] = self.downsample(x, g)
        return x, g, out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim)


class VisionEncoder(nn.Module):
    """Patch embedding with LayerNorm and a learned position embedding (Eq 12), then the stages."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2, cfg.embed_dim))
        self.layers = nn.ModuleList(Stage(cfg, i) for i in range(len(cfg.depths)))
        self.norm = nn.LayerNorm(cfg.embed_dim)


class ResidualAttentionBlock(nn.Module):
    """CLIP text block: causal multi-head attention and a QuickGELU MLP, both pre-norm."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = self.mlp["c_fc"](self.ln_2(x))
        return x + self.mlp["c_proj"](h * torch.sigmoid(1.702 * h))


class TextTransformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg.text_width, cfg.text_heads)
                                                   for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)

    def forward(self, ids):
        L = ids.shape[-1]
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        mask = torch.full((L, L), float("-inf"), device=ids.device).triu_(1)
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), ids.argmax(-1)]   # the end-of-text token (highest id)


class ProjectMLP(nn.Module):
    """2-layer projector into the joint space (Eq 19, 27): ``C -> inner -> BN -> ReLU -> P``; 1x1 convolutions
    as in the official code so the checkpoint's weight shapes load unchanged."""

    def __init__(self, d_in: int, inner: int, d_out: int):
        super().__init__()
        self.linear_hidden = nn.Sequential(nn.Conv1d(d_in, inner, 1), nn.BatchNorm1d(inner), nn.ReLU(inplace=True))
        self.linear_out = nn.Conv1d(inner, d_out, 1)

    def forward(self, x):
        squeeze = x.ndim == 2
        x = x[:, None] if squeeze else x                         # [B, L, C]
        x = self.linear_out(self.linear_hidden(x.transpose(1, 2))).transpose(1, 2)
        return x[:, 0] if squeeze else x


@dataclass
class ImageOutput:
    """Everything :meth:`GroupViT.encode_image` computes (lists have one entry per grouping stage ``l``)."""
    grid: tuple                 # (h, w) patch grid
    patch_tokens: torch.Tensor  # [B, N, C] embedded patches S^1 (Eq 12)
    segment_tokens: list        # Ŝ^l [B, M_l, C]: segments after stage l's transformer (Eq 14); [0] = stage-1 patches
    group_tokens: list          # Ĝ^l [B, G_l, C] after the transformer
    soft: list                  # A^l [B, G_l, M_l] soft assignment, softmax over groups (Eq 15, no noise)
    hard: list                  # Â^l [B, G_l, M_l] hard one-hot assignment (Eq 16)
    final_tokens: torch.Tensor  # Ŝ^3 [B, G_last, C] final-stage segment tokens after the last LayerNorm
    image_feat: torch.Tensor    # [B, C] average pool (Eq 19 before the MLP)
    image_embeds: torch.Tensor  # Z^I [B, P] L2-normalised (Eq 19)
    group_embeds: torch.Tensor  # K^I [B, G_last, P] L2-normalised (Eq 27)
    attn: torch.Tensor          # Attn [B, G_last, N] = A^2 A^1 (Eq 32), a distribution over groups per patch
    extras: dict = field(default_factory=dict)

    def attn_maps(self) -> torch.Tensor:
        """``Attn`` as patch maps ``[B, G_last, h, w]``."""
        return self.attn.reshape(*self.attn.shape[:2], *self.grid)


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a square learned position embedding ``[1, n*n, C]`` to ``grid`` (as the official
    code does at inference, e.g. 448 px, and when fine-tuning at 384 px)."""
    n = int(round(math.sqrt(pos.shape[1])))
    if n * n != pos.shape[1]:
        raise ValueError(f"position embedding of {pos.shape[1]} tokens is not a square grid")
    if tuple(grid) == (n, n):
        return pos
    p = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    p = F.interpolate(p, size=tuple(grid), mode="bicubic", align_corners=False)
    return p.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


class GroupViT(nn.Module):
    """Vision encoder, text encoder, both projectors and the contrastive temperature (thesis Fig 6)."""

    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.img_encoder = VisionEncoder(cfg)
        self.text_encoder = TextTransformer(cfg)
        self.img_projector = ProjectMLP(cfg.embed_dim, cfg.proj_inner, cfg.proj_dim)
        self.text_projector = ProjectMLP(cfg.text_width, cfg.proj_inner, cfg.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.contrast_temperature)))
        self.multi_label_logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.contrast_temperature)))
        self.nbs_info = {"name": "groupvit", "pretrained": False, "description": "GroupViT"}

    @property
    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at 100, as the official code applies it."""
        return self.logit_scale.exp().clamp(max=100)

    def encode_image(self, images: torch.Tensor) -> ImageOutput:
        """Run the vision side on ImageNet-normalised ``images [B, 3, H, W]`` (H, W multiples of the patch;
        other sizes than the training one use an interpolated position embedding)."""
        enc, p = self.img_encoder, self.cfg.patch_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}")
        x = enc.patch_embed.proj(images)
        grid = tuple(x.shape[-2:])
        x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))
        x = x + interpolate_pos_embed(enc.pos_embed, grid)
        patch_tokens = x
        seg, grp, soft, hard = [], [], [], []
        g = None
        for stage in enc.layers:
            x, g, o = stage(x, g)
            if "segment_tokens" in o:
                seg.append(o["segment_tokens"])
                grp.append(o["group_tokens"])
            if "soft" in o:
                soft.append(o["soft"])
                hard.append(o["hard"])
        final = enc.norm(x)
        if len(enc.layers[-1].blocks) and enc.layers[-1].group_token is None:
            seg.append(x)
        feat = final.mean(1)
        attn = soft[0]
        for a in soft[1:]:
            attn = a @ attn                                   # [B, G_{l+1}, G_l] @ [B, G_l, N]
        return ImageOutput(grid=grid, patch_tokens=patch_tokens, segment_tokens=seg, group_tokens=grp, soft=soft,
                           hard=hard, final_tokens=final, image_feat=feat,
                           image_embeds=F.normalize(self.img_projector(feat), dim=-1),
                           group_embeds=F.normalize(self.img_projector(final), dim=-1), attn=attn)

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids ``[K, L]`` (from :class:`Tokenizer`) -> text embeddings ``Z^T [K, P]`` (Eq 20)."""
        z = self.text_projector(self.text_encoder(ids))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images, ids):
        """Image-text logits ``[B, K]`` (scaled cosine similarity, Eq 21)."""
        return self.scale * self.encode_image(images).image_embeds @ self.encode_text(ids).T


def init_weights(model: GroupViT, seed: int = 0) -> GroupViT:
    """Seeded random initialisation like the official one (truncated normal 0.02 for linear layers and the
    position embedding, CLIP's scaled normals for the text side, unit LayerNorms)."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g).clamp_(-2, 2) * std)

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            normal_(m.weight, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            normal_(m.in_proj_weight, model.cfg.text_width ** -0.5)
            nn.init.zeros_(m.in_proj_bias)
    normal_(model.img_encoder.pos_embed, 0.02)
    normal_(model.text_encoder.token_embedding.weight, 0.02)
    normal_(model.text_encoder.positional_embedding, 0.01)
    for st in model.img_encoder.layers:
        if st.group_token is not None and st.group_projector is None:
            normal_(st.group_token, 0.02)     # the official code zero-inits tokens that get a projection
    return model


def build(config: str | Config = "small", seed: int = 0) -> GroupViT:
    """A seeded random-init GroupViT of a named config (:data:`CONFIGS`) in eval mode."""
    if isinstance(config, str) and config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose from {sorted(CONFIGS)}")
    cfg = CONFIGS[config] if isinstance(config, str) else config
    m = init_weights(GroupViT(cfg), seed).eval()
    m.nbs_info = {"name": f"random:{config if isinstance(config, str) else 'custom'}", "pretrained": False,
                  "seed": seed, "description": f"random-init GroupViT-{config if isinstance(config, str) else 'custom'} "
                                               f"(seed {seed})"}
    return m


def describe(model: GroupViT) -> str:
    """One line for figure titles: which weights these are (e.g. ``random-init GroupViT-small (seed 0)``)."""
    return model.nbs_info.get("description", "GroupViT")


# ============================================================================================== weights
class _Inert:
    """Stand-in for every class a checkpoint names that is not a tensor or a plain container: it accepts
    any constructor arguments and state and keeps nothing, so no code from the file ever runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
           "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
           "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
           "BoolStorage": torch.bool}


def _rebuild_tensor(storage, offset, size, stride, *args):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, *args):
    return data


def _inert_reconstructor(*args):
    return _Inert()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch zip checkpoint's ``data.pkl`` allowing only tensor rebuilding and plain containers;
    any other global (OmegaConf configs, optimiser classes, ``os.system`` ...) resolves to :class:`_Inert`."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix, self.storages, self.skipped = zf, prefix, {}, set()

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "copyreg" and name == "_reconstructor":
            return _inert_reconstructor
        self.skipped.add(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        dtype = storage_type if isinstance(storage_type, torch.dtype) else getattr(storage_type, "dtype", None)
        if dtype is None:
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if key not in self.storages:
            raw = bytearray(self.zf.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_checkpoint(path: str | Path) -> dict:
    """Read a PyTorch zip checkpoint without executing anything from it.

    Trusted: only the tensor bytes and the dict/list/OrderedDict structure. Every other object in the
    pickle (the official GroupViT file stores an OmegaConf config, optimiser and scheduler state) is replaced
    by an inert placeholder, so ``torch.load(weights_only=True)``'s failure on those classes is avoided
    without ever importing or calling them. Returns the top-level object (a dict)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a PyTorch zip checkpoint (legacy pickled files are not read "
                         "for safety; re-save it with torch>=1.6)")
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: no data.pkl inside the zip checkpoint")
        prefix = pkl[0][: -len("/data.pkl")]
        up = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix)
        obj = up.load()
    return obj


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF transformers ``GroupViTModel`` state dict (``nvidia/groupvit-gcc-yfcc``) to the official
    layout this module uses: q/k/v merged back into ``qkv`` / ``in_proj``, Linear projectors to 1x1 convs."""
    out, qkv = {}, {}
    vis_rules = [(r"^vision_model\.embeddings\.patch_embeddings\.projection\.", "img_encoder.patch_embed.proj."),
                 (r"^vision_model\.embeddings\.layernorm\.", "img_encoder.patch_embed.norm."),
                 (r"^vision_model\.embeddings\.position_embeddings$", "img_encoder.pos_embed"),
                 (r"^vision_model\.layernorm\.", "img_encoder.norm."),
                 (r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"img_encoder.layers.\1.blocks.\2."),
                 (r"^vision_model\.encoder\.stages\.(\d+)\.", r"img_encoder.layers.\1."),
                 (r"^text_model\.embeddings\.token_embedding\.", "text_encoder.token_embedding."),
                 (r"^text_model\.embeddings\.position_embedding\.weight$", "text_encoder.positional_embedding"),
                 (r"^text_model\.encoder\.layers\.(\d+)\.", r"text_encoder.transformer.resblocks.\1."),
                 (r"^text_model\.final_layer_norm\.", "text_encoder.ln_final."),
                 (r"^visual_projection\.[01]\.", None), (r"^text_projection\.[01]\.", None)]
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        m = _re.match(r"^(visual|text)_projection\.(\d)\.(.+)$", k)
        if m:
            side = "img_projector" if m.group(1) == "visual" else "text_projector"
            idx, rest = int(m.group(2)), m.group(3)
            if idx == 0:
                out[f"{side}.linear_hidden.0.{rest}"] = v[..., None] if rest == "weight" else v
            elif idx == 1:
                out[f"{side}.linear_hidden.1.{rest}"] = v
            elif idx == 3:
                out[f"{side}.linear_out.{rest}"] = v[..., None] if rest == "weight" else v
            continue
        new = k
        for pat, rep in vis_rules:
            if rep is not None and _re.search(pat, new):
                new = _re.sub(pat, rep, new)
                break
        text = new.startswith("text_encoder.transformer")
        if new.startswith("img_encoder.layers") and ".blocks." in new:
            new = (new.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
                   .replace(".self_attn.out_proj.", ".attn.proj."))
        elif text:
            new = (new.replace(".layer_norm1.", ".ln_1.").replace(".layer_norm2.", ".ln_2.")
                   .replace(".mlp.fc1.", ".mlp.c_fc.").replace(".mlp.fc2.", ".mlp.c_proj.")
                   .replace(".self_attn.out_proj.", ".attn.out_proj."))
        new = new.replace(".pre_assign_attn.attn.out_proj.", ".pre_assign_attn.attn.proj.")
        m = _re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", new)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        out[new] = v
    for (prefix, kind), parts in qkv.items():
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        if prefix.startswith("text_encoder"):
            out[f"{prefix}.attn.in_proj_{kind}"] = fused
        else:
            out[f"{prefix}.attn.qkv.{kind}"] = fused
    if "logit_scale" in out:
        out.setdefault("multi_label_logit_scale", out["logit_scale"].clone())
    return out


def _extract_state(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        sd = hf_to_official(sd)
    return sd


def infer_config(sd: dict[str, torch.Tensor]) -> Config:
    """The architecture a state dict (official layout) was trained with, read from tensor shapes."""
    emb = sd["img_encoder.patch_embed.proj.weight"]
    dim, patch = emb.shape[0], emb.shape[-1]
    n_stages = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("img_encoder.layers."))
    depths = tuple(1 + max([int(k.split(".")[4]) for k in sd if k.startswith(f"img_encoder.layers.{i}.blocks.")],
                           default=-1) for i in range(n_stages))
    groups = tuple(sd[f"img_encoder.layers.{i}.group_token"].shape[1] if f"img_encoder.layers.{i}.group_token" in sd
                   else 0 for i in range(n_stages))
    outs = tuple(sd[f"img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight"].shape[0] for i in range(n_stages - 1))
    tw = sd["text_encoder.positional_embedding"].shape[1]
    tl = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_encoder.transformer.resblocks."))
    # head counts are not visible in weight shapes: take them from a named config of the same shape, else
    # the ViT / CLIP convention of 64 channels per head
    known = [c for c in CONFIGS.values() if (c.embed_dim, c.depths, c.num_group_tokens, c.text_width)
             == (dim, depths, groups, tw)]
    heads = known[0].num_heads if known else max(1, dim // 64)
    theads = known[0].text_heads if known else max(1, tw // 64)
    return Config(img_size=int(round(math.sqrt(sd["img_encoder.pos_embed"].shape[1]))) * patch, patch_size=patch,
                  embed_dim=dim, depths=depths, num_heads=heads, num_group_tokens=groups, num_output_groups=outs,
                  text_width=tw, text_layers=tl, text_heads=theads,
                  context_length=sd["text_encoder.positional_embedding"].shape[0],
                  vocab_size=sd["text_encoder.token_embedding.weight"].shape[0],
                  proj_inner=sd["img_projector.linear_hidden.0.weight"].shape[0],
                  proj_dim=sd["img_projector.linear_out.weight"].shape[0])


def from_state_dict(sd: dict[str, torch.Tensor], cfg: Config | None = None, img_size: int | None = None,
                    source: str = "state dict") -> GroupViT:
    """A GroupViT holding ``sd`` (official or HF layout). ``img_size`` resizes the position embedding
    permanently (bicubic), e.g. 384 for the thesis's high-resolution fine-tuning."""
    sd = _extract_state(sd)
    cfg = cfg or infer_config(sd)
    if img_size and img_size != cfg.img_size:
        g = img_size // cfg.patch_size
        sd = dict(sd, **{"img_encoder.pos_embed": interpolate_pos_embed(sd["img_encoder.pos_embed"], (g, g))})
        cfg = replace(cfg, img_size=img_size)
    model = GroupViT(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("multi_label_logit_scale")]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit GroupViT {cfg}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def weights_path(name: str) -> Path:
    """Where an official checkpoint is cached: ``cache_dir()/groupvit/<file name of the release>``."""
    return paths.cache_dir() / "groupvit" / URLS[name].rsplit("/", 1)[1]


def load(name_or_path: str | Path = "small", device: str | torch.device = "cpu", img_size: int | None = None,
         download: bool = True, seed: int = 0) -> GroupViT:
    """A GroupViT in eval mode.

    - ``"small"`` / ``"random:<config>"``: seeded random init (offline; figure titles say so);
    - ``"group_vit_gcc_yfcc_30e"`` / ``"group_vit_gcc_redcap_30e"``: official release, downloaded once into
      ``cache_dir()/groupvit`` and read by :func:`read_checkpoint` (no code from the file runs);
    - ``"nvidia/groupvit-gcc-yfcc"``: HF hub weights through ``huggingface_hub`` (if installed), renamed;
    - a path to a ``.pth``/``.pt`` (official or HF layout, maybe nested under ``model``) or ``.safetensors``.
    """
    name = str(name_or_path)
    if name in CONFIGS and name not in URLS or name.startswith("random:"):
        return build(name.removeprefix("random:"), seed).to(device)
    if name in URLS:
        path = weights_path(name)
        if not path.exists():
            msg = (f"GroupViT weights {name!r} are not available offline. Download\n  {URLS[name]}\n"
                   f"and put the file at\n  {path}\n(or set NBSUPPORT_CACHE to a folder holding "
                   f"groupvit/{path.name}, or pass the file's path to groupvit.load). Offline alternative: "
                   f"'random:small'.")
            if not download:
                raise WeightsUnavailableError(msg)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # torch.hub writes a temporary file and renames it: no half file is left behind
                torch.hub.download_url_to_file(URLS[name], str(path), progress=True)
            except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
                raise WeightsUnavailableError(msg + f"\n(download failed: {e})") from e
        model = from_state_dict(read_checkpoint(path), CONFIGS[name], img_size, source=str(path))
        model.nbs_info = {"name": name, "pretrained": True, "description": f"GroupViT {name}"}
        return model.to(device)
    if name in HF_REPOS:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise ImportError("loading from the HF hub needs huggingface_hub; or pass a local file") from e
        try:
            path = Path(hf_hub_download(name, "model.safetensors", cache_dir=paths.cache_dir() / "groupvit"))
        except Exception:
            path = Path(hf_hub_download(name, "pytorch_model.bin", cache_dir=paths.cache_dir() / "groupvit"))
        model = _load_file(path, img_size)
        model.nbs_info = {"name": name, "pretrained": True, "description": f"GroupViT {name} (HF)"}
        return model.to(device)
    if name in SHIPPED:   # tiny offline models trained by nbsupport.grouptrain (see SHIPPED)
        path = paths.data_dir() / "weights" / SHIPPED[name][0]
        if not path.is_file():
            raise FileNotFoundError(f"{name!r}: shipped weights {path} are missing; retrain them with "
                                    f"{SHIPPED[name][1]}")
        model = _load_file(path, img_size)
        model.nbs_info = {"name": name, "pretrained": True, "description": f"{name} (tiny GroupViT trained on the "
                                                                         "synthetic world)"}
        return model.to(device)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"{name!r} is neither a file nor a known GroupViT: "
                                f"{sorted(CONFIGS)} + {sorted(HF_REPOS)} or random:<config>")
    model = _load_file(path, img_size)
    model.nbs_info = {"name": path.name, "pretrained": True, "description": f"GroupViT ({path.name})"}
    return model.to(device)


def _load_file(path: Path, img_size):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path))
    else:
        obj = read_checkpoint(path)
    return from_state_dict(obj, None, img_size, source=str(path))


# ============================================================================================== tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table: printable Latin-1 bytes map to themselves (listed
    first: the vocabulary's order depends on it), the other bytes to ``chr(256 + n)``."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


class Tokenizer:
    """CLIP byte-pair-encoding tokenizer from the packaged vocabulary (no network): lower-cased text ->
    ``[<|startoftext|>, ..., <|endoftext|>]`` ids padded with 0 to ``context_length`` (77).

    Uses ``regex`` for the Unicode letter/number classes when installed, else the stdlib ``re`` with
    ``[^\\W\\d_]`` / ``\\d`` (identical on ASCII text; may differ on rare scripts). ``ftfy`` (mojibake repair)
    is applied when installed; without it only HTML unescaping and whitespace cleaning are done."""

    SOT, EOT = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77):
        bpe_path = Path(bpe_path) if bpe_path else Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(l.split()) for l in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [self.SOT, self.EOT]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self.sot, self.eot = self.encoder[self.SOT], self.encoder[self.EOT]
        try:
            import regex
            self._pat = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                                      r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
        except ImportError:
            self._pat = _re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|"
                                    r"[^\s\w]+|_+", _re.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    @staticmethod
    def clean(text: str) -> str:
        try:
            import ftfy
            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        return _re.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        ids = []
        for tok in self._pat.findall(self.clean(text)):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(tok))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (self.sot, self.eot, 0))
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts, context_length: int | None = None, truncate: bool = True) -> torch.Tensor:
        """``[K, context_length]`` int64 ids for a string or list of strings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        L = context_length or self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(t) + [self.eot]
            if len(ids) > L:
                if not truncate:
                    raise ValueError(f"text {t!r} has {len(ids)} tokens > context length {L}")
                ids = ids[:L - 1] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """The shared :class:`Tokenizer` (the vocabulary is read once)."""
    return Tokenizer()


TEMPLATES = {"simple": ("a photo of a {}.",)}


@torch.no_grad()
def text_embeddings(model: GroupViT, class_names, templates=TEMPLATES["simple"]) -> torch.Tensor:
    """Class embeddings ``[N, P]``: each name in every template, encoded, averaged over templates and
    L2-normalised (official ``build_text_embedding``; thesis section 4.6.1)."""
    names = list(class_names)
    prompts = [t.format(n) for n in names for t in templates]
    dev = next(model.parameters()).device
    z = model.encode_text(tokenizer()(prompts, context_length=model.cfg.context_length).to(dev))
    z = z.reshape(len(names), len(templates), -1).mean(1)
    return F.normalize(z, dim=-1)


# ============================================================================================== inference
BG_THRESH = {"voc": 0.95, "coco": 0.9, "context": 0.35, "ade20k": 0.95}   # thesis section 5.3


def resize_attn(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``[..., G, N]`` patch attention -> ``[..., G, H, W]`` bilinear at pixel resolution (as the official code)."""
    lead = attn.shape[:-1]
    maps = attn.reshape(-1, 1, *grid) if attn.ndim == 1 else attn.reshape(-1, attn.shape[-2], *grid)
    out = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def label_logits(attn_px: torch.Tensor, group_embeds: torch.Tensor, image_embed: torch.Tensor,
                 text_embeds: torch.Tensor, scale: float = 100.0, topk: int = 5,
                 bg_thresh: float | None = 0.95) -> torch.Tensor:
    """Eq 28-35 for one image: ``attn_px [G, H, W]`` (Attn at pixels, Eq 32-33), normalised ``group_embeds
    [G, P]``, ``image_embed [P]``, ``text_embeds [N, P]`` -> logits ``[N (+1), H, W]`` (channel 0 =
    background when ``bg_thresh`` is not None).

    A_ST = scale K^I Z^T (Eq 28) and A_IT = softmax(scale Z^I Z^T) (Eq 29-30); only the ``topk`` classes of
    A_IT stay (others -inf), softmax, times softmax(A_ST) (Eq 31); every pixel takes its argmax group's row
    (one-hot Attn, Eq 33-34); background where the best score < min(bg_thresh, best group score) (Eq 35)."""
    n = text_embeds.shape[0]
    a_st = scale * group_embeds @ text_embeds.T                         # [G, N]
    a_it = (scale * image_embed @ text_embeds.T).softmax(-1)            # [N]
    keep = torch.zeros(n, dtype=torch.bool, device=a_st.device)
    keep[a_it.topk(min(topk, n)).indices] = True
    aff = a_st.masked_fill(~keep, float("-inf")).softmax(-1) * a_st.softmax(-1)
    onehot = F.one_hot(attn_px.argmax(0), attn_px.shape[0]).to(aff.dtype)   # [H, W, G]
    fg = (onehot @ aff).permute(2, 0, 1)                                # [N, H, W]
    if bg_thresh is None:
        return fg
    bg = (fg.max(0).values < min(bg_thresh, aff.max().item())).to(fg.dtype)
    return torch.cat([bg[None], fg], 0)


@torch.no_grad()
def segment_logits(model: GroupViT, images: torch.Tensor, text_embeds: torch.Tensor, topk: int = 5,
                   bg_thresh: float | None = 0.95) -> torch.Tensor:
    """Paper inference on whole windows: ``images [B, 3, H, W]`` -> logits ``[B, N (+1), H, W]``."""
    out = model.encode_image(images)
    attn_px = resize_attn(out.attn, out.grid, images.shape[-2:])
    scale = float(model.scale)
    return torch.stack([label_logits(attn_px[b], out.group_embeds[b], out.image_embeds[b], text_embeds, scale,
                                     topk, bg_thresh) for b in range(len(images))])


@torch.no_grad()
def segment(model: GroupViT, image: torch.Tensor, class_names=None, text_embeds: torch.Tensor | None = None,
            short_side: int | None = 448, window: int | None = 448, stride: int = 224, topk: int = 5,
            bg_thresh: float | None = 0.95, templates=TEMPLATES["simple"], return_logits: bool = False):
    """Zero-shot semantic segmentation as GroupViT evaluates it (thesis section 4.6, Eq 29-35).

    ``image [3, H, W]`` (ImageNet-normalised) is resized so its short side is ``short_side`` (None: kept),
    split into ``window`` crops every ``stride`` pixels (mmseg's sliding window; None: whole image), each crop
    scored by :func:`label_logits`, overlapping logits averaged and resized back to ``H x W``. Returns the
    label map ``[H, W]`` int64 (0 = background and class ``i`` = ``i+1`` when ``bg_thresh`` is set, else
    class ``i`` = ``i``), and the logits ``[C, H, W]`` with ``return_logits``."""
    if text_embeds is None:
        if class_names is None:
            raise ValueError("pass class_names or text_embeds")
        text_embeds = text_embeddings(model, class_names, templates)
    if image.ndim != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    H0, W0 = image.shape[-2:]
    x = image[None]
    if short_side:
        s = short_side / min(H0, W0)
        x = F.interpolate(x, size=(max(1, round(H0 * s)), max(1, round(W0 * s))), mode="bilinear", align_corners=False)
    p = model.cfg.patch_size
    H, W = x.shape[-2:]
    Hp, Wp = -(-H // p) * p, -(-W // p) * p
    x = F.pad(x, (0, Wp - W, 0, Hp - H))
    if window is None or (Hp <= window and Wp <= window):
        logits = segment_logits(model, x, text_embeds, topk, bg_thresh)[0]
    else:
        logits = None
        count = torch.zeros(1, Hp, Wp, device=x.device)
        ny = max(Hp - window + stride - 1, 0) // stride + 1
        nx = max(Wp - window + stride - 1, 0) // stride + 1
        for iy in range(ny):
            for ix in range(nx):
                y2, x2 = min(iy * stride + window, Hp), min(ix * stride + window, Wp)
                y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
                crop = segment_logits(model, x[..., y1:y2, x1:x2], text_embeds, topk, bg_thresh)[0]
                if logits is None:
                    logits = torch.zeros(crop.shape[0], Hp, Wp, device=x.device)
                logits[:, y1:y2, x1:x2] += crop
                count[:, y1:y2, x1:x2] += 1
        logits = logits / count
    logits = logits[:, :H, :W]
    if (H, W) != (H0, W0):
        logits = F.interpolate(logits[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
    pred = logits.argmax(0)
    return (pred, logits) if return_logits else pred


# ============================================================================================== section 5.4
def group_segmentation(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Eq 47: ``argmax_g interpolate(Attn)``: ``attn [G, N]`` -> group index per pixel ``[H, W]``."""
    return resize_attn(attn, grid, size).argmax(0)


def soft_labels(groups: torch.Tensor | np.ndarray, gt: np.ndarray, n_groups: int, n_classes: int,
                ignore: int = 255) -> np.ndarray:
    """Soft label of every group (section 5.4.1): ``[n_groups, n_classes]`` class fractions of its pixels
    (``ignore`` pixels skipped; a group without pixels gets an all-zero row)."""
    g = np.asarray(groups).ravel()
    y = np.asarray(gt).ravel()
    keep = y != ignore
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (g[keep], y[keep]), 1)
    tot = counts.sum(1, keepdims=True)
    return np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)


def knn_labels(train_feats, train_soft, query_feats, k: int = 10, metric: str = "cosine") -> np.ndarray:
    """Eq 48-49: mean soft label of each query's ``k`` nearest training segment features, then argmax."""
    from sklearn.neighbors import NearestNeighbors

    tf = np.asarray(train_feats, dtype=np.float32)
    qf = np.asarray(query_feats, dtype=np.float32)
    k = min(k, len(tf))
    idx = NearestNeighbors(n_neighbors=k, metric=metric).fit(tf).kneighbors(qf, return_distance=False)
    return np.asarray(train_soft)[idx].mean(1).argmax(-1)


def balanced_subset(soft: np.ndarray, max_per_class: int = 1000, seed: int = 0) -> np.ndarray:
    """Indices keeping at most ``max_per_class`` features per majority class (the thesis's balancing)."""
    major = np.asarray(soft).argmax(1)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(major == c))[:max_per_class] for c in np.unique(major)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)


def gt_group_labels(l_affinity: torch.Tensor | np.ndarray, gt: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Eq 50-51 (visual-text alignment with ground-truth groups): for every class region ``G_c`` of ``gt
    [H, W]`` average ``L_affinity [C, H, W]`` over its pixels and label the whole region with the argmax.
    Returns the prediction ``[H, W]`` (``ignore`` where gt is ignored)."""
    la = np.asarray(l_affinity.detach().cpu() if torch.is_tensor(l_affinity) else l_affinity)
    gt = np.asarray(gt)
    pred = np.full(gt.shape, ignore, dtype=np.int64)
    for c in np.unique(gt):
        if c == ignore:
            continue
        m = gt == c
        pred[m] = int(la[:, m].mean(1).argmax())
    return pred
