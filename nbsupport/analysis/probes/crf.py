"""Optional multi-class dense CRF on probe outputs with STEGO's parameters (its ``crf.py``: 10 mean-field
iterations, Gaussian kernel sxy 1 weight 3, bilateral kernel sxy 67 srgb 3 weight 4), as STEGO's and HP's
reported rows use it. Needs the optional ``pydensecrf`` package (``pydensecrf2``); without it
:func:`crf_available` is False and callers skip the CRF and say so."""

from __future__ import annotations

import numpy as np

#: STEGO's CRF parameters.
STEGO_CRF = {"iterations": 10, "pos_xy_std": 1, "pos_w": 3, "bi_xy_std": 67, "bi_rgb_std": 3, "bi_w": 4}


def crf_available() -> bool:
    """Whether ``pydensecrf`` can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Refined class probabilities ``[C, H, W]`` from ``probs [C, H, W]`` (softmax output at the image's
    resolution) and ``image [H, W, 3]`` uint8: unary ``-log p``, STEGO's pairwise kernels (:data:`STEGO_CRF`
    unless ``params``), mean-field inference."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    p = {**STEGO_CRF, **(params or {})}
    image = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    probs = np.asarray(probs, dtype=np.float32)
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape} (need [H, W, 3])")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-8, 1.0))))
    d.addPairwiseGaussian(sxy=p["pos_xy_std"], compat=p["pos_w"])
    d.addPairwiseBilateral(sxy=p["bi_xy_std"], srgb=p["bi_rgb_std"], rgbim=image, compat=p["bi_w"])
    q = d.inference(p["iterations"])
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _one(args) -> np.ndarray:
    image, probs, params = args
    return dense_crf(image, probs, params)


def dense_crf_many(images: np.ndarray, probs: np.ndarray, params: dict | None = None, workers: int = 0) -> np.ndarray:
    """:func:`dense_crf` of every image of a batch (``images [B, H, W, 3]`` uint8, ``probs [B, C, H, W]``),
    in ``workers`` processes when > 1 (the CRF runs on the CPU: a dataset of 2,175 images at 320 px takes
    minutes per probe run on one core)."""
    jobs = [(im, p, params) for im, p in zip(images, probs)]
    if workers <= 1 or len(jobs) < 2:
        return np.stack([_one(j) for j in jobs])
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return np.stack(list(pool.map(_one, jobs)))
