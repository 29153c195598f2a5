"""Which parts of GroupViT train (thesis Table 5) and how its image encoder can start from a timm ViT."""

from __future__ import annotations

import torch

from nbsupport.models import groupvit as gv


# ============================================================================================== components
def components(model: gv.GroupViT) -> dict[str, list[str]]:
    """Trainable component name -> module prefixes (thesis Table 5): ``grouping_blocks`` (all),
    ``grouping_block1`` / ``grouping_block2`` ..., ``img_projector``, ``text_projector``, ``projectors``
    (both), ``img_encoder``, ``text_encoder``, ``logit_scale`` (both temperatures), ``pos_embed`` (the image
    position embedding: the resized one of high-resolution fine-tuning, thesis 5.9), ``all``."""
    n = sum(1 for st in model.img_encoder.layers if st.downsample is not None)
    gbs = [f"img_encoder.layers.{i}.downsample." for i in range(n)]
    out = {
        "grouping_blocks": gbs,
        "img_projector": ["img_projector."],
        "text_projector": ["text_projector."],
        "projectors": ["img_projector.", "text_projector."],
        "img_encoder": ["img_encoder."],
        "text_encoder": ["text_encoder."],
        "logit_scale": ["logit_scale", "multi_label_logit_scale"],
        "pos_embed": ["img_encoder.pos_embed"],
        "all": [""],
    }
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
        raise ValueError(
            f"ViT (width {d}, patch {p}, {heads} heads) does not fit GroupViT (width {cfg.embed_dim}, "
            f"patch {cfg.patch_size}, {cfg.num_heads} heads); e.g. tiny_dino_synth fits 'random:small128'"
        )
    if len(vit.blocks) < len(blocks):
        raise ValueError(f"ViT has {len(vit.blocks)} blocks, GroupViT's image encoder needs {len(blocks)}")
    names = {id(m): n for n, m in model.named_modules()}
    copied = []
    with torch.no_grad():
        enc.patch_embed.proj.load_state_dict(vit.patch_embed.proj.state_dict())
        copied += ["img_encoder.patch_embed.proj.weight", "img_encoder.patch_embed.proj.bias"]
        # timm keeps position embeddings for the prefix tokens unless no_embed_class (DINOv2 with registers)
        skip = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 1)
        pos = vit.pos_embed[:, skip:]
        enc.pos_embed.copy_(gv.interpolate_pos_embed(pos, (cfg.grid, cfg.grid)))
        copied.append("img_encoder.pos_embed")
        for dst, src in zip(blocks, vit.blocks):
            ref = src.state_dict()
            dst.load_state_dict({k: ref[k] for k in dst.state_dict()}, strict=True)
            copied += [f"{names[id(dst)]}.{k}" for k in dst.state_dict()]
    return copied


def init_like(model: gv.GroupViT, seed: int = 0) -> gv.GroupViT:
    """A seeded random init of ``model``'s architecture (eval mode)."""
    return gv.init_weights(gv.GroupViT(model.cfg), seed).eval()
