"""CrOC's online clustering (CVPR'23, section 3.3 "join-locate-split") on frozen tokens, and a count of the
objects it finds per image next to MaskCut's fixed N.

1. **Join**: the tokens of two views of one image are concatenated; their patch positions are expressed in
   the original image frame (:func:`view_positions`).
2. **Locate**: ``k_start`` centroids are sampled from the token marginal ``r`` (the CLS attention, [code]
   ``softmax(<k_n, k_cls> / 2)``, :func:`token_marginal`); the cost of sending token ``n`` to centroid
   ``k`` is ``M = -cos(x_n, c_k) + lambda_pos * ||p_n - p_k|| / max`` (Eq. 9 and the positional cost of
   section 3.3.2), min-max normalised as CrOC's code does; entropic optimal transport (:func:`sinkhorn`,
   Sinkhorn-Knopp, ``eps = 0.05`` i.e. the code's ``exp(-20 M)``, 5 iterations) gives the assignment
   ``P``, and its transport cost ``<P, M>`` measures how well the centroids represent the tokens. The
   centroids (features and positions) are then updated as the ``P``-weighted means of their tokens, the two
   most similar ones are merged, and the loop repeats down to 2 centroids (:func:`croc_cluster`).
3. **Select / split**: the number of centroids of an image is the ``k`` in ``2 .. k_max`` with the lowest
   transport cost ([code] ``n_centroids_max``, default 4: the cost tends to fall with ``k``). Hard
   assignments are split by view and clusters empty in either view are dropped (:func:`split_views`).

The centroid marginal (CrOC's Eq. 10) is lost from the paper text; here it is the token mass ``r`` each
centroid holds under the hard assignment of the previous step (at the start: of the nearest sampled
centroid), floored at ``1e-3 / k`` so that no centroid is empty [inf].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

EPS = 0.05
N_ITER = 5
K_START = 12
K_MAX = 4
LAMBDA_POS = 4.0
MARGINAL_TEMPERATURE = 2.0


def sinkhorn(
    cost: torch.Tensor,
    r: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    eps: float = EPS,
    n_iter: int = N_ITER,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic optimal transport ``P = argmin <P, M> - eps H(P)`` s.t. ``P 1 = r``, ``P^T 1 = c``
    (Cuturi 2013), by Sinkhorn-Knopp scaling in the log domain. ``cost [N, K]``, marginals default to
    uniform and are renormalised to sum 1. Runs ``n_iter`` row/column scalings, or until the row marginal
    is within ``tol`` (max abs) when ``tol`` is given (``n_iter`` then caps the iterations). Each iteration
    ends with the column scaling, so the column marginal is exact. Returns ``(P, <P, M>)``."""
    cost = cost.double() if cost.dtype == torch.float64 else cost.float()
    n, k = cost.shape
    r = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device) if r is None else r.to(cost)
    c = torch.full((k,), 1.0 / k, dtype=cost.dtype, device=cost.device) if c is None else c.to(cost)
    if (r < 0).any() or (c < 0).any():
        raise ValueError("marginals must be non-negative")
    r, c = r / r.sum(), c / c.sum()
    log_k = -cost / eps
    log_r, log_c = torch.log(r.clamp_min(1e-300)), torch.log(c.clamp_min(1e-300))
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(k, dtype=cost.dtype, device=cost.device)
    for _ in range(max(1, n_iter)):
        f = log_r - torch.logsumexp(log_k + g[None], dim=1)
        g = log_c - torch.logsumexp(log_k + f[:, None], dim=0)
        if tol is not None:
            p = torch.exp(f[:, None] + log_k + g[None])
            if (p.sum(1) - r).abs().max() <= tol:
                break
    p = torch.exp(f[:, None] + log_k + g[None])
    return p, (p * cost).sum()


def positional_cost(pos_tokens: torch.Tensor, pos_centroids: torch.Tensor) -> torch.Tensor:
    """``||p_n - p_k|| / max`` ``[N, K]``: Euclidean distance of token and centroid positions divided by its
    largest entry, so that it lies in [0, 1] (CrOC section 3.3.2)."""
    d = torch.cdist(pos_tokens.float(), pos_centroids.float())
    return d / d.max().clamp_min(1e-12)


def transport_cost_matrix(
    x: torch.Tensor,
    centroids: torch.Tensor,
    pos: torch.Tensor | None = None,
    pos_centroids: torch.Tensor | None = None,
    lambda_pos: float = LAMBDA_POS,
    normalise: bool = True,
) -> torch.Tensor:
    """CrOC's cost ``M = -cos(x, c) + lambda_pos * positional_cost`` ``[N, K]``, min-max normalised to [0, 1]
    when ``normalise`` ([code]); the positional term only when positions are given and ``lambda_pos > 0``."""
    m = -(F.normalize(x.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T)
    if pos is not None and pos_centroids is not None and lambda_pos:
        m = m + lambda_pos * positional_cost(pos, pos_centroids)
    if normalise:
        lo, hi = m.min(), m.max()
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
    return m


def token_marginal(keys: torch.Tensor, cls_key: torch.Tensor, temperature: float = MARGINAL_TEMPERATURE):
    """CrOC's token distribution ``r = softmax(<k_n, k_cls> / temperature)`` ``[N]`` from patch keys ``[N, D]``
    and the CLS key ``[D]`` ([code], temperature 2)."""
    return torch.softmax(keys.float() @ cls_key.float() / temperature, dim=0)


def _hard_mass(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    k = p.shape[1]
    mass = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, p.argmax(1), r)
    mass = mass.clamp_min(1e-3 / k)
    return mass / mass.sum()


def croc_cluster(
    tokens: torch.Tensor,
    r: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    k_start: int = K_START,
    k_max: int = K_MAX,
    lambda_pos: float = LAMBDA_POS,
    eps: float = EPS,
    n_iter: int = N_ITER,
    tie_tol: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict:
    """CrOC's merge loop on joint tokens ``[N, D]`` (one image, both views), with token marginal ``r [N]``
    (uniform when None) and positions ``pos [N, 2]`` in the original image frame (no positional cost when
    None). ``k_start`` centroids are sampled from ``r`` without replacement; for ``k = k_start .. 2``:
    cost (:func:`transport_cost_matrix`), :func:`sinkhorn`, centroid update, merge of the most similar pair.

    The chosen ``k`` minimises the transport cost over ``2 .. k_max``; ``tie_tol > 0`` (not in CrOC)
    takes the smallest ``k`` whose cost is at most ``(1 + tie_tol)`` times the minimum, which breaks the
    near-ties of over-split clusters (splitting a clean cluster barely changes the cost) towards fewer
    clusters. Returns ``k``, ``costs`` ({k: cost}),
    ``assignments`` ({k: P [N, k]}), ``labels`` (hard argmax ``[N]`` at the chosen ``k``), ``centroids``
    ({k: [k, D]}) and ``merges`` (the pair of centroid indices merged after each ``k``)."""
    x = F.normalize(tokens.float(), dim=-1)
    n = x.shape[0]
    k_start = min(int(k_start), n)
    if k_start < 2:
        raise ValueError(f"need at least 2 tokens and k_start >= 2, got {n} tokens, k_start={k_start}")
    r = torch.full((n,), 1.0 / n) if r is None else r.float() / r.float().sum()
    idx = torch.multinomial(r.clamp_min(1e-12), k_start, replacement=False, generator=generator)
    cent = x[idx].clone()
    pc = pos[idx].float().clone() if pos is not None else None
    m = transport_cost_matrix(x, cent, pos, pc, lambda_pos)
    c = _hard_mass(-m, r)
    costs, assignments, centroids, merges = {}, {}, {}, []
    for k in range(k_start, 1, -1):
        m = transport_cost_matrix(x, cent, pos, pc, lambda_pos)
        p, cost = sinkhorn(m, r, c, eps, n_iter)
        costs[k], assignments[k] = float(cost), p
        w = p / p.sum(0, keepdim=True).clamp_min(1e-12)
        cent = F.normalize(w.T @ x, dim=-1)
        if pc is not None:
            pc = w.T @ pos.float()
        centroids[k] = cent.clone()
        c = _hard_mass(p, r)
        if k == 2:
            break
        sim = cent @ cent.T
        sim.fill_diagonal_(-float("inf"))
        a, b = divmod(int(sim.argmax()), k)
        a, b = min(a, b), max(a, b)
        merges.append((a, b))
        keep = [i for i in range(k) if i != b]
        merged = F.normalize(cent[a] + cent[b], dim=-1)
        cent = cent.clone()
        cent[a] = merged
        cent = cent[keep]
        if pc is not None:
            pc = pc.clone()
            pc[a] = (pc[a] + pc[b]) / 2
            pc = pc[keep]
        c = c.clone()
        c[a] = c[a] + c[b]
        c = c[keep]
    choice = select_k(costs, k_max, tie_tol)
    return {
        "k": choice,
        "costs": costs,
        "assignments": assignments,
        "labels": assignments[choice].argmax(1),
        "centroids": centroids,
        "merges": merges,
    }


def croc_cluster_heads(tokens: torch.Tensor, n_heads: int, r: torch.Tensor | None = None, pos=None, **kwargs) -> dict:
    """CrOC's per-head clustering (section 3.4): the head-major tokens ``[N, heads * d]`` split into
    ``n_heads`` blocks, each clustered by :func:`croc_cluster` (same ``r``, ``pos`` and options), and the
    hard assignments concatenated along the centroid axis. Returns ``heads`` (each head's result), ``k``
    (per head) and ``assignment`` (one-hot ``[N, sum k]``)."""
    n, d = tokens.shape
    if d % n_heads:
        raise ValueError(f"token dimension {d} is not divisible by {n_heads} heads")
    res = [croc_cluster(part, r, pos, **kwargs) for part in tokens.reshape(n, n_heads, d // n_heads).unbind(1)]
    one_hot = torch.cat([F.one_hot(h["labels"], h["k"]).float() for h in res], dim=1)
    return {"heads": res, "k": [h["k"] for h in res], "assignment": one_hot}


def select_k(costs: dict, k_max: int = K_MAX, tie_tol: float = 0.0) -> int:
    """The ``k`` in ``2 .. k_max`` with the lowest cost (``tie_tol > 0``: the smallest ``k`` whose cost is
    at most ``(1 + tie_tol)`` times the minimum)."""
    ks = sorted(k for k in costs if 2 <= k <= k_max)
    if not ks:
        raise ValueError(f"no cost for any k in 2..{k_max} (have {sorted(costs)})")
    vals = np.array([costs[k] for k in ks])
    best = vals.min()
    if tie_tol <= 0:
        return ks[int(vals.argmin())]
    limit = best * (1 + tie_tol) + 1e-12
    return next(k for k, v in zip(ks, vals) if v <= limit)


def view_positions(box: Sequence[float], grid: tuple[int, int]) -> torch.Tensor:
    """Patch centres ``[h*w, 2]`` (y, x; row-major) of a view that covers ``box = (y0, x0, y1, x1)`` of the
    original image (pixels), for a ``grid = (h, w)`` token grid. A horizontal flip: ``x0 > x1``."""
    y0, x0, y1, x1 = (float(v) for v in box)
    h, w = grid
    ys = y0 + (torch.arange(h) + 0.5) * (y1 - y0) / h
    xs = x0 + (torch.arange(w) + 0.5) * (x1 - x0) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=1)


def split_views(labels: torch.Tensor, n_first: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Hard labels of the joint tokens split into the two views, keeping only clusters present in both
    (CrOC section 3.3.1): returns ``(labels_1, labels_2, kept)`` with dropped clusters set to -1."""
    l1, l2 = labels[:n_first], labels[n_first:]
    kept = sorted(set(l1.tolist()) & set(l2.tolist()))
    keep = torch.tensor(kept, dtype=labels.dtype)
    drop1, drop2 = ~torch.isin(l1, keep), ~torch.isin(l2, keep)
    return l1.masked_fill(drop1, -1), l2.masked_fill(drop2, -1), kept


def image_clusters(
    model,
    images: torch.Tensor,
    k_start: int = K_START,
    k_max: int = K_MAX,
    lambda_pos: float = LAMBDA_POS,
    facet: str = "key",
    layer: int = -1,
    tie_tol: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """Per image of ``images [B, 3, H, W]``: CrOC's clustering of the joint tokens of two views, the image and
    its horizontal flip (positions mapped back to the original frame), on the ``facet`` of block ``layer``
    (CrOC: last-block keys or values; a single head-concatenated clustering, not one per head), with the
    CLS-key token marginal. Each entry is :func:`croc_cluster`'s output plus ``grid`` and ``label_map``
    (the first view's hard labels ``[h, w]``)."""
    from nbsupport.models.features import extract

    grids, cls = extract(model, images, facet=facet, layer=layer, include_cls=True)
    flipped, cls_f = extract(model, images.flip(-1), facet=facet, layer=layer, include_cls=True)
    b, h, w, d = grids.shape
    pos1 = view_positions((0, 0, images.shape[-2], images.shape[-1]), (h, w))
    pos2 = view_positions((0, images.shape[-1], images.shape[-2], 0), (h, w))
    out = []
    for i in range(b):
        toks = torch.cat([grids[i].reshape(h * w, d), flipped[i].reshape(h * w, d)])
        r = torch.cat(
            [token_marginal(grids[i].reshape(h * w, d), cls[i]), token_marginal(flipped[i].reshape(h * w, d), cls_f[i])]
        )
        gen = torch.Generator().manual_seed(seed + i)
        res = croc_cluster(toks, r, torch.cat([pos1, pos2]), k_start, k_max, lambda_pos, tie_tol=tie_tol, generator=gen)
        res["grid"] = (h, w)
        res["label_map"] = res["labels"][: h * w].reshape(h, w)
        out.append(res)
    return out


def compare_object_counts(
    gt_counts: Sequence[int],
    croc_k: Sequence[int],
    maskcut_counts: Sequence[int],
    maskcut_n: int | None = None,
) -> dict:
    """How many objects each method finds per image against the number of ground-truth instances.

    CrOC finds ``k - 1`` objects (one of its clusters is the background; its loop ends at k = 2,
    background / foreground); MaskCut finds the masks it returned (at most its fixed ``N``:
    ``maskcut_n`` caps the counts when given). Returns ``rows`` (per image: gt, croc, maskcut), and per
    method ``mae`` (mean absolute count error), ``bias`` (mean signed error), ``exact`` (fraction of
    images with the right count) and ``mean`` (mean count), plus ``gt_mean``."""
    gt = np.asarray(gt_counts, dtype=float)
    croc = np.asarray(croc_k, dtype=float) - 1
    mc = np.asarray(maskcut_counts, dtype=float)
    if maskcut_n is not None:
        mc = np.minimum(mc, maskcut_n)
    if not (len(gt) == len(croc) == len(mc)):
        raise ValueError(f"count lists differ in length: gt {len(gt)}, croc {len(croc)}, maskcut {len(mc)}")
    out = {"rows": [(int(g), int(a), int(b)) for g, a, b in zip(gt, croc, mc)], "gt_mean": float(gt.mean())}
    for name, v in (("croc", croc), ("maskcut", mc)):
        out[name] = {
            "mae": float(np.abs(v - gt).mean()),
            "bias": float((v - gt).mean()),
            "exact": float((v == gt).mean()),
            "mean": float(v.mean()),
        }
    return out
