"""DAVIS-2017 semi-supervised video object segmentation with frozen features (DINO's protocol, also used by
CrOC Appendix C and MMC): the first frame's object masks are propagated frame by frame through patch
affinities, then scored with J (region IoU) and F (boundary F-measure) as the davis2017-evaluation toolkit
defines them.

Propagation (DINO's label propagation, CrOC Appendix C settings ``n_last_frames 7``,
``size_mask_neighborhood 12``, ``topk 5``): the target frame's L2-normalised patch features are compared
with those of the context (the first frame and the ``n_last`` previous frames); the affinity
``exp(cos / temperature)`` is kept only for source patches inside a square window of ``neighbourhood``
patches around the target patch (``|dy|, |dx| <= neighbourhood``), then only the ``topk`` largest
affinities over all context frames together are kept and normalised to sum 1; the target's soft labels are
that weighted sum of the context's soft labels (the first frame's one-hot labels, the previous frames'
propagated soft labels).

Temperature: neither the CrOC nor the MMC text states it. DINO's evaluation script declares a
``--temperature`` option with default 0.7, but its affinity divides by a fixed 0.1 (the option is not
used), so ``TEMPERATURE = 0.1`` here reproduces what DINO's numbers were computed with; pass
``temperature=0.7`` for the declared value.

Metrics (toolkit definitions): J is the IoU of the object's mask and prediction outside void pixels (1 when
both are empty); F matches boundary pixels (:func:`boundary_map`) within ``ceil(0.008 * image diagonal)``
pixels (a disk dilation) and takes the F-measure of precision and recall. Per object, J and F are averaged
over the frames except the first (given) and the last, then over every object of every video; J&F is
their mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

N_LAST_FRAMES = 7
NEIGHBOURHOOD = 12
TOPK = 5
TEMPERATURE = 0.1
BOUND_TH = 0.008
VOID = 255


# -- J and F (davis2017-evaluation definitions)


def _as_bool(m) -> np.ndarray:
    if hasattr(m, "detach"):
        m = m.detach().cpu().numpy()
    return np.asarray(m).astype(bool)


def j_measure(pred, gt, void=None) -> float:
    """Region similarity J: ``|pred & gt| / |pred | gt|`` over non-void pixels; 1 when the union is empty."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
    keep = ~_as_bool(void) if void is not None else np.ones_like(gt)
    union = np.sum((pred | gt) & keep)
    if union == 0:
        return 1.0
    return float(np.sum(pred & gt & keep) / union)


def boundary_map(mask) -> np.ndarray:
    """Boundary pixels of a binary mask as the toolkit's ``seg2bmap`` marks them: a pixel whose value differs
    from its right, lower or lower-right neighbour; on the last row only the right neighbour counts, on the
    last column only the lower one, and the bottom-right pixel is never a boundary."""
    seg = _as_bool(mask)
    if seg.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {seg.shape}")
    right = np.zeros_like(seg)
    down = np.zeros_like(seg)
    diag = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    down[:-1, :] = seg[1:, :]
    diag[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ right) | (seg ^ down) | (seg ^ diag)
    b[-1, :] = seg[-1, :] ^ right[-1, :]
    b[:, -1] = seg[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(shape: Sequence[int], bound_th: float = BOUND_TH) -> int:
    """Matching tolerance in pixels: ``bound_th`` itself when >= 1, else ``ceil(bound_th * diagonal)``
    (480x854 -> 8)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def disk(radius: int) -> np.ndarray:
    """Structuring element ``x^2 + y^2 <= r^2`` (``skimage.morphology.disk``)."""
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def _dilate(b: np.ndarray, radius: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    if radius <= 0 or not b.any():
        return b.copy()
    return binary_dilation(b, structure=disk(radius))


def f_measure(pred, gt, void=None, bound_th: float = BOUND_TH) -> float:
    """Boundary accuracy F: boundaries of ``pred`` and ``gt`` (void pixels removed from both masks first) are
    matched within :func:`boundary_radius`; precision = matched predicted boundary / predicted boundary,
    recall = matched gt boundary / gt boundary, ``F = 2PR / (P + R)``. Empty cases as the toolkit: both
    boundaries empty -> 1; only one empty -> 0."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
    if void is not None:
        keep = ~_as_bool(void)
        pred, gt = pred & keep, gt & keep
    bp, bg = boundary_map(pred), boundary_map(gt)
    r = boundary_radius(pred.shape, bound_th)
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    precision = float(np.sum(bp & _dilate(bg, r)) / n_p)
    recall = float(np.sum(bg & _dilate(bp, r)) / n_g)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# -- propagation


def neighbourhood_mask(h: int, w: int, size: int = NEIGHBOURHOOD, device=None) -> torch.Tensor:
    """``[h*w (target), h*w (source)]`` float: 1 where the source patch lies in the ``(2 size + 1)^2`` window
    around the target patch (Chebyshev distance <= size), else 0; all ones when ``size <= 0``."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    if size <= 0:
        return torch.ones(h * w, h * w, device=device)
    near = ((ys[:, None] - ys[None]).abs() <= size) & ((xs[:, None] - xs[None]).abs() <= size)
    return near.float()


def propagate_step(
    target: torch.Tensor,
    sources: torch.Tensor,
    source_labels: torch.Tensor,
    topk: int = TOPK,
    temperature: float = TEMPERATURE,
    neighbourhood: int = NEIGHBOURHOOD,
    mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Soft labels ``[C, h, w]`` of one target frame from its features ``target [h, w, D]``, the context
    features ``sources [S, h, w, D]`` and their soft labels ``source_labels [S, C, h, w]``.

    Affinity ``exp(cos / temperature)`` inside the spatial window, the ``topk`` largest over all context
    frames kept per target patch (ties at the k-th value are kept too), normalised to sum 1. Target patches
    go in chunks of ``chunk`` so that memory stays ``chunk * S * h * w``; ``mask`` is the precomputed
    :func:`neighbourhood_mask`."""
    h, w, _ = target.shape
    n_src = sources.shape[0]
    t = F.normalize(target.reshape(h * w, -1).float(), dim=-1)
    s = F.normalize(sources.reshape(n_src, h * w, -1).float().to(t.device), dim=-1)
    if mask is None:
        mask = neighbourhood_mask(h, w, neighbourhood, device=t.device)
    labels = source_labels.float().to(t.device).permute(0, 2, 3, 1).reshape(n_src * h * w, -1)  # [S*h*w, C]
    out = torch.empty(h * w, labels.shape[1], device=t.device)
    for a in range(0, h * w, chunk):  # target patches in chunks: the affinity is [chunk, S, h*w]
        aff = torch.exp(torch.einsum("td,snd->tsn", t[a : a + chunk], s) / temperature)
        aff = (aff * mask[a : a + chunk, None, :]).reshape(aff.shape[0], -1)
        kth = aff.topk(min(topk, aff.shape[1]), dim=1).values[:, -1:]
        aff = torch.where(aff >= kth, aff, torch.zeros_like(aff))
        aff = aff / aff.sum(dim=1, keepdim=True).clamp_min(1e-30)
        out[a : a + chunk] = aff @ labels
    return out.T.reshape(-1, h, w)


def one_hot_grid(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[C, h, w]`` one-hot of integer labels ``[h, w]`` (0 background, 1..C-1 objects)."""
    return F.one_hot(labels.long().clamp(0, n_classes - 1), n_classes).permute(2, 0, 1).float()


def propagate_labels(
    feats: torch.Tensor,
    first_labels: torch.Tensor,
    n_classes: int | None = None,
    n_last: int = N_LAST_FRAMES,
    topk: int = TOPK,
    temperature: float = TEMPERATURE,
    neighbourhood: int = NEIGHBOURHOOD,
) -> torch.Tensor:
    """Soft labels ``[T, C, h, w]`` of every frame of a video from its feature grids ``feats [T, h, w, D]``
    and the first frame's patch-level labels ``first_labels [h, w]`` (ints, 0 background). Frame 0 is the
    one-hot input; frame ``t`` is :func:`propagate_step` against frame 0 and frames ``t - n_last .. t - 1``
    (their propagated soft labels, not argmaxed)."""
    if feats.dim() != 4:
        raise ValueError(f"feats must be [T, h, w, D], got {tuple(feats.shape)}")
    n_frames, h, w, _ = feats.shape
    if tuple(first_labels.shape) != (h, w):
        raise ValueError(f"first_labels {tuple(first_labels.shape)} must match the feature grid {(h, w)}")
    n_classes = int(first_labels.max()) + 1 if n_classes is None else int(n_classes)
    mask = neighbourhood_mask(h, w, neighbourhood, device=feats.device)
    first = one_hot_grid(first_labels.to(feats.device), n_classes)
    out = [first]
    for t in range(1, n_frames):
        ctx = [0] + list(range(max(1, t - n_last), t))
        src_labels = torch.stack([out[i] for i in ctx])
        out.append(propagate_step(feats[t], feats[ctx], src_labels, topk, temperature, neighbourhood, mask))
    return torch.stack(out)


def labels_to_pixels(soft: torch.Tensor, patch: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Object ids ``[H, W]`` from soft labels ``[C, h, w]``: bilinear upsampling by the patch size, each class
    map min-max normalised (DINO's ``norm_mask``, for maps with a positive maximum), argmax, then a nearest
    resize to the original frame size ``out_hw``."""
    up = F.interpolate(soft[None].float(), scale_factor=patch, mode="bilinear", align_corners=False)[0]
    for c in range(up.shape[0]):
        if up[c].max() > 0:
            up[c] = up[c] - up[c].min()
            up[c] = up[c] / up[c].max().clamp_min(1e-12)
    ids = up.argmax(0).to(torch.uint8).cpu().numpy()
    from PIL import Image

    return np.asarray(Image.fromarray(ids).resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST)).astype(np.int64)


# -- scoring


def video_scores(
    pred: Sequence[np.ndarray], gt: Sequence[np.ndarray], n_objects: int, bound_th: float = BOUND_TH
) -> dict:
    """Per-object J and F of one video: ``{"J": [n_objects, frames], "F": ...}`` over frames ``1 .. T-2``
    (the toolkit drops the given first frame and the last one; a video of <= 2 frames is scored on every
    frame but the first). ``gt`` frames hold object ids with 255 void; ``pred`` frames object ids."""
    n = len(gt)
    if len(pred) != n:
        raise ValueError(f"{len(pred)} predicted frames for {n} annotated frames")
    frames = list(range(1, n - 1)) if n > 2 else list(range(1, n))
    js = np.zeros((n_objects, len(frames)))
    fs = np.zeros((n_objects, len(frames)))
    for col, t in enumerate(frames):
        g, p = np.asarray(gt[t]), np.asarray(pred[t])
        void = g == VOID
        for o in range(n_objects):
            js[o, col] = j_measure(p == o + 1, g == o + 1, void)
            fs[o, col] = f_measure(p == o + 1, g == o + 1, void, bound_th)
    return {"J": js, "F": fs}


def summarise(per_video: dict) -> dict:
    """The toolkit's global table from ``{video: video_scores(...)}``: ``J-Mean`` / ``F-Mean`` are the means
    over every object of every video of the object's frame-mean, ``J-Recall`` / ``F-Recall`` the mean
    fraction of frames above 0.5, ``J&F-Mean`` their average (values in [0, 1]); ``objects`` lists
    ``(video, object id, J, F)``."""
    objs, jm, fm, jr, fr = [], [], [], [], []
    for video, sc in per_video.items():
        for o in range(sc["J"].shape[0]):
            j, f = sc["J"][o], sc["F"][o]
            jm.append(float(np.nanmean(j)) if j.size else float("nan"))
            fm.append(float(np.nanmean(f)) if f.size else float("nan"))
            jr.append(float(np.mean(j > 0.5)) if j.size else float("nan"))
            fr.append(float(np.mean(f > 0.5)) if f.size else float("nan"))
            objs.append((video, o + 1, jm[-1], fm[-1]))
    if not objs:
        raise ValueError("no objects to score")
    j_mean, f_mean = float(np.nanmean(jm)), float(np.nanmean(fm))
    return {
        "J&F-Mean": (j_mean + f_mean) / 2,
        "J-Mean": j_mean,
        "F-Mean": f_mean,
        "J-Recall": float(np.nanmean(jr)),
        "F-Recall": float(np.nanmean(fr)),
        "objects": objs,
    }


# -- a DAVIS split end to end


def davis_input_size(h: int, w: int, short: int = 480, multiple: int = 64) -> tuple[int, int]:
    """DINO's frame size: the short side to ``short``, the long side scaled alike and floored to a multiple
    of ``multiple`` (at least one multiple)."""
    if h > w:
        tw, th = short, short * h / w
        return max(multiple, int(th // multiple * multiple)), tw
    th, tw = short, short * w / h
    return th, max(multiple, int(tw // multiple * multiple))


def frame_features(model, frames: Sequence, size: tuple[int, int], layer: int = -1, batch_size: int = 8):
    """Normalised last-block tokens ``[T, h, w, D]`` of a video's frames resized to ``size`` (DINO reads
    ``get_intermediate_layers(n=1)``: the block output through the final LayerNorm)."""
    from nbsupport.data.images import image_to_tensor
    from nbsupport.models.features import extract, patch_size

    p = patch_size(model)
    out = []
    for i in range(0, len(frames), batch_size):
        x = torch.stack([image_to_tensor(f, size=size, patch=p) for f in frames[i : i + batch_size]])
        with torch.no_grad():
            g = extract(model, x, facet="token", layer=layer)
            if layer in (-1, len(model.blocks) - 1) and hasattr(model, "norm"):
                g = model.norm(g)
        out.append(g.cpu())
    return torch.cat(out)


def run_davis(
    model,
    dataset,
    videos: Sequence[str] | None = None,
    short: int = 480,
    multiple: int = 64,
    n_last: int = N_LAST_FRAMES,
    topk: int = TOPK,
    temperature: float = TEMPERATURE,
    neighbourhood: int = NEIGHBOURHOOD,
    bound_th: float = BOUND_TH,
    max_frames: int | None = None,
    device=None,
) -> dict:
    """Label propagation over a :class:`nbsupport.data.datasets.davis.Davis2017` split with a backbone:
    frames resized by :func:`davis_input_size`, first-frame ids downsampled to the patch grid (nearest,
    void as background), propagated by :func:`propagate_labels`, upsampled by :func:`labels_to_pixels`
    and scored by :func:`video_scores`; the propagation runs on ``device`` (default: the model's).
    Returns :func:`summarise`'s table plus ``per_video`` (scores) and ``predictions`` (video -> list of
    ``[H, W]`` id maps). DINO ViT-B/16 on DAVIS-2017 val: J&F 62.3,
    J 60.7, F 63.9 (MMC's table, in percent)."""
    from PIL import Image

    from nbsupport.models.features import patch_size

    p = patch_size(model)
    device = device if device is not None else next(model.parameters()).device
    names = list(videos) if videos is not None else list(dataset.videos)
    per_video, preds = {}, {}
    for name in names:
        video = dataset[name]
        n = len(video) if max_frames is None else min(len(video), max_frames)
        frames = [video.frame(i) for i in range(n)]
        gts = [video.annotation(i) for i in range(n)]
        oh, ow = gts[0].shape
        size = davis_input_size(oh, ow, short, multiple)
        feats = frame_features(model, frames, size).to(device)
        h, w = feats.shape[1:3]
        first = np.where(gts[0] == VOID, 0, gts[0]).astype(np.uint8)
        small = np.asarray(Image.fromarray(first).resize((w, h), Image.Resampling.NEAREST)).astype(np.int64)
        soft = propagate_labels(
            feats, torch.from_numpy(small), video.num_objects + 1, n_last, topk, temperature, neighbourhood
        )
        pred = [gts[0]] + [labels_to_pixels(soft[t].cpu(), p, (oh, ow)) for t in range(1, n)]
        per_video[name] = video_scores(pred, gts, video.num_objects, bound_th)
        preds[name] = pred
    out = summarise(per_video)
    out["per_video"], out["predictions"] = per_video, preds
    return out
