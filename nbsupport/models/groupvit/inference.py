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
# GroupViT's configs (segmentation/configs/_base_/datasets/*.py): VOC 0.95, COCO-Object 0.95, Context 0.35;
# ADE20K 0.95 from OVSegmentor's config, as thesis 5.3 takes it (ADE20K has no background class, so it is
# never applied). Thesis 5.3 writes 0.9 for COCO, but the reference 24.3 it repeats (Table 5) is the config's
# 0.95 run; nbsupport.analysis.zero_shot_protocol holds the sources.
BG_THRESH = {"voc": 0.95, "coco": 0.95, "coco_object": 0.95, "context": 0.35, "ade20k": 0.95}


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


def _padded_logits(model: GroupViT, x: torch.Tensor, text_embeds, topk, bg_thresh) -> torch.Tensor:
    """:func:`segment_logits` of ``x [B, 3, h, w]`` zero-padded (bottom / right) to a multiple of the patch
    size and cropped back to ``h x w``: only a crop narrower than the window needs it at the protocol's
    448 px."""
    p = model.cfg.patch_size
    h, w = x.shape[-2:]
    xp = F.pad(x, (0, -(-w // p) * p - w, 0, -(-h // p) * p - h))
    return segment_logits(model, xp, text_embeds, topk, bg_thresh)[..., :h, :w]


def protocol_size(h: int, w: int, short_side: int | None, max_long: int | None = None) -> tuple[int, int]:
    """``(H', W')`` of an ``h x w`` image rescaled keeping its aspect so that the short side is ``short_side``
    unless the long side would then pass ``max_long`` (mmcv's ``Resize(keep_ratio=True)`` with ``img_scale=
    (max_long, short_side)``: scale = min(max_long / long, short_side / short), sizes rounded half up);
    ``short_side=None``: unchanged."""
    if not short_side:
        return int(h), int(w)
    s = short_side / min(h, w)
    if max_long:
        s = min(s, max_long / max(h, w))
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Start of every sliding window along one axis of ``size`` px (mmseg's ``slide_inference``: ``ceil((size -
    window) / stride) + 1`` windows, the last one flush with the end, one window when ``size <= window``)."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(n)]


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
    max_long: int | None = None,
    window_batch: int = 1,
):
    """Zero-shot semantic segmentation as GroupViT evaluates it (thesis section 4.6, Eq 29-35).

    ``image [3, H, W]`` (ImageNet-normalised) is resized so its short side is ``short_side`` (None: kept;
    ``max_long`` caps the long side as mmcv's ``img_scale=(2048, 448)`` does: :func:`protocol_size`), split
    into ``window`` crops every ``stride`` pixels (mmseg's sliding window over the resized image; None: whole
    image), each crop (zero-padded to a multiple of the patch when smaller) scored by :func:`label_logits`
    (``window_batch`` crops per forward pass), overlapping logits averaged and resized back to ``H x W``. Returns the label map ``[H, W]`` int64 (0 = background and class ``i`` =
    ``i+1`` when ``bg_thresh`` is set, else class ``i`` = ``i``), and the logits ``[C, H, W]`` with
    ``return_logits``."""
    if text_embeds is None:
        if class_names is None:
            raise ValueError("pass class_names or text_embeds")
        text_embeds = text_embeddings(model, class_names, templates)
    if image.ndim != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    H0, W0 = image.shape[-2:]
    x = image[None]
    size = protocol_size(H0, W0, short_side, max_long)
    if size != (H0, W0):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    H, W = x.shape[-2:]
    if window is None or (H <= window and W <= window):
        logits = _padded_logits(model, x, text_embeds, topk, bg_thresh)[0]
    else:  # windows over the resized image itself, as mmseg slides them (not over a padded copy)
        boxes = [(y, xx) for y in window_origins(H, window, stride) for xx in window_origins(W, window, stride)]
        h, w = min(window, H), min(window, W)  # every crop has this size
        logits = None
        count = torch.zeros(1, H, W, device=x.device)
        step = max(1, int(window_batch))
        for s in range(0, len(boxes), step):
            chunk = boxes[s : s + step]
            crops = torch.cat([x[..., y : y + h, xx : xx + w] for y, xx in chunk])
            out = _padded_logits(model, crops, text_embeds, topk, bg_thresh)
            if logits is None:
                logits = torch.zeros(out.shape[1], H, W, device=x.device)
            for (y, xx), crop in zip(chunk, out):
                logits[:, y : y + h, xx : xx + w] += crop
                count[:, y : y + h, xx : xx + w] += 1
        logits = logits / count
    if (H, W) != (H0, W0):
        logits = F.interpolate(logits[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
    pred = logits.argmax(0)
    return (pred, logits) if return_logits else pred


# ============================================================================================== section 5.4
def group_segmentation(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Eq 47: ``argmax_g interpolate(Attn)``: ``attn [G, N]`` -> group index per pixel ``[H, W]``."""
    return resize_attn(attn, grid, size).argmax(0)
