"""The Ncut eigenproblem of MaskCut: the binarised affinity graph and its second-smallest generalised
eigenvector ``(D - A) x = lambda D x``, solved exactly (see :mod:`nbsupport.maskcut.cut`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SolverStats:
    """What the eigen-solves of one run cost and how well posed they were: pass one instance as ``stats=``
    to :func:`second_eigenvector` (or to ``maskcut`` and the pipeline, which pass it down) and read it
    afterwards; without one each call records into a throw-away instance, so nothing is shared."""

    calls: int = 0
    fallbacks: int = 0  # LOBPCG solves that missed the residual tolerance and were redone densely
    seconds: float = 0.0
    gaps: list = field(default_factory=list)  # lambda3 - lambda2 of the generalised problem, per call


BLOCK = 2  # LOBPCG block size: 2 vectors converge fast even when lambda2 and lambda3 are close


def cosine_matrix(feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, N]`` (float32) of features ``[N, D]``; all-zero rows give 0."""
    f = F.normalize(feats.float(), dim=1)
    return f @ f.T


def affinity(feats_or_cos: torch.Tensor, tau: float, eps: float = 1e-5, is_cos: bool = False) -> np.ndarray:
    """Binarised cosine affinity ``[N, N]`` (float64): 1 where cos > tau, else eps (diagonal kept).
    Pass features ``[N, D]`` or, with ``is_cos``, a cosine matrix."""
    s = feats_or_cos if is_cos else cosine_matrix(feats_or_cos)
    one = torch.ones((), dtype=torch.float64, device=s.device)
    return torch.where(s > tau, one, torch.full((), eps, dtype=torch.float64, device=s.device)).cpu().numpy()


def _dense_reference(A: np.ndarray) -> tuple[np.ndarray, float]:
    import scipy.linalg

    d = A.sum(1)
    vals, vecs = scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 2])
    return vecs[:, 0], float(vals[1] - vals[0])


def second_eigenvector(
    A, solver: str = "lobpcg", tol: float = 1e-6, seed: int = 0, stats: SolverStats | None = None
) -> np.ndarray:
    """The second-smallest generalised eigenvector ``x [N]`` of ``(D - A) x = lambda D x`` (the Ncut
    relaxation, thesis 3.3) for a symmetric affinity ``A [N, N]`` (numpy or torch), float64, up to sign and
    scale. ``solver``: ``lobpcg`` (a block of :data:`BLOCK` vectors, residual checked against ``tol``,
    dense fallback), ``torch`` or ``dense``. ``stats``: a :class:`SolverStats` to record the call in."""
    if stats is None:
        stats = SolverStats()
    t0 = time.perf_counter()
    stats.calls += 1
    A_t = torch.as_tensor(A, dtype=torch.float64)
    if solver == "dense":
        x, gap = _dense_reference(A_t.cpu().numpy())
        stats.gaps.append(gap)
        stats.seconds += time.perf_counter() - t0
        return x
    d = A_t.sum(1)
    dis = d.rsqrt()
    y1 = d.sqrt()
    y1 = y1 / y1.norm()
    if solver == "torch":
        vals, vecs = torch.linalg.eigh(dis[:, None] * A_t * dis[None, :])
        y = vecs[:, -2]
        stats.gaps.append(float(vals[-2] - vals[-3]) if len(vals) > 2 else float("nan"))
        x = (dis * y).cpu().numpy()
    elif solver == "lobpcg":
        import warnings

        from scipy.sparse.linalg import LinearOperator, lobpcg

        An = A_t.cpu().numpy()
        dn = dis.cpu().numpy()
        n = An.shape[0]
        op = LinearOperator(
            (n, n),
            matvec=lambda v: dn * (An @ (dn * v.ravel())),
            matmat=lambda X: dn[:, None] * (An @ (dn[:, None] * X)),
            dtype=np.float64,
        )
        vals = None
        if n >= 12:
            X = np.random.default_rng(seed).standard_normal((n, BLOCK))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    vals, vecs = lobpcg(op, X, Y=y1.cpu().numpy()[:, None], largest=True, tol=1e-8, maxiter=300)
                except Exception:  # noqa: BLE001 - fall back to the dense solve below
                    vals = None
        ok = False
        if vals is not None:
            order = np.argsort(-vals)
            vals, vecs = vals[order], vecs[:, order]
            y = vecs[:, 0] / np.linalg.norm(vecs[:, 0])
            my = op.matvec(y)
            lam = float(y @ my)
            res = np.linalg.norm(my - lam * y)
            ok = res < tol
        if ok:
            stats.gaps.append(float(vals[0] - vals[1]) if len(vals) > 1 else float("nan"))
            x = dn * y
        else:
            stats.fallbacks += 1
            w, v = np.linalg.eigh(dn[:, None] * An * dn[None, :])
            stats.gaps.append(float(w[-2] - w[-3]) if n > 2 else float("nan"))
            x = dn * v[:, -2]
    else:
        raise ValueError(f"unknown solver {solver!r}: use 'lobpcg', 'torch' or 'dense'")
    stats.seconds += time.perf_counter() - t0
    return np.asarray(x)
