"""Patch masks -> pixel masks of the original image, with the reference's optional dense-CRF refinement."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nbsupport.analysis.metrics import mask_iou

# --------------------------------------------------------------------------------------------------
# Pixel masks and COCO export


def crf_available() -> bool:
    """Whether the optional dense-CRF package (``pydensecrf2``, imported as ``pydensecrf``) can be used."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def crf_refine(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dense-CRF refinement with the reference parameters (Gaussian sxy 3 compat 7; bilateral sxy 50,
    srgb 5, compat 10; 10 iterations) then hole filling. Needs the optional ``pydensecrf2`` package."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError(
            "the CRF step needs the optional package pydensecrf2: "
            "`pip install pydensecrf2` (or `pip install -e .[crf]`)"
        ) from e
    h, w = mask.shape
    m = torch.from_numpy(mask.astype(np.float32))
    prob = torch.stack([1 - m, m])  # [2, H, W] logits as the reference builds them
    prob = torch.softmax(prob, dim=0).numpy()
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    crf.addPairwiseGaussian(sxy=3, compat=7)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image.astype(np.uint8)), compat=10)
    q = np.array(crf.inference(10)).reshape(2, h, w)
    return ndimage.binary_fill_holes(q.argmax(0) == 1)


def pixel_masks(
    patch_masks,
    image_hw: tuple[int, int],
    input_hw: tuple[int, int] | None = None,
    image=None,
    crf: bool = False,
    crf_min_iou: float = 0.5,
) -> np.ndarray:
    """Patch masks ``[n, h, w]`` -> pixel masks ``[n, H, W]`` of the original image.

    Upsampled (nearest) to the model input ``input_hw`` (the reference's 480 x 480), optionally refined
    with a CRF on the resized ``image`` (dropped when IoU(coarse, CRF) < ``crf_min_iou``), resized to
    ``image_hw`` (threshold at half the maximum), and each mask loses the pixels of earlier masks.
    """
    pm = torch.as_tensor(np.asarray(patch_masks), dtype=torch.float32)
    if pm.dim() != 3:
        raise ValueError(f"patch masks must be [n, h, w], got {tuple(pm.shape)}")
    input_hw = input_hw or image_hw
    up = F.interpolate(pm[None], size=input_hw, mode="nearest")[0].numpy() > 0.5
    if crf:
        if image is None:
            raise ValueError("crf=True needs the image resized to input_hw")
        img = np.asarray(image)
        for k in range(len(up)):
            if up[k].any():
                refined = crf_refine(img, up[k])
                up[k] = refined if mask_iou(refined, up[k]) >= crf_min_iou else np.zeros_like(up[k])
    out = F.interpolate(
        torch.from_numpy(up.astype(np.float32))[None], size=image_hw, mode="bilinear", align_corners=False
    )[0].numpy()
    masks = np.zeros(out.shape, bool)
    for k in range(len(out)):
        mx = out[k].max()
        masks[k] = out[k] >= mx / 2 if mx > 0 else False
    taken = np.zeros(image_hw, bool)
    for k in range(len(masks)):
        masks[k] &= ~taken
        taken |= masks[k]
    return masks
