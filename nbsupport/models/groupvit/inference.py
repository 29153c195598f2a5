"""GroupViT's zero-shot segmentation (thesis 4.6, Eq 29-35): prompted class embeddings, label logits per
pixel from the chained group attention, top-5 classes, background threshold, sliding window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nbsupport.models.groupvit.model import GroupViT
from nbsupport.models.groupvit.tokenizer import tokenizer

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
BG_THRESH = {"voc": 0.95, "coco": 0.9, "context": 0.35, "ade20k": 0.95}  # thesis section 5.3


def resize_attn(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``[..., G, N]`` patch attention -> ``[..., G, H, W]`` bilinear at pixel resolution (as the official code)."""
    lead = attn.shape[:-1]
    maps = attn.reshape(-1, 1, *grid) if attn.ndim == 1 else attn.reshape(-1, attn.shape[-2], *grid)
    out = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def label_logits(
    attn_px: torch.Tensor,
    group_embeds: torch.Tensor,
    image_embed: torch.Tensor,
    text_embeds: torch.Tensor,
    scale: float = 100.0,
    topk: int = 5,
    bg_thresh: float | None = 0.95,
) -> torch.Tensor:
    """Eq 28-35 for one image: ``attn_px [G, H, W]`` (Attn at pixels, Eq 32-33), normalised ``group_embeds
    [G, P]``, ``image_embed [P]``, ``text_embeds [N, P]`` -> logits ``[N (+1), H, W]`` (channel 0 =
    background when ``bg_thresh`` is not None).

    A_ST = scale K^I Z^T (Eq 28) and A_IT = softmax(scale Z^I Z^T) (Eq 29-30); only the ``topk`` classes of
    A_IT stay (others -inf), softmax, times softmax(A_ST) (Eq 31); every pixel takes its argmax group's row
    (one-hot Attn, Eq 33-34); background where the best score < min(bg_thresh, best group score) (Eq 35)."""
    n = text_embeds.shape[0]
    a_st = scale * group_embeds @ text_embeds.T  # [G, N]
    a_it = (scale * image_embed @ text_embeds.T).softmax(-1)  # [N]
    keep = torch.zeros(n, dtype=torch.bool, device=a_st.device)
    keep[a_it.topk(min(topk, n)).indices] = True
    aff = a_st.masked_fill(~keep, float("-inf")).softmax(-1) * a_st.softmax(-1)
    onehot = F.one_hot(attn_px.argmax(0), attn_px.shape[0]).to(aff.dtype)  # [H, W, G]
    fg = (onehot @ aff).permute(2, 0, 1)  # [N, H, W]
    if bg_thresh is None:
        return fg
    bg = (fg.max(0).values < min(bg_thresh, aff.max().item())).to(fg.dtype)
    return torch.cat([bg[None], fg], 0)


@torch.no_grad()
def segment_logits(
    model: GroupViT, images: torch.Tensor, text_embeds: torch.Tensor, topk: int = 5, bg_thresh: float | None = 0.95
) -> torch.Tensor:
    """Paper inference on whole windows: ``images [B, 3, H, W]`` -> logits ``[B, N (+1), H, W]``."""
    out = model.encode_image(images)
    attn_px = resize_attn(out.attn, out.grid, images.shape[-2:])
    scale = float(model.scale)
    return torch.stack(
        [
            label_logits(attn_px[b], out.group_embeds[b], out.image_embeds[b], text_embeds, scale, topk, bg_thresh)
            for b in range(len(images))
        ]
    )


@torch.no_grad()
def segment(
    model: GroupViT,
    image: torch.Tensor,
    class_names=None,
    text_embeds: torch.Tensor | None = None,
    short_side: int | None = 448,
    window: int | None = 448,
    stride: int = 224,
    topk: int = 5,
    bg_thresh: float | None = 0.95,
    templates=TEMPLATES["simple"],
    return_logits: bool = False,
):
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
