"""The MaskCut passes for a batch of images at once: graph, eigenvector, bipartition, rejection rules.

One engine serves the CPU (one image at a time, float64 Krylov) and the GPU (a batch of images per call,
float32 Krylov with a float64 polish, the graph built on the device), so both follow the reference steps
of :mod:`nbsupport.maskcut.cut` identically. The binarised graph ``B = cos > tau`` is built once per image
(fused with the cosines) and never rewritten: zeroing the features of the patches a pass took (the
reference's next-pass rule) makes their rows and columns ``0 > tau``, which the operator applies by
masking (:class:`~nbsupport.maskcut.krylov.NcutOperator`), and the degrees are updated exactly. Each pass warm-starts the eigen-solver from
the previous pass's Ritz block, and a pass whose graph did not change (after a rejection, the reference
solves the same graph again) reuses the previous eigenvector, which is what the deterministic dense
reference gives too.

Options beyond the reference, all off by default: an objectness score per mask (``1 - Ncut / 2`` of the
mask on the graph of the patches not yet taken), an adaptive number of masks (stop at the first pass whose
mask has Ncut above ``max_ncut``), and ``components="all"`` (every 4-connected component of the
foreground above ``min_area`` becomes a mask, not only the seed's).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from nbsupport.analysis.metrics import mask_iou
from nbsupport.maskcut import krylov
from nbsupport.maskcut.solver import SolverStats, dense_fiedler, second_eigenvector

SOLVERS = ("krylov", "lobpcg", "torch", "dense")
COMPONENTS = ("seed", "all")
SEED_RTOL = 1e-9  # entries this close to the maximum (relative) tie for the seed; the first one wins
DIRECT_BELOW = 48  # graphs with fewer nodes are solved densely (cheaper than iterating; counted as direct)


def _oriented(x: np.ndarray, grid: tuple[int, int]):
    """The reference's orientation of eigenvector ``x``: foreground ``v > mean(v)``, flipped when >= 3 of
    the 4 corners are foreground (this rule first) or the seed ``argmax |v|`` is background. Returns
    ``(v, fg, seed)`` with ``seed = argmax v`` of the oriented vector. Both argmaxes break ties (to
    :data:`SEED_RTOL`) by the first index, where the reference leaves them to rounding."""
    h, w = grid
    v = np.asarray(x, dtype=np.float64).reshape(h, w)
    fg = v > v.mean()
    seed = np.unravel_index(_first_max(np.abs(v)), v.shape)
    corners = int(fg[0, 0]) + int(fg[0, -1]) + int(fg[-1, 0]) + int(fg[-1, -1])
    if corners >= 3 or not fg[seed]:
        v, fg = -v, ~fg
    return v, fg, np.unravel_index(_first_max(v), v.shape)


def _first_max(a: np.ndarray, rtol: float = SEED_RTOL) -> int:
    """``argmax`` that breaks near-ties by the first index: patches with identical graph rows (e.g. all
    taken ones) have equal eigenvector entries in exact arithmetic, and which of them rounding makes the
    largest would otherwise decide the seed (and so the mask) arbitrarily, differently per solver."""
    flat = a.reshape(-1)
    top = flat.max()
    return int(np.flatnonzero(flat >= top - rtol * max(abs(top), np.abs(flat).max()))[0])


def bipartition(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """MaskCut's bipartition of eigenvector ``x`` on an ``(h, w)`` grid: mean threshold, corner rule then
    seed rule, and the seed's 4-connected component. Invariant to the sign of ``x``."""
    v, fg, seed = _oriented(x, grid)
    labels, _ = ndimage.label(fg)  # default structure: 4-connectivity
    if labels[seed] == 0:
        return np.zeros(v.shape, bool)
    return labels == labels[seed]


def foreground_components(x: np.ndarray, grid: tuple[int, int], min_patches: float = 0) -> list[np.ndarray]:
    """Every 4-connected component of the oriented foreground of ``x``: the seed's first (exactly
    :func:`bipartition`'s mask), then the others with more than ``min_patches`` patches, strongest peak
    of the oriented vector first."""
    v, fg, seed = _oriented(x, grid)
    labels, n = ndimage.label(fg)
    if n == 0 or labels[seed] == 0:
        return [np.zeros(v.shape, bool)]
    peaks = ndimage.maximum(v, labels, index=np.arange(1, n + 1))
    sizes = ndimage.sum_labels(np.ones_like(v), labels, index=np.arange(1, n + 1))
    first = int(labels[seed])
    rest = [k + 1 for k in np.argsort(-peaks, kind="stable") if k + 1 != first and sizes[k] > min_patches]
    return [labels == first] + [labels == k for k in rest]


def ncut_of(B: torch.Tensor, eps: float, masks: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Ncut value ``cut/vol(S) + cut/vol(rest)`` of each mask ``S`` (``masks [m, N]``) on the affinity
    ``(1 - eps) B + eps`` restricted to the ``free`` nodes (not taken by earlier passes): 0 for a part
    the graph barely touches, 2 at most. A mask with no free node, or all of them, gets 2 (no cut)."""
    S = torch.as_tensor(masks & free[None], dtype=B.dtype, device=B.device)
    u = torch.as_tensor(free, dtype=B.dtype, device=B.device)
    BS = torch.cat([u[:, None], S.T], 1)
    prod = (B @ BS).double()  # [N, 1 + m]: B 1_free, B 1_S
    nu = float(u.sum())
    ns = S.double().sum(1)
    vol_s = (1 - eps) * (S.double() * prod[:, :1].T).sum(1) + eps * ns * nu
    vol_all = (1 - eps) * float(u.double() @ prod[:, 0]) + eps * nu * nu
    assoc = (1 - eps) * (S.double() * prod[:, 1:].T).sum(1) + eps * ns * ns
    cut = vol_s - assoc
    vol_rest = vol_all - vol_s
    ok = (ns > 0) & (vol_rest > 0)
    out = torch.full_like(vol_s, 2.0)
    out[ok] = (cut[ok] / vol_s[ok] + cut[ok] / vol_rest[ok]).clamp(0, 2)
    return out.cpu().numpy()


def _dense_affinity(B: torch.Tensor, free: torch.Tensor, fill: float, eps: float) -> np.ndarray:
    """The reference's affinity of one pass as a float64 matrix: 1 where the (masked) graph has an edge,
    ``eps`` elsewhere; the rows and columns of taken nodes hold ``fill`` (``0 > tau``)."""
    Bm = B.to(torch.float64)
    if not bool(free.all()):
        ff = free[:, None] & free[None, :]
        Bm = torch.where(ff, Bm, torch.full((), fill, dtype=torch.float64, device=B.device))
    return torch.where(Bm > 0.5, 1.0, eps).to(torch.float64).cpu().numpy()


def _solve(B, counts, free, fills, eps, active, solver, start, iter_dtype, stats: SolverStats):
    """Eigenvectors ``x [len(active), N]`` (numpy) of the pass graphs of the images ``active`` (``B`` with
    the rows and columns outside ``free`` set to ``fills``) and their Ritz blocks (``None`` for the dense
    solvers)."""
    n = B.shape[-1]
    t0 = time.perf_counter()
    if solver != "krylov" or n < DIRECT_BELOW:
        xs = []
        for j in active:
            A = _dense_affinity(B[j], free[j], float(fills[j]), eps)
            if solver == "krylov":  # small graph: the direct solve is cheaper than iterating
                x, gap = dense_fiedler(A)
                stats.calls += 1
                stats.direct += 1
                stats.gaps.append(gap)
            else:
                x = second_eigenvector(A, solver, stats=stats)
            xs.append(np.asarray(x))
        if solver == "krylov":
            stats.seconds += time.perf_counter() - t0
        return np.stack(xs), None
    idx = torch.as_tensor(active, device=B.device)
    whole = len(active) == B.shape[0]
    pick = (lambda t: t) if whole else (lambda t: t.index_select(0, idx.to(t.device)))  # noqa: E731
    res = krylov.fiedler(
        pick(B), eps, start=start, iter_dtype=iter_dtype, counts=pick(counts), free=pick(free), fill=pick(fills)
    )
    x = res.x.cpu().numpy()
    conv = res.converged.cpu().numpy()
    for r, j in enumerate(active):
        if not conv[r]:  # the exact dense solve of this image, counted
            x[r], gap = dense_fiedler(_dense_affinity(B[j], free[j], float(fills[j]), eps))
            stats.fallbacks += 1
            stats.gaps.append(gap)
        else:
            stats.gaps.append(float(res.gap[r]))
            stats.residuals.append(float(res.residual[r]))
            stats.ties += bool(res.gap[r] <= krylov.TIE_GAP)
    stats.calls += len(active)
    stats.matmats += res.matmats * len(active)  # image-products: a batched product counts per image
    stats.restarts += res.restarts
    stats.shift_inverts += int(res.shift_inverted)
    stats.seconds += time.perf_counter() - t0
    return x, res.ritz


def build_graphs(feats: torch.Tensor, taus, dtype=torch.float64, out: torch.Tensor | None = None) -> torch.Tensor:
    """Binary graphs ``B [b, N, N]`` (``cos > tau`` per image, in ``dtype``, on the features' device) of
    features ``[b, N, D]``; the cosines are float32 as :func:`~nbsupport.maskcut.solver.cosine_matrix`.
    ``out``: a buffer of that shape to reuse (a fresh 100 MB one costs ~25 ms of page faults per image)."""
    b, n = feats.shape[:2]
    if out is not None and (out.shape != (b, n, n) or out.dtype != dtype or out.device != feats.device):
        out = None
    if feats.shape[0] == 1 or feats.device.type == "cpu":
        B = torch.empty((b, n, n), dtype=dtype, device=feats.device) if out is None else out
        for j in range(b):
            krylov.graph_from_features(feats[j], taus[j], dtype, out=B[j])
        return B
    fn = torch.nn.functional.normalize(feats.float(), dim=-1)
    t = torch.tensor(taus, dtype=torch.float32, device=feats.device)[:, None, None]
    cos = fn @ fn.mT
    return krylov.binary_graph(cos, t, dtype) if out is None else out.copy_(cos > t)


def run_passes(
    feats: torch.Tensor,
    taus,
    grid: tuple[int, int],
    n_masks: int = 3,
    eps: float = 1e-5,
    solver: str = "krylov",
    after_reject: str = "reference",
    min_area: float = 0.01,
    max_iou: float = 0.5,
    stats: SolverStats | None = None,
    max_ncut: float | None = None,
    components: str = "seed",
    scores: bool = False,
    iter_dtype=torch.float64,
    graph_buffer: torch.Tensor | None = None,
):
    """MaskCut's passes on patch features ``feats [b, N, D]`` (any device; the graph is built there) with
    thresholds ``taus`` (numbers, one per image). Returns ``(masks [b, n_out, h, w] bool, scores [b, n_out],
    graph)``: with the defaults ``n_out = n_masks``, mask ``k`` is pass ``k`` (empty where rejected) and
    every non-empty mask scores 1.0, as in the reference; ``graph`` is the graph tensor, whose memory can
    come back as ``graph_buffer`` for the next call (a fresh one costs page faults).

    ``scores=True``: ``1 - Ncut / 2`` per mask (0 for an empty one). ``max_ncut``: stop at the first pass
    whose mask has a larger Ncut (adaptive number of masks). ``components="all"``: the other foreground
    components of a pass (above ``min_area``) follow its seed mask."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use 'auto', {', '.join(map(repr, SOLVERS))}")
    if after_reject not in ("reference", "stop"):
        raise ValueError(f"after_reject must be 'reference' or 'stop', got {after_reject!r}")
    if components not in COMPONENTS:
        raise ValueError(f"components must be 'seed' (reference) or 'all', got {components!r}")
    if not 0 <= min_area <= 1:
        raise ValueError(f"min_area must be a fraction of the grid in [0, 1], got {min_area!r}")
    if max_ncut is not None and not 0 <= max_ncut <= 2:
        raise ValueError(f"max_ncut must be in [0, 2] (the range of an Ncut value), got {max_ncut!r}")
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    stats = SolverStats() if stats is None else stats
    b, n = feats.shape[0], feats.shape[1]
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} does not have the {n} nodes of the graph")
    taus = [float(t) for t in taus]
    dtype = iter_dtype if solver == "krylov" else torch.float64
    t0 = time.perf_counter()
    B = build_graphs(feats, taus, dtype, graph_buffer)
    counts = B.sum(-1, dtype=torch.float64)  # row sums of the pass graph, kept up to date as patches are taken
    free = torch.ones(b, n, dtype=torch.bool, device=B.device)  # B itself is never rewritten (NcutOperator)
    fills = torch.tensor([float(0.0 > t) for t in taus], dtype=torch.float64, device=B.device)
    stats.graph_seconds += time.perf_counter() - t0
    out = [[] for _ in range(b)]  # per image: (mask [h, w], score)
    taken = np.zeros((b, n), bool)
    changed = np.ones(b, bool)  # graph differs from the last solved one
    prev = [None] * b
    last_x = [None] * b
    last_gap = [float("nan")] * b
    ritz: list = [None] * b  # per image: the last Ritz block, the next pass's warm start
    active = list(range(b))
    want_score = scores or max_ncut is not None
    for i in range(n_masks):
        if not active:
            break
        solve = [j for j in active if changed[j] or last_x[j] is None]
        if solve:
            start = torch.stack([ritz[j] for j in solve]) if all(ritz[j] is not None for j in solve) else None
            n_gaps = len(stats.gaps)
            xs, new_ritz = _solve(B, counts, free, fills, eps, solve, solver, start, iter_dtype, stats)
            for r, j in enumerate(solve):
                last_x[j] = xs[r]
                last_gap[j] = stats.gaps[n_gaps + r] if len(stats.gaps) == n_gaps + len(solve) else float("nan")
                ritz[j] = None if new_ritz is None else new_ritz[r]
        for j in active:
            if j not in solve:  # same graph as the last pass: the same eigenvector, as the reference
                stats.calls += 1
                stats.cached += 1
                stats.gaps.append(last_gap[j])
        still = []
        for j in active:
            x = last_x[j]
            if components == "all":
                comps = foreground_components(x, grid, min_area * n)
            else:
                comps = [bipartition(x, grid)]
            m = comps[0]
            # an empty m is rejected by the area test anyway: what mask_iou gives two empty masks never decides
            rejected = i > 0 and (mask_iou(m, prev[j]) > max_iou or m.sum() <= min_area * n)
            stop = rejected and after_reject == "stop"
            kept = [] if rejected else comps
            s = ncut_of(B[j], eps, np.stack([c.reshape(-1) for c in kept]), ~taken[j]) if kept and want_score else None
            if s is not None and max_ncut is not None and s[0] > max_ncut:
                kept, stop = [], True  # not an object: adaptive N stops here
            if not kept:
                out[j].append((np.zeros((h, w), bool), 0.0))
                m = np.zeros((h, w), bool)
            for c, mask in enumerate(kept):
                out[j].append((mask, float(1 - s[c] / 2) if scores else 1.0))
            new = np.zeros(n, bool)
            for mask in kept:
                new |= mask.reshape(-1)
            new &= ~taken[j]
            changed[j] = bool(new.any())
            if changed[j]:
                t = torch.as_tensor(np.flatnonzero(new), device=B.device)
                z = float(fills[j])  # the cosine of a zeroed feature is 0: its entries are 0 > tau
                # row sums of the next graph: a free node loses its edges to t and gains z per node of t;
                # every taken node has z everywhere (integer counts: exact in float64)
                counts[j] += z * len(t) - B[j].index_select(0, t).sum(0, dtype=torch.float64)
                free[j, t] = False
                counts[j, ~free[j]] = z * n
                taken[j] |= new
            prev[j] = m
            if not stop:
                still.append(j)
        active = still
    n_out = max(n_masks, max(len(o) for o in out))
    masks = np.zeros((b, n_out, h, w), bool)
    sc = np.zeros((b, n_out))
    for j, o in enumerate(out):
        for k, (mask, s) in enumerate(o):
            masks[j, k] = mask
            sc[j, k] = s if mask.any() else 0.0
    if not scores:
        sc[masks.reshape(b, n_out, -1).any(-1)] = 1.0
    return masks, sc, B
