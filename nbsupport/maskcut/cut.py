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

Solver. The eigenvector is computed exactly, not approximated. ``solver="auto"`` (default) is
``krylov``: :func:`nbsupport.maskcut.krylov.fiedler`, block Krylov with Rayleigh-Ritz over a block that
holds the near-degenerate eigenvalues several objects create, warm-started from the previous pass,
residual-checked, shift-invert for crowded spectra and a counted dense fallback. On the CPU it runs one
image at a time in float64; on CUDA the images of a batch are solved together (float32 iterations, float64
polish, the graph built on the device). ``lobpcg`` (the former default), ``torch`` (``torch.linalg.eigh``
in float64) and ``dense`` (the reference ``scipy.linalg.eigh(D - A, D)``) remain for comparison. The
sign of an eigenvector is arbitrary and the corner/seed rules make the result sign-invariant; when
lambda2 and lambda3 coincide the eigenvector is not unique and exact solvers may legitimately return
different vectors (CutLER issue #71): tests compare solvers where the gap is clear and check the residual
where it is not.

Beyond the reference, off by default (see :func:`nbsupport.maskcut.engine.run_passes`): an objectness score
(``1 - Ncut / 2``), an adaptive number of masks (``max_ncut``) and ``components="all"``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.maskcut.engine import bipartition, foreground_components, run_passes
from nbsupport.maskcut.solver import SolverStats

__all__ = ["bipartition", "foreground_components", "maskcut", "maskcut_single", "auto_tau", "resolve_tau"]


def _resolve_tau(f: torch.Tensor, tau) -> float:
    """A number, or for ``"median"`` the median off-diagonal cosine of features ``f [N, D]`` (float64; the
    lower middle value, as ``torch.median``), found by selection rather than a sort."""
    if isinstance(tau, str):
        if tau != "median":
            raise ValueError(f"tau must be a number or 'median', got {tau!r}")
        if len(f) < 2:
            raise ValueError(f"tau='median' needs at least 2 patches, got {len(f)}")
        fn = F.normalize(f.double(), dim=1)
        s = (fn @ fn.T).cpu()
        n = len(s)
        s.fill_diagonal_(float("-inf"))  # the diagonal becomes the n smallest values
        k = n + (n * n - n - 1) // 2  # then the lower median of the n^2 - n off-diagonal ones
        return float(np.partition(s.numpy().reshape(-1), k)[k])
    return float(tau)


PRECISIONS = ("auto", "float64", "mixed")


def _solver_for(solver: str, device: torch.device, precision: str = "auto") -> tuple[str, torch.dtype]:
    """``auto`` -> the Krylov solver. ``precision``: ``mixed`` iterates in float32 and polishes in float64
    (the default on CUDA, where float32 products are much faster), ``float64`` iterates in float64 (the
    default on the CPU, where a float64 product costs only ~1.5x a float32 one and needs no second graph)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if solver == "auto":
        solver = "krylov"
    mixed = precision == "mixed" or (precision == "auto" and device.type == "cuda")
    return solver, (torch.float32 if mixed and solver == "krylov" else torch.float64)


def maskcut_single(
    feats: torch.Tensor,
    n_masks: int = 3,
    tau=0.15,
    eps: float = 1e-5,
    solver: str = "auto",
    after_reject: str = "reference",
    min_area: float = 0.01,
    max_iou: float = 0.5,
    stats: SolverStats | None = None,
    *,
    scores: bool = False,
    max_ncut: float | None = None,
    components: str = "seed",
):
    """MaskCut on one grid ``[h, w, D]`` -> bool patch masks ``[n_masks, h, w]`` (empty where rejected).

    A pass after the first is rejected when its mask has IoU > ``max_iou`` with the previous pass's mask
    or covers <= ``min_area`` of the grid. ``stats``: a :class:`SolverStats` recording every eigen-solve.
    ``scores=True`` returns ``(masks, scores [n])`` with ``1 - Ncut / 2`` per mask; ``max_ncut`` and
    ``components`` as in :func:`maskcut`."""
    if feats.dim() != 3:
        raise ValueError(f"features must be [h, w, D], got {tuple(feats.shape)}")
    masks, sc = maskcut(
        feats[None],
        n_masks,
        tau,
        eps,
        solver,
        after_reject,
        stats=stats,
        min_area=min_area,
        max_iou=max_iou,
        scores=True,
        max_ncut=max_ncut,
        components=components,
    )
    masks = masks[0].numpy()
    return (masks, sc[0].numpy()) if scores else masks


def maskcut(
    features: torch.Tensor,
    n_masks: int = 3,
    tau=0.15,
    eps: float = 1e-5,
    solver: str = "auto",
    after_reject: str = "reference",
    progress: bool = False,
    stats: SolverStats | None = None,
    *,
    min_area: float = 0.01,
    max_iou: float = 0.5,
    scores: bool = False,
    max_ncut: float | None = None,
    components: str = "seed",
    batch_size: int | None = None,
    precision: str = "auto",
):
    """MaskCut pseudo-masks on the patch grid.

    ``features``: ``[h, w, D]`` or ``[B, h, w, D]`` (DINO last-block keys in the reference). ``tau``: the
    affinity threshold (0.15 made the released pseudo-masks) or ``"median"`` (the median pairwise cosine
    of the image: for models whose similarities are all near 1, e.g. random init). ``solver``: ``auto`` =
    ``krylov`` (see the module docstring), or ``lobpcg``, ``torch``, ``dense``. ``stats``: a
    :class:`SolverStats` that records every eigen-solve of the call (calls, dense fallbacks, time, spectral
    gaps). Returns bool ``[(B,) n_masks, h, w]``, identical to the reference protocol with the defaults.

    Options beyond the reference (off by default): ``scores=True`` also returns the objectness scores
    ``[(B,) n]`` (``1 - Ncut / 2`` of each mask on the graph of the patches not yet taken; 0 for empty
    masks; without it every mask counts as score 1, as MaskCut gives none); ``max_ncut``: stop at the first
    pass whose mask has a larger Ncut (an adaptive number of masks, at most ``n_masks`` passes);
    ``components="all"``: every 4-connected foreground component above ``min_area`` becomes a mask, not
    only the seed's (more than ``n_masks`` masks then; the array is padded with empty ones).
    ``batch_size``: images solved together (default: all of ``features`` on CUDA, one at a time on the
    CPU); ``precision``: ``auto``, ``float64`` or ``mixed`` (float32 iterations, float64 polish; the
    default on CUDA). Every choice returns float64-exact eigenvectors.
    """
    single = features.dim() == 3
    feats = features[None] if single else features
    if feats.dim() != 4:
        raise ValueError(f"features must be [h, w, D] or [B, h, w, D], got {tuple(features.shape)}")
    solver, iter_dtype = _solver_for(solver, feats.device, precision)
    nb, h, w, d = feats.shape
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk = batch_size or (nb if feats.device.type == "cuda" else 1)
    starts = range(0, nb, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="maskcut", unit="batch" if chunk > 1 else "img")
    stats = SolverStats() if stats is None else stats
    all_masks, all_scores = [], []
    buffer = None  # the graph's memory, reused image after image
    for s in starts:
        f = feats[s : s + chunk].reshape(-1, h * w, d).detach()
        taus = [_resolve_tau(f[j], tau) for j in range(len(f))]
        m, sc, buffer = run_passes(
            f,
            taus,
            (h, w),
            n_masks,
            eps,
            solver,
            after_reject,
            min_area,
            max_iou,
            stats,
            max_ncut=max_ncut,
            components=components,
            scores=scores,
            iter_dtype=iter_dtype,
            graph_buffer=buffer,
        )
        all_masks.append(m)
        all_scores.append(sc)
    n_out = max(m.shape[1] for m in all_masks)
    pad = lambda a, fill: np.concatenate([a, np.full((a.shape[0], n_out - a.shape[1], *a.shape[2:]), fill)], 1)  # noqa: E731
    masks = torch.from_numpy(np.concatenate([pad(m, False) for m in all_masks]))
    sc = torch.from_numpy(np.concatenate([pad(x, 0.0) for x in all_scores]))
    if single:
        masks, sc = masks[0], sc[0]
    return (masks, sc) if scores else masks


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
