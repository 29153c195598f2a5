"""The model a fine-tuning run starts from, when it is not the loaded GroupViT as it is (thesis 5.9, 5.13,
5.14.2): the position embedding resized once to the training resolution (Table 12), 1 or 3 grouping blocks
initialised from the pretrained 2-block weights (Table 15), DINO patch features grouped by stage 2.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbsupport.models import groupvit as gv

log = logging.getLogger(__name__)


# ============================================================================================== Table 12
def resize_pos_embed(model: gv.GroupViT, image_size: int) -> bool:
    """Thesis 5.9: resize the learned position embedding once (bicubic, :func:`~nbsupport.models.groupvit.
    interpolate_pos_embed`) to the patch grid of ``image_size`` and keep it as the parameter that trains
    (instead of interpolating the pretrained 14 x 14 one on every forward); ``model.cfg.img_size`` follows.
    Returns whether anything changed."""
    p = model.cfg.patch_size
    if image_size % p:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {p}")
    g = image_size // p
    enc = model.img_encoder
    if enc.pos_embed.shape[1] == g * g:
        return False
    with torch.no_grad():
        new = gv.interpolate_pos_embed(enc.pos_embed.detach(), (g, g)).clone()
    enc.pos_embed = nn.Parameter(new, requires_grad=enc.pos_embed.requires_grad)
    model.cfg = replace(model.cfg, img_size=image_size)
    return True


# ============================================================================================== Table 15
#: Source stage (in the 2-block model) of each new stage's group tokens / group projector / grouping block.
_SOURCES = {
    1: {"group_token": (0, None), "group_projector": (None, None), "downsample": (0, None)},
    2: {"group_token": (0, 1, None), "group_projector": (None, 1, None), "downsample": (0, 1, None)},
    3: {"group_token": (0, 0, 1, None), "group_projector": (None, None, 1, None), "downsample": (0, 0, 1, None)},
}


def regrouped_config(cfg: gv.Config, n_blocks: int, final_groups: int = 0) -> gv.Config:
    """The architecture with ``n_blocks`` grouping blocks built from a 2-block ``cfg`` (depths ``(d1, d2,
    d3)``, groups ``(g1, g2, 0)``), the number of transformer blocks unchanged (thesis 5.13):

    - 1 block: ``(d1, d2 + d3)``, groups ``(g1, 0)`` (official: 6 + 6 blocks, 64 final groups);
    - 3 blocks: stage 1 split after ``round(2 d1 / 3)`` blocks, ``(4, 2, 3, 3)`` for the official model (grouping
      after the 4th, 6th and 9th block), groups ``(g1, g1, k, 0)`` with ``k = final_groups or g2`` (8 or 4);
    - 2 blocks: ``(d1, d2, d3)`` with ``k`` final groups."""
    if len(cfg.depths) != 3:
        raise ValueError(f"re-mapping starts from a 2-block GroupViT, got depths {cfg.depths}")
    d1, d2, d3 = cfg.depths
    g1, g2 = cfg.num_group_tokens[0], cfg.num_group_tokens[1]
    o1 = cfg.num_output_groups[0]
    k = final_groups or g2
    if k > g2:
        raise ValueError(f"final_group_tokens {k} > the {g2} group tokens the pretrained weights hold")
    if n_blocks == 1:
        return replace(cfg, depths=(d1, d2 + d3), num_group_tokens=(g1, 0), num_output_groups=(o1,))
    if n_blocks == 2:
        return replace(cfg, num_group_tokens=(g1, k, 0), num_output_groups=(o1, k))
    if n_blocks == 3:
        if d1 < 2:
            raise ValueError(f"3 grouping blocks split stage 1, which has {d1} block")
        a = min(d1 - 1, max(1, round(2 * d1 / 3)))
        return replace(cfg, depths=(a, d1 - a, d2, d3), num_group_tokens=(g1, g1, k, 0), num_output_groups=(o1, o1, k))
    raise ValueError(f"n_grouping_blocks must be 1, 2 or 3, got {n_blocks}")


def _source_key(key: str, new: gv.Config, old: gv.Config, n_blocks: int) -> str | None:
    """The 2-block model's parameter that initialises ``key`` of the re-mapped model (None: no counterpart)."""
    m = re.match(r"img_encoder\.layers\.(\d+)\.(.*)$", key)
    if not m:
        return key
    j, rest = int(m.group(1)), m.group(2)
    b = re.match(r"blocks\.(\d+)\.(.*)$", rest)
    if b:  # transformer blocks in order: the i-th block of the new encoder is the i-th of the old one
        i = sum(new.depths[:j]) + int(b.group(1))
        s = next(s for s in range(len(old.depths)) if i < sum(old.depths[: s + 1]))
        return f"img_encoder.layers.{s}.blocks.{i - sum(old.depths[:s])}.{b.group(2)}"
    part = rest.split(".")[0]
    src = _SOURCES[n_blocks].get(part, (None,) * len(new.depths))[j]
    return None if src is None else f"img_encoder.layers.{src}.{rest}"


def regroup(model: gv.GroupViT, n_blocks: int, final_groups: int = 0, seed: int = 0) -> tuple[gv.GroupViT, list]:
    """A GroupViT with ``n_blocks`` grouping blocks (:func:`regrouped_config`) initialised from the 2-block
    ``model`` as thesis 5.13 describes: every transformer block in order (1 block: stage 2's and stage 3's
    blocks become the new stage 2; 3 blocks: the first 4 blocks as they are, the rest sequentially), the
    grouping block and group tokens of stage 1 as they are, the last grouping stage from the pretrained
    second one (its first ``k`` group tokens, and the matching rows of its token-mixing MLPs, when
    ``final_groups`` = ``k`` is smaller); patch embedding, final norm, text side and projectors unchanged.

    The thesis does not say how the inserted middle grouping stage of the 3-block model starts: here it is a
    copy of stage 1's group tokens and grouping block (the same shapes), and its group projector (which has no
    counterpart) is zero at the output, so the stage starts with exactly the copied tokens. Everything without
    a source keeps a seeded random init. Returns the model (eval mode) and the parameters without a source."""
    old_cfg = model.cfg
    cfg = regrouped_config(old_cfg, n_blocks, final_groups)
    if cfg == old_cfg:
        return model, []
    new = gv.init_weights(gv.GroupViT(cfg), seed)
    old_sd = model.state_dict()
    sd = new.state_dict()
    unmapped = []
    for key, target in sd.items():
        src = _source_key(key, cfg, old_cfg, n_blocks)
        if src is None:
            unmapped.append(key)
            continue
        value = old_sd[src]
        if value.shape != target.shape:  # fewer group tokens: the first ones
            if value.ndim != target.ndim or any(t > v for t, v in zip(target.shape, value.shape)):
                raise ValueError(f"{key} {tuple(target.shape)} cannot come from {src} {tuple(value.shape)}")
            value = value[tuple(slice(0, t) for t in target.shape)]
        sd[key] = value.clone()
    if n_blocks == 3:
        for key in sd:
            if key.startswith("img_encoder.layers.1.group_projector.1.fc2."):
                sd[key] = torch.zeros_like(sd[key])
    new.load_state_dict(sd)
    info = dict(getattr(model, "nbs_info", {}))
    info["description"] = f"{info.get('description', 'GroupViT')}, re-mapped to {n_blocks} grouping blocks"
    info["regrouped"] = {"n_blocks": n_blocks, "final_groups": cfg.num_group_tokens[-2]}
    new.nbs_info = info
    return new.eval(), unmapped


# ============================================================================================== 5.14.2
class DinoStage2GroupViT(gv.GroupViT):
    """Thesis 5.14.2: stage 2's grouping block groups DINO's patch features ``D_f`` (``dino_facet`` of
    ``dino_layer``, resized to GroupViT's patch grid) instead of stage 1's segments: ``[D_f; G^2]`` go
    through stage 2's blocks and grouping block, stage 3 follows as usual. Stage 1 still runs for its group
    tokens, which feed stage 2's group projector (Eq 18). ``Attn`` (Eq 32) is then stage 2's assignment over
    the patches. The DINO model is frozen and is not part of the state dict (the exported weights are a
    plain GroupViT's); DINO's width must equal GroupViT's (the thesis: 384 = 384)."""

    def __init__(self, base: gv.GroupViT, dino: nn.Module, facet: str = "key", layer: int = 9):
        super().__init__(base.cfg)
        if len(base.cfg.depths) != 3:
            raise ValueError(f"DINO into stage 2 needs a 2-block GroupViT, got depths {base.cfg.depths}")
        self.load_state_dict(base.state_dict())
        object.__setattr__(self, "_dino", dino.eval().requires_grad_(False))  # not a submodule: not trained, saved
        self.facet, self.layer = facet, layer
        self.nbs_info = dict(getattr(base, "nbs_info", {}))
        self.nbs_info["description"] = f"{self.nbs_info.get('description', 'GroupViT')} + DINO features in stage 2"

    def dino_features(self, images: torch.Tensor, grid: tuple) -> torch.Tensor:
        """``D_f [B, N, D]``: DINO's patch features of ``images`` on GroupViT's ``grid``."""
        from nbsupport.models import features

        dino = self._dino
        if next(dino.parameters()).device != images.device:
            dino.to(images.device)
        with torch.no_grad():
            f = features.extract(dino, images.float(), self.facet, self.layer)  # [B, h, w, D]
            if tuple(f.shape[1:3]) != tuple(grid):
                f = F.interpolate(f.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
                f = f.permute(0, 2, 3, 1)
        if f.shape[-1] != self.cfg.embed_dim:
            raise ValueError(
                f"DINO features of width {f.shape[-1]} cannot enter a GroupViT of width {self.cfg.embed_dim}"
            )
        return f.reshape(len(f), -1, f.shape[-1]).to(images.dtype)

    def encode_image(self, images: torch.Tensor) -> gv.ImageOutput:
        enc, p = self.img_encoder, self.cfg.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"images must be [B, 3, H, W] with H, W multiples of {p}, got {tuple(images.shape)}")
        x = enc.patch_embed.proj(images)
        grid = tuple(x.shape[-2:])
        x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))
        x = x + gv.interpolate_pos_embed(enc.pos_embed, grid)
        _, g1, _ = enc.layers[0](x, None)  # stage 1: only its group tokens are used
        d_f = self.dino_features(images, grid).to(x.dtype)
        x2, g2, o2 = enc.layers[1](d_f, g1)
        x3, _, _ = enc.layers[2](x2, g2)
        final = enc.norm(x3)
        feat = final.mean(1)
        return gv.ImageOutput(
            grid=grid,
            patch_tokens=d_f,
            segment_tokens=[o2["segment_tokens"], x3],
            group_tokens=[o2["group_tokens"]],
            soft=[o2["soft"]],
            hard=[o2["hard"]],
            final_tokens=final,
            image_feat=feat,
            image_embeds=F.normalize(self.img_projector(feat), dim=-1),
            group_embeds=F.normalize(self.img_projector(final), dim=-1),
            attn=o2["soft"],
        )


# ============================================================================================== a run's model
def prepare_model(cfg, model: gv.GroupViT | None = None, resuming: bool = False, training: bool = True):
    """The model a run with ``cfg`` (:class:`~nbsupport.training.groupvit.config.TrainConfig`) trains or
    evaluates: ``model`` or ``groupvit.load(cfg.model)``, re-mapped to ``cfg.n_grouping_blocks`` /
    ``cfg.final_group_tokens`` (:func:`regroup`), its image encoder started from ``cfg.init_image`` (not when
    ``resuming``: the checkpoint has its own weights), the position embedding resized to ``cfg.image_size``
    when ``training`` and ``cfg.pos_embed == "resize"``, and wrapped by :class:`DinoStage2GroupViT` with
    ``cfg.dino_stage2``."""
    from nbsupport.training.groupvit.components import init_image_encoder

    model = model if model is not None else gv.load(cfg.model, seed=cfg.seed)
    if cfg.n_grouping_blocks or cfg.final_group_tokens:
        n = cfg.n_grouping_blocks or len(model.cfg.depths) - 1
        model, unmapped = regroup(model, n, cfg.final_group_tokens, cfg.seed)
        log.info("groupvit: %d grouping blocks (%s); %d tensors without a source", n, model.cfg, len(unmapped))
    if cfg.init_image and not resuming:
        from nbsupport.models import backbones

        copied = init_image_encoder(model, backbones.load(cfg.init_image))
        log.info("groupvit: image encoder initialised from %s (%d tensors)", cfg.init_image, len(copied))
    if training and cfg.pos_embed == "resize" and resize_pos_embed(model, cfg.image_size):
        log.info("groupvit: position embedding resized to %d px (thesis 5.9)", cfg.image_size)
    if cfg.dino_stage2:
        from nbsupport.models import backbones

        model = DinoStage2GroupViT(model, backbones.load(cfg.dino_backbone), cfg.dino_facet, cfg.dino_layer)
    return model
