"""CutLER's training augmentations on the training device: horizontal flip and copy-paste of pseudo-mask
instances between the images of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nbsupport.training.cutler.model import masks_to_boxes

# --------------------------------------------------------------------------------------------------
# Augmentations (on the batch's device)


def _rand(gen, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Horizontal flip of an image ``[3, H, W]`` and its masks; boxes recomputed from the masks."""
    t = dict(target)
    t["masks"] = target["masks"].flip(-1)
    t["boxes"] = masks_to_boxes(t["masks"])
    return image.flip(-1), t


def copy_paste(
    images: list,
    targets: list,
    scale=(0.3, 1.0),
    generator: torch.Generator | None = None,
    min_area: int = 1,
    max_cover: float | None = 0.5,
) -> tuple[list, list]:
    """Copy-paste augmentation as CutLER does it (thesis 3.3).

    Image ``i`` receives instances of donor ``B-1-i`` (the reversed batch; an odd batch's middle image is
    its own donor): ``k ~ U{1..max(1, n-1)}`` of the donor's ``n`` instances, chosen at random; the whole
    donor image and masks are rescaled by ``s ~ U(scale)`` and placed at a random offset (cropped at the
    border). Pasted pixels replace the target's pixels; existing masks lose them and instances left with
    fewer than ``min_area`` pixels are dropped; pasted instances empty after cropping are dropped; all
    boxes are recomputed from the masks. As in the reference, a pasted instance that would hide at least
    ``max_cover`` of an existing instance's pixels (intersection over the existing mask's area) is not
    pasted, and when none is left the image is returned unchanged (``max_cover=None``: paste them all).
    Works on the tensors' device; randomness from ``generator`` (a CPU ``torch.Generator``). Returns new
    lists (inputs are not modified).
    """
    gen = generator if generator is not None else torch.default_generator
    B = len(images)
    out_imgs, out_tgts = [], []
    for i in range(B):
        img, tgt = images[i], targets[i]
        j = B - 1 - i
        dimg, dm = images[j], targets[j]["masks"]
        n = dm.shape[0]
        if n == 0:
            out_imgs.append(img)
            out_tgts.append(dict(tgt))
            continue
        k = _randint(gen, 1, max(1, n - 1))
        pick = torch.randperm(n, generator=gen)[:k].to(dm.device)
        s = _rand(gen, *scale)
        Hd, Wd = dimg.shape[-2:]
        H, W = img.shape[-2:]
        h, w = max(1, round(Hd * s)), max(1, round(Wd * s))
        y0 = _randint(gen, 0, max(0, H - h))
        x0 = _randint(gen, 0, max(0, W - w))
        ph, pw = min(h, H - y0), min(w, W - x0)
        simg = F.interpolate(dimg[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        smask = F.interpolate(dm[pick][None].float(), size=(h, w), mode="nearest")[0] > 0.5
        pasted = torch.zeros((k, H, W), dtype=torch.bool, device=img.device)
        pasted[:, y0 : y0 + ph, x0 : x0 + pw] = smask[:, :ph, :pw]
        pasted = pasted[pasted.flatten(1).sum(1) >= min_area]
        if max_cover is not None and len(tgt["masks"]) and len(pasted):
            old_f = tgt["masks"].bool().flatten(1).float()
            cover = (pasted.flatten(1).float() @ old_f.T) / old_f.sum(1).clamp(min=1)[None]
            pasted = pasted[cover.max(1).values < max_cover]
        if len(pasted) == 0:
            out_imgs.append(img)
            out_tgts.append(dict(tgt))
            continue
        union = pasted.any(0)
        new_img = img.clone()
        canvas = torch.zeros_like(img)
        canvas[:, y0 : y0 + ph, x0 : x0 + pw] = simg[:, :ph, :pw].to(img.dtype)
        new_img = torch.where(union[None], canvas, new_img)
        old = tgt["masks"].bool() & ~union[None]
        old_keep = old.flatten(1).sum(1) >= min_area
        masks = torch.cat([old[old_keep], pasted]).to(torch.uint8)
        labels = torch.cat(
            [tgt["labels"][old_keep], torch.ones(len(pasted), dtype=tgt["labels"].dtype, device=tgt["labels"].device)]
        )
        t = {k2: v for k2, v in tgt.items() if k2 not in ("masks", "boxes", "labels")}
        t.update(masks=masks, labels=labels, boxes=masks_to_boxes(masks))
        out_imgs.append(new_img)
        out_tgts.append(t)
    return out_imgs, out_tgts


def augment_batch(
    images,
    targets,
    generator,
    flip: bool = True,
    do_copy_paste: bool = True,
    scale=(0.3, 1.0),
    max_cover: float | None = 0.5,
):
    """Training augmentations on the device: random horizontal flip (p = 0.5) then copy-paste."""
    if flip:
        pairs = [hflip(im, t) if _rand(generator) < 0.5 else (im, t) for im, t in zip(images, targets)]
        images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    if do_copy_paste:
        images, targets = copy_paste(images, targets, scale, generator, max_cover=max_cover)
    return list(images), list(targets)
