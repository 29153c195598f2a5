"""Exact Ncut eigenvectors by restarted block Krylov iteration with Rayleigh-Ritz, batched over images.

MaskCut needs the second-smallest generalised eigenvector of ``(D - A) x = lambda D x`` (thesis 3.3; the
reference solves it with a dense ``scipy.linalg.eigh(D - A, D)``, 2.6-4.7 s per call at N = 3600 here).
With ``M = D^-1/2 A D^-1/2`` it is ``x = D^-1/2 y`` where ``y`` is the top eigenvector of ``M`` orthogonal
to the known top one ``y1 = D^1/2 1 / |D^1/2 1|`` (eigenvalue 1), and ``lambda = 1 - theta``.

Why a block and a Krylov space. With several objects the binary graph has nearly disconnected parts, so
``M`` has a *cluster* of eigenvalues just below 1 (one per part; ``theta2 - theta3`` about 2e-5 on a
60 x 60 grid with three planted objects) and a bulk far below. A block of ``block`` vectors holds the
whole cluster, so its convergence depends on the gap between the cluster and the bulk, not on the tiny
gap inside it; Rayleigh-Ritz over the Krylov space ``[X, MX, ..., M^(depth-1) X]`` then separates the
cluster's eigenvectors exactly once the space is accurate to well below that tiny gap. Restarts keep the
top ``block`` Ritz vectors; a warm start (the previous MaskCut pass's Ritz block) usually converges in one
restart. On a CPU one product with ``M`` costs the same for 1 or 32 columns (it reads ``N^2`` numbers),
which is why the block is large.

Exactness. A vector is accepted when its residual ``|M y - theta y|`` is at most
``max(floor, min(tol, rel_gap * gap))``, with ``gap`` the distance of ``theta`` to the next Ritz value
(made safe by that one's residual): the eigenvector's angle error is at most ``residual / gap``, so
``rel_gap = 1e-6`` makes it 1e-6 of the vector wherever the gap is resolvable. Where ``theta2`` and
``theta3`` coincide to within :data:`TIE_GAP` the second eigenvector is not unique (any unit vector of the
eigenspace is one; the reference's choice is arbitrary too, CutLER issue #71): the solver then returns
the top Ritz vector of its final space, an eigenvector of the tied eigenvalue to the residual bound,
and counts the call as a tie.

Precision. ``iter_dtype=float32`` runs the iterations in float32 (a GPU's fast path) and then polishes
in float64 from the float32 Ritz block, so the result is float64-exact either way.

Cost control. Rayleigh-Ritz runs after every product (it is cheap next to one), so an easy solve stops
after 1-2 products; a restart keeps the top ``block`` Ritz vectors; a spectrum that still converges slowly
after :data:`SHIFT_INVERT_AFTER` restarts (many eigenvalues crowding the wanted one) switches to
block inverse iteration with an LU factor of ``sigma I - M``, ``sigma`` just above the wanted
eigenvalue's estimate; what misses the bound
after that comes back unconverged and the caller solves it densely (counted as a fallback).

Taken patches (MaskCut's later passes) are a mask on the operator, not a rewrite of ``B``, and since
their rows are identical the returned vector is made exactly constant on them (see :func:`fiedler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 16  # Ritz vectors kept per restart: holds the near-degenerate cluster of a few-object image
DEPTH = 10  # most Krylov blocks per restart (Rayleigh-Ritz after each, so an easy solve stops early)
FLOOR = 1e-11  # smallest residual asked for in float64 (matrix products are accurate to ~1e-14)
FLOOR32 = 2e-5  # where the float32 stage hands over to the float64 polish
TIE_GAP = 1e-8  # theta2 - theta3 below this: the second eigenvector is not unique (a tie)
MAX_RESTARTS = 60
SHIFT_INVERT_AFTER = 3  # Krylov restarts before a slow spectrum switches to shift-invert
SHIFT_INVERT_BLOCK = 12  # block of the shift-invert iteration
SHIFT_MIN = 1e-9  # shift-invert: sigma at least this far above the wanted eigenvalue's estimate


@dataclass
class FiedlerResult:
    """Batched result of :func:`fiedler`: ``x [b, N]`` (float64, ``D^-1/2 y``, unit ``y``), ``value [b]`` the
    generalised eigenvalue ``lambda2``, ``gap [b]`` ``lambda3 - lambda2`` (Ritz estimate), ``residual [b]``
    ``|M y - theta y|``, ``converged [b]``, ``ritz [b, N, block]`` (the final Ritz block, a warm start for
    the next pass), and the cost: ``restarts`` and ``matmats`` (products with ``M``, each a block)."""

    x: torch.Tensor
    value: torch.Tensor
    gap: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    ritz: torch.Tensor
    restarts: int
    matmats: int
    shift_inverted: bool = False


def binary_graph(cos: torch.Tensor, tau: float, dtype=torch.float64) -> torch.Tensor:
    """The binarised graph ``[.., N, N]`` of MaskCut as 0/1 in ``dtype``: 1 where ``cos > tau``. The
    reference's affinity is ``A = (1 - eps) B + eps`` (1 where cos > tau, eps elsewhere); keeping ``B`` and
    ``eps`` apart is exact in float32 too, which ``eps = 1e-5`` itself is not."""
    out = torch.empty(cos.shape, dtype=dtype, device=cos.device)
    return out.copy_(cos > tau)  # copying the bool mask is twice as fast as casting it


def graph_from_features(
    f: torch.Tensor, tau: float, dtype=torch.float64, rows: int = 400, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`binary_graph` of the cosine matrix of features ``f [N, D]`` (``cos = f^ f^T`` of the
    L2-normalised features in float32, as :func:`nbsupport.maskcut.solver.cosine_matrix`), built ``rows``
    rows at a time on the CPU so the float32 cosines never leave the cache (about 1.5x faster than the
    full matrix then a threshold); on other devices the whole matrix at once. ``out``: an ``[N, N]`` tensor
    to write into."""
    fn = torch.nn.functional.normalize(f.float(), dim=1)
    n = fn.shape[0]
    if fn.device.type != "cpu" or dtype != torch.float64:
        B = binary_graph(fn @ fn.T, tau, dtype)
        return B if out is None else out.copy_(B)
    out = torch.empty((n, n), dtype=torch.float64) if out is None else out
    dst = out.numpy()
    tmp = torch.empty(min(rows, n), n)
    for i in range(0, n, rows):
        c = torch.mm(fn[i : i + rows], fn.T, out=tmp[: min(rows, n - i)])
        np.greater(c.numpy(), tau, out=dst[i : i + rows], casting="unsafe")
    return out


class NcutOperator:
    """``M = D^-1/2 A D^-1/2`` for ``A = (1 - eps) B' + eps 1 1^T`` without forming ``A``: ``B [b, N, N]``
    binary, and ``B'`` is ``B`` with the rows and columns of the nodes outside ``free [b, N]`` set to
    ``fill [b]`` (MaskCut's taken patches: their features are zeroed, so their cosines are 0 and their
    entries ``0 > tau``). ``B`` itself is never modified, so a pass costs no rewrite of the N^2 graph:
    ``B' Z = free * (B (free * Z)) + fill * (sum Z - free * sum(free * Z))``. ``counts [b, N]``: the row
    sums of ``B'`` if the caller keeps them. ``y1 [b, N, 1]`` is the known top eigenvector (eigenvalue 1)."""

    def __init__(
        self,
        B: torch.Tensor,
        eps: float,
        counts: torch.Tensor | None = None,
        free: torch.Tensor | None = None,
        fill: torch.Tensor | None = None,
    ):
        if B.dim() != 3 or B.shape[-1] != B.shape[-2]:
            raise ValueError(f"graph must be [b, N, N], got {tuple(B.shape)}")
        self.B, self.eps = B, float(eps)
        b, n = B.shape[:2]
        self.masked = free is not None and not bool(free.all())
        self.free64 = None if free is None else free.to(B.device, torch.float64).reshape(b, n, 1)
        self.fill64 = torch.zeros(b, 1, 1, dtype=torch.float64, device=B.device)
        if fill is not None:
            self.fill64 = torch.as_tensor(fill, dtype=torch.float64).to(B.device).reshape(b, 1, 1)
        if self.free64 is not None:
            self.free, self.fill = self.free64.to(B.dtype), self.fill64.to(B.dtype)
        if counts is None:
            one = torch.ones(b, n, 1, dtype=B.dtype, device=B.device)
            counts = self.binary_product(one)[..., 0].double() if self.masked else B.sum(-1, dtype=torch.float64)
        d = (1 - self.eps) * counts.to(B.device, torch.float64) + self.eps * n
        if not bool((d > 0).all()):
            raise ValueError("every node needs a positive degree (eps must be > 0 or the graph have self-loops)")
        self.d = d  # float64 degrees
        self.set_dtype(B.dtype)

    def set_dtype(self, dtype) -> None:
        """Products in ``dtype`` from now on (the float32 stage, then the float64 polish)."""
        self.B = self.B.to(dtype)
        self.dis = self.d.rsqrt().to(dtype)[..., None]
        y1 = self.d.sqrt()
        self.y1 = (y1 / y1.norm(dim=-1, keepdim=True)).to(dtype)[..., None]
        if self.free64 is not None:
            self.free, self.fill = self.free64.to(dtype), self.fill64.to(dtype)

    def binary_product(self, Z: torch.Tensor) -> torch.Tensor:
        """``B' Z`` (see the class docstring)."""
        if not self.masked:
            return self.B @ Z
        Zf = self.free * Z
        s_all, s_free = Z.sum(-2, keepdim=True), Zf.sum(-2, keepdim=True)
        return self.free * (self.B @ Zf) + self.fill * (s_all - self.free * s_free)

    def dense_binary(self) -> torch.Tensor:
        """``B'`` as a matrix (the shift-invert fallback and the dense solves form it)."""
        if not self.masked:
            return self.B
        ff = self.free * self.free.mT
        return self.B * ff + self.fill * (1 - ff)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        Z = self.dis * X
        return self.dis * ((1 - self.eps) * self.binary_product(Z) + self.eps * Z.sum(-2, keepdim=True))


def _project(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``W`` minus its components in the orthonormal ``Q``, twice (classical Gram-Schmidt, re-orthogonalised)."""
    for _ in range(2):
        W = W - Q @ (Q.mT @ W)
    return W


def _orthonormal(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``W`` orthogonal to ``Q``. When projecting removed most of a column (``W``
    nearly dependent on ``Q`` or on itself), what is left is rounding noise: a second round then makes the
    basis orthonormal again."""
    norms = W.norm(dim=-2)
    W, R = torch.linalg.qr(_project(W, Q))
    if bool((R.diagonal(dim1=-2, dim2=-1).abs() < 1e-3 * norms).any()):
        W = torch.linalg.qr(_project(W, Q)).Q
    return W


def _rayleigh_ritz(Qs, MQs, k: int):
    """Top ``k`` Ritz pairs of ``M`` on the span of the orthonormal blocks ``Qs`` (with ``MQs = M Qs``) and
    their residual norms."""
    Q, MQ = torch.cat(Qs, -1), torch.cat(MQs, -1)
    H = Q.mT @ MQ
    theta, C = torch.linalg.eigh((H + H.mT) / 2)
    theta, C = theta.flip(-1)[..., :k], C.flip(-1)[..., :k]
    V, MV = Q @ C, MQ @ C
    return V, theta, (MV - V * theta[..., None, :]).norm(dim=-2)


def _cycle(op: NcutOperator, X: torch.Tensor, depth: int, k: int, target, check_from: int):
    """One restart: Krylov blocks ``[X, MX, ...]`` orthonormalised, with Rayleigh-Ritz after each product
    from block ``check_from`` on (it costs little next to a product), stopping as soon as every image's
    wanted pair meets ``target``. Returns the top ``k`` Ritz pairs, residuals, whether done, products used."""
    Qs, MQs = [X], []
    for j in range(depth):
        MQs.append(op(Qs[-1]))
        if j >= check_from or j == depth - 1:
            V, theta, res = _rayleigh_ritz(Qs, MQs, k)
            gap = (theta[..., 0] - theta[..., 1] - res[..., 1]).clamp_min(0)
            done = res[..., 0] <= target(gap)
            if bool(done.all()) or j == depth - 1:
                return V, theta, res, done, j + 1
        Qs.append(_orthonormal(MQs[-1], torch.cat([op.y1, *Qs], -1)))
    raise AssertionError("unreachable")


def _start_block(op: NcutOperator, start, k: int, seed: int) -> torch.Tensor:
    """``k`` orthonormal start vectors orthogonal to ``y1``: the warm-start columns first, seeded random
    ones for the rest."""
    b, n = op.B.shape[0], op.B.shape[-1]
    m = 0
    if start is not None:
        start = torch.as_tensor(start).to(op.B)
        if start.dim() == 2:
            start = start[None]
        if start.shape[:2] != (b, n):
            raise ValueError(f"start block must be [b, N, m] = [{b}, {n}, m], got {tuple(start.shape)}")
        m = min(k, start.shape[-1])
    if m == k:
        X = start[..., :k].clone()
    else:
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(b, n, k, generator=g, dtype=torch.float64).to(op.B)
        if m:
            X[..., :m] = start[..., :m]
    return _orthonormal(X, op.y1)


def _shift_invert(op: NcutOperator, X: torch.Tensor, theta: torch.Tensor, res: torch.Tensor, target, max_iter: int):
    """Block inverse iteration with ``(sigma I - M)^-1`` (LU, float64) from the Ritz block ``X``, Rayleigh-Ritz
    with ``M``: the fallback for spectra where the Krylov space converges slowly (the wanted eigenvalue
    crowded by many close below it). ``sigma`` sits just above the current estimate ``theta`` of the
    wanted eigenvalue (Ritz values approach it from below), so that eigenvalue maps to by far the largest
    one of the inverse (only ``y1``, projected out, lies above it)."""
    sigma = (theta + torch.clamp(2 * res, min=SHIFT_MIN)).double()
    M = (1 - op.eps) * (op.dis * op.dense_binary() * op.dis.mT) + op.eps * (op.dis * op.dis.mT)
    S = -M
    del M
    S.diagonal(dim1=-2, dim2=-1).add_(sigma[..., None])
    LU, piv, info = torch.linalg.lu_factor_ex(S)
    del S
    if bool((info != 0).any()):
        return None
    X = _orthonormal(X, op.y1)
    iters = 0
    for _ in range(max_iter):
        X = _orthonormal(torch.linalg.lu_solve(LU, piv, X), op.y1)
        MX = op(X)
        iters += 1
        H = X.mT @ MX
        th, C = torch.linalg.eigh((H + H.mT) / 2)
        th, C = th.flip(-1), C.flip(-1)
        X, MX = X @ C, MX @ C
        r = (MX - X * th[..., None, :]).norm(dim=-2)
        gap = (th[..., 0] - th[..., 1] - r[..., 1]).clamp_min(0)
        if bool((r[..., 0] <= target(gap)).all()):
            break
    return X, th, r, iters


def fiedler(
    B: torch.Tensor,
    eps: float = 1e-5,
    block: int = BLOCK,
    depth: int = DEPTH,
    tol: float = 1e-6,
    rel_gap: float = 1e-6,
    floor: float = FLOOR,
    max_restarts: int = MAX_RESTARTS,
    start: torch.Tensor | None = None,
    seed: int = 0,
    iter_dtype=torch.float64,
    shift_invert_after: int | None = SHIFT_INVERT_AFTER,
    counts: torch.Tensor | None = None,
    free: torch.Tensor | None = None,
    fill: torch.Tensor | None = None,
) -> FiedlerResult:
    """Second-smallest generalised eigenvectors of MaskCut graphs ``B [b, N, N]`` or ``[N, N]`` (binary; the
    affinity is ``(1 - eps) B + eps``), all images of the batch at once. ``tol``: residual bound on every
    returned vector; ``rel_gap`` and ``floor``: the gap-relative target (see the module docstring).
    ``start``: ``[b, N, m]`` warm-start vectors (e.g. the previous pass's ``ritz``). ``iter_dtype``:
    ``float32`` iterates in float32 first, then polishes in float64. ``shift_invert_after``: Krylov restarts
    in float64 before switching to shift-invert (``None``: never). ``counts``: row sums of the graph if
    known; ``free`` / ``fill``: the nodes still in the graph and the value of the others' rows and columns
    (see :class:`NcutOperator`). Images that miss the bound after
    ``max_restarts`` come back with ``converged`` False (the caller falls back to a dense solve)."""
    if B.dim() == 2:
        B = B[None]
    n = B.shape[-1]
    if n < 3:
        raise ValueError(f"the Ncut eigenproblem needs at least 3 nodes, got {n}")
    k = max(2, min(block, (n - 1) // depth))
    op = NcutOperator(B, eps, None if counts is None else counts.reshape(B.shape[:2]), free, fill)
    op.set_dtype(iter_dtype)
    X = _start_block(op, start, k, seed)
    warm = start is not None
    stages = [torch.float32, torch.float64] if iter_dtype == torch.float32 else [torch.float64]
    restarts = matmats = 0
    shift_inverted = False
    for stage in stages:
        if stage != op.B.dtype:  # the float64 polish starts from the float32 Ritz block
            op.set_dtype(stage)
            X = _orthonormal(X.to(stage), op.y1)
            warm = True
        lo = FLOOR32 if stage == torch.float32 else floor

        def target(gap, lo=lo):
            return torch.clamp(torch.minimum(torch.full_like(gap, tol), rel_gap * gap), min=lo)

        best, stall = None, 0
        for r in range(max_restarts):
            # a warm start (the previous pass's Ritz block) may be converged already: check from block 0
            V, theta, res, done, used = _cycle(op, X, depth, k, target, 0 if warm and r == 0 else 1)
            restarts += 1
            matmats += used
            X = V
            if bool(done.all()):
                break
            worst = float(res[..., 0].max())
            stall = stall + 1 if best is not None and worst > 0.9 * best else 0
            best = worst if best is None else min(best, worst)
            if stall >= 5:  # not improving: more restarts will not help
                break
            if stage == torch.float64 and shift_invert_after is not None and r + 1 >= shift_invert_after:
                out = _shift_invert(
                    op, X[..., : min(k, SHIFT_INVERT_BLOCK)], theta[..., 0], res[..., 0], target, max_restarts
                )
                if out is not None:
                    X, theta, res, iters = out
                    matmats += iters
                    gap = (theta[..., 0] - theta[..., 1] - res[..., 1]).clamp_min(0)
                    done = res[..., 0] <= target(gap)
                    shift_inverted = True
                break
    y = X[..., 0].double()
    if op.masked:
        # the taken nodes have identical rows, so the exact vector is constant on them (the zero-sum vectors
        # on them are an eigenspace of their own, eigenvalue 0): averaging removes what rounding and the
        # stopping residual left there, which would otherwise decide MaskCut's seed among tied entries
        t = 1 - op.free64[..., 0]
        mean = (y * t).sum(-1, keepdim=True) / t.sum(-1, keepdim=True).clamp_min(1)
        y = torch.where(t > 0, mean, y)
    x = op.dis.double()[..., 0] * y
    return FiedlerResult(
        x=x,
        value=1 - theta[..., 0].double(),
        gap=(theta[..., 0] - theta[..., 1]).double(),
        residual=res[..., 0].double(),
        converged=done & (res[..., 0] <= tol),
        ritz=X,
        restarts=restarts,
        matmats=matmats,
        shift_inverted=shift_inverted,
    )
