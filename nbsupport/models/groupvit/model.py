"""GroupViT's architecture (thesis 4.4-4.5, Eq 12-20) with the official NVlabs module names, so that an
official state dict loads without renaming; every intermediate is returned by ``encode_image``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


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
            raise ValueError(
                "depths, num_group_tokens (one per stage) and num_output_groups (one per grouping "
                f"stage) disagree: {self.depths}, {self.num_group_tokens}, {self.num_output_groups}"
            )
        if self.embed_dim % self.num_heads or self.text_width % self.text_heads:
            raise ValueError("embed_dim / text_width must be divisible by num_heads / text_heads")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


CONFIGS: dict[str, Config] = {
    "group_vit_gcc_yfcc_30e": Config(),
    "group_vit_gcc_redcap_30e": Config(),
    # seconds-fast offline model: patch 8 at 64 px -> 8x8 patches, 16 then 4 groups
    "small": Config(
        img_size=64,
        patch_size=8,
        embed_dim=96,
        depths=(2, 1, 1),
        num_heads=3,
        num_group_tokens=(16, 4, 0),
        num_output_groups=(16, 4),
        text_width=64,
        text_layers=2,
        text_heads=1,
        proj_inner=128,
        proj_dim=32,
    ),
    # "small" at the tiny DINO's width (128, 4 heads, 4 blocks): its image encoder can start from
    # tiny_dino_synth (nbsupport.training.groupvit.init_image_encoder)
    "small128": Config(
        img_size=64,
        patch_size=8,
        embed_dim=128,
        depths=(2, 1, 1),
        num_heads=4,
        num_group_tokens=(16, 4, 0),
        num_output_groups=(16, 4),
        text_width=64,
        text_layers=2,
        text_heads=1,
        proj_inner=128,
        proj_dim=32,
    ),
}


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
        out = F.scaled_dot_product_attention(
            _heads(self.q_proj(query), h), _heads(self.k_proj(key), h), _heads(self.v_proj(key), h)
        )
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
        self.scale = dim**-0.5
        self.assign_eps, self.hard, self.gumbel_tau = assign_eps, hard, gumbel_tau

    def forward(self, groups, segments):
        logits = (self.q_proj(groups) @ self.k_proj(segments).transpose(-2, -1)) * self.scale  # [B, G, M]
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
        self.downsample = (
            GroupingBlock(dim, cfg.num_heads, g, cfg.num_output_groups[i], cfg) if i < len(cfg.depths) - 1 else None
        )
        if i > 0 and g > 0:
            self.group_projector = nn.Sequential(nn.LayerNorm(dim), MixerMlp(cfg.num_group_tokens[i - 1], dim // 2, g))
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
        x, g = x[:, : -self.num_group_token], x[:, -self.num_group_token :]
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
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2, cfg.embed_dim))
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
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.text_width)

    def forward(self, ids):
        L = ids.shape[-1]
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        mask = torch.full((L, L), float("-inf"), device=ids.device).triu_(1)
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), ids.argmax(-1)]  # the end-of-text token (highest id)


class ProjectMLP(nn.Module):
    """2-layer projector into the joint space (Eq 19, 27): ``C -> inner -> BN -> ReLU -> P``; 1x1 convolutions
    as in the official code so the checkpoint's weight shapes load unchanged."""

    def __init__(self, d_in: int, inner: int, d_out: int):
        super().__init__()
        self.linear_hidden = nn.Sequential(nn.Conv1d(d_in, inner, 1), nn.BatchNorm1d(inner), nn.ReLU(inplace=True))
        self.linear_out = nn.Conv1d(inner, d_out, 1)

    def forward(self, x):
        squeeze = x.ndim == 2
        x = x[:, None] if squeeze else x  # [B, L, C]
        x = self.linear_out(self.linear_hidden(x.transpose(1, 2))).transpose(1, 2)
        return x[:, 0] if squeeze else x


@dataclass
class ImageOutput:
    """Everything :meth:`GroupViT.encode_image` computes (lists have one entry per grouping stage ``l``)."""

    grid: tuple  # (h, w) patch grid
    patch_tokens: torch.Tensor  # [B, N, C] embedded patches S^1 (Eq 12)
    segment_tokens: list  # Ŝ^l [B, M_l, C]: segments after stage l's transformer (Eq 14); [0] = stage-1 patches
    group_tokens: list  # Ĝ^l [B, G_l, C] after the transformer
    soft: list  # A^l [B, G_l, M_l] soft assignment, softmax over groups (Eq 15, no noise)
    hard: list  # Â^l [B, G_l, M_l] hard one-hot assignment (Eq 16)
    final_tokens: torch.Tensor  # Ŝ^3 [B, G_last, C] final-stage segment tokens after the last LayerNorm
    image_feat: torch.Tensor  # [B, C] average pool (Eq 19 before the MLP)
    image_embeds: torch.Tensor  # Z^I [B, P] L2-normalised (Eq 19)
    group_embeds: torch.Tensor  # K^I [B, G_last, P] L2-normalised (Eq 27)
    attn: torch.Tensor  # Attn [B, G_last, N] = A^2 A^1 (Eq 32), a distribution over groups per patch
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
            attn = a @ attn  # [B, G_{l+1}, G_l] @ [B, G_l, N]
        return ImageOutput(
            grid=grid,
            patch_tokens=patch_tokens,
            segment_tokens=seg,
            group_tokens=grp,
            soft=soft,
            hard=hard,
            final_tokens=final,
            image_feat=feat,
            image_embeds=F.normalize(self.img_projector(feat), dim=-1),
            group_embeds=F.normalize(self.img_projector(final), dim=-1),
            attn=attn,
        )

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

    for _name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            normal_(m.weight, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            normal_(m.in_proj_weight, model.cfg.text_width**-0.5)
            nn.init.zeros_(m.in_proj_bias)
    normal_(model.img_encoder.pos_embed, 0.02)
    normal_(model.text_encoder.token_embedding.weight, 0.02)
    normal_(model.text_encoder.positional_embedding, 0.01)
    for st in model.img_encoder.layers:
        if st.group_token is not None and st.group_projector is None:
            normal_(st.group_token, 0.02)  # the official code zero-inits tokens that get a projection
    return model


def build(config: str | Config = "small", seed: int = 0) -> GroupViT:
    """A seeded random-init GroupViT of a named config (:data:`CONFIGS`) in eval mode."""
    if isinstance(config, str) and config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose from {sorted(CONFIGS)}")
    cfg = CONFIGS[config] if isinstance(config, str) else config
    m = init_weights(GroupViT(cfg), seed).eval()
    m.nbs_info = {
        "name": f"random:{config if isinstance(config, str) else 'custom'}",
        "pretrained": False,
        "seed": seed,
        "description": f"random-init GroupViT-{config if isinstance(config, str) else 'custom'} (seed {seed})",
    }
    return m


def describe(model: GroupViT) -> str:
    """One line for figure titles: which weights these are (e.g. ``random-init GroupViT-small (seed 0)``)."""
    return model.nbs_info.get("description", "GroupViT")
