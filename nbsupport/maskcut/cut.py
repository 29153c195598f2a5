"""MaskCut: several object masks per image from normalised cuts on a ViT patch graph (thesis 1.2, 3.3).

The reference (CutLER's ``maskcut.py``) is followed step by step:

1. patch features (DINO last-block keys) are L2-normalised; ``A = cos > tau`` binarised, zeros replaced
   by ``eps`` so the graph stays connected, diagonal kept; ``D = diag(row sums)``;
2. the second-smallest generalised eigenvector ``x`` of ``(D - A) x = lambda D x`` (the Ncut relaxation);
3. bipartition ``x > mean(x)``; if >= 3 of the 4 corner patches are foreground, flip (this rule first);
   otherwise flip when the seed ``argmax |x|`` is background; the seed is then ``argmax`` of the
   (possibly flipped) vector; keep the seed's 4-connected component;
4. next pass: zero the *features* of every patch already taken and rebuild the graph (taken nodes stay,
   nearly disconnected); a pass whose mask has IoU > 0.5 with the previous pass's mask or covers <= 1% of
   the patches is rejected (an empty mask).

Rejection quirk, kept on purpose: a rejected pass adds nothing to the taken set, so the next pass solves
the same graph again and is compared with the *empty* previous mask; the reference behaves this way and
we match it (``after_reject="reference"``). ``after_reject="stop"`` leaves every later pass empty instead.

Solver. The eigenvector is computed exactly, not approximated: with ``M = D^-1/2 A D^-1/2`` the wanted
vector is ``x = D^-1/2 y`` where ``y`` is the top eigenvector of ``M`` orthogonal to the known top one
``D^1/2 1``. ``solver="lobpcg"`` (default, CPU) runs scipy's LOBPCG with that constraint and a block of
``BLOCK = 2`` vectors, and checks the residual; when it does not converge to 1e-6 the dense solve is
used (counted in the :class:`~nbsupport.maskcut.solver.SolverStats` passed as ``stats``, if any).
``solver="torch"`` uses a batched ``torch.linalg.eigh`` of ``M`` in float64 on the features' device
(GPU). ``solver="dense"`` is the reference ``scipy.linalg.eigh(D - A, D)``. The sign of
an eigenvector is arbitrary and the corner/seed rules make the result sign-invariant; when lambda2 and
lambda3 nearly coincide different exact solvers may legitimately return different vectors (CutLER
issue #71): tests compare solvers where the spectral gap is clear.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nbsupport.analysis.metrics import mask_iou
from nbsupport.maskcut.solver import SolverStats, affinity, cosine_matrix, second_eigenvector


def bipartition(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """MaskCut's bipartition of eigenvector ``x`` on an ``(h, w)`` grid: mean threshold, corner rule then
    seed rule, and the seed's 4-connected component. Invariant to the sign of ``x``."""
    h, w = grid
    v = np.asarray(x, dtype=np.float64).reshape(h, w)
    fg = v > v.mean()
    seed = np.unravel_index(int(np.argmax(np.abs(v))), v.shape)
    corners = int(fg[0, 0]) + int(fg[0, -1]) + int(fg[-1, 0]) + int(fg[-1, -1])
    flip = corners >= 3 or not fg[seed]
    if flip:
        v, fg = -v, ~fg
    seed = np.unravel_index(int(np.argmax(v)), v.shape)
    labels, _ = ndimage.label(fg)  # default structure: 4-connectivity
    if labels[seed] == 0:
        return np.zeros((h, w), bool)
    return labels == labels[seed]


def _resolve_tau(f: torch.Tensor, tau) -> float:
    if isinstance(tau, str):
        if tau != "median":
            raise ValueError(f"tau must be a number or 'median', got {tau!r}")
        fn = F.normalize(f.double(), dim=1)
        s = fn @ fn.T
        off = s[~torch.eye(len(s), dtype=torch.bool, device=s.device)]
        return float(off.median())
    return float(tau)


def maskcut_single(
    feats: torch.Tensor,
    n_masks: int = 3,
    tau=0.15,
    eps: float = 1e-5,
    solver: str = "lobpcg",
    after_reject: str = "reference",
    min_area: float = 0.01,
    max_iou: float = 0.5,
    stats: SolverStats | None = None,
) -> np.ndarray:
    """MaskCut on one grid ``[h, w, D]`` -> bool patch masks ``[n_masks, h, w]`` (empty where rejected).

    A pass after the first is rejected when its mask has IoU > ``max_iou`` with the previous pass's mask
    or covers <= ``min_area`` of the grid. ``stats``: a :class:`SolverStats` recording every eigen-solve."""
    if feats.dim() != 3:
        raise ValueError(f"features must be [h, w, D], got {tuple(feats.shape)}")
    if after_reject not in ("reference", "stop"):
        raise ValueError(f"after_reject must be 'reference' or 'stop', got {after_reject!r}")
    if not 0 <= min_area <= 1:
        raise ValueError(f"min_area must be a fraction of the grid in [0, 1], got {min_area!r}")
    h, w, d = feats.shape
    f = feats.reshape(h * w, d).detach()
    tau_v = _resolve_tau(f, tau)
    cos = cosine_matrix(f)  # zeroing a patch's features later == zeroing its row and column here
    masks = np.zeros((n_masks, h, w), bool)
    taken = np.zeros(h * w, bool)
    prev = None
    stopped = False
    for i in range(n_masks):
        if stopped:
            break
        if taken.any():
            t = torch.from_numpy(taken).to(cos.device)
            cos[t] = 0
            cos[:, t] = 0
        A = affinity(cos, tau_v, eps, is_cos=True)
        x = second_eigenvector(A, solver, stats=stats)
        m = bipartition(x, (h, w))
        # an empty m is rejected by the area test anyway: what mask_iou gives two empty masks never decides
        if i > 0 and (mask_iou(m, prev) > max_iou or m.sum() <= min_area * h * w):
            m = np.zeros_like(m)
            stopped = after_reject == "stop"
        masks[i] = m
        taken |= m.reshape(-1)
        prev = m
    return masks


def maskcut(
    features: torch.Tensor,
    n_masks: int = 3,
    tau=0.15,
    eps: float = 1e-5,
    solver: str = "auto",
    after_reject: str = "reference",
    progress: bool = False,
    stats: SolverStats | None = None,
) -> torch.Tensor:
    """MaskCut pseudo-masks on the patch grid.

    ``features``: ``[h, w, D]`` or ``[B, h, w, D]`` (DINO last-block keys in the reference). ``tau``: the
    affinity threshold (0.15 made the released pseudo-masks) or ``"median"`` (the median pairwise cosine
    of the image: for models whose similarities are all near 1, e.g. random init). ``solver``: ``auto`` =
    ``torch`` on CUDA, ``lobpcg`` on CPU. ``stats``: a :class:`SolverStats` that records every eigen-solve
    of the call (calls, dense fallbacks, time, spectral gaps). Returns bool ``[(B,) n_masks, h, w]``.
    """
    single = features.dim() == 3
    feats = features[None] if single else features
    if feats.dim() != 4:
        raise ValueError(f"features must be [h, w, D] or [B, h, w, D], got {tuple(features.shape)}")
    if solver == "auto":
        solver = "torch" if feats.is_cuda else "lobpcg"
    it = range(feats.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="maskcut", unit="img")
    out = torch.from_numpy(
        np.stack([maskcut_single(feats[b], n_masks, tau, eps, solver, after_reject, stats=stats) for b in it])
    )
    return out[0] if single else out


def auto_tau(model):
    """The threshold ``tau="auto"`` means for ``model`` (a :func:`nbsupport.models.backbones.load` result): the
    reference 0.15 for official DINO weights (a registered official name or an official ``.pth``), for which
    it was tuned; ``"median"`` for everything else. Random-init keys are often nearly parallel, and those of
    the tiny DINO trained here share a large common component (every pairwise cosine above 0.3, median
    0.999): with a fixed threshold their graph is complete and the cut follows position, not objects."""
    from nbsupport.models import backbones

    info = getattr(model, "nbs_info", {})
    name = str(info.get("name", ""))
    official = name in backbones.OFFICIAL or (info.get("pretrained") and name.endswith((".pth", ".pt")))
    return 0.15 if official else "median"


def resolve_tau(tau, model):
    """The threshold a ``tau`` parameter (CLI string or notebook value) means for ``model``: ``"auto"`` ->
    :func:`auto_tau`, ``"median"`` stays, anything else is a number (``float(tau)``)."""
    if tau == "auto":
        return auto_tau(model)
    return tau if tau == "median" else float(tau)
