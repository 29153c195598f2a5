"""The Ncut eigenproblem of MaskCut: the binarised affinity graph and its second-smallest generalised
eigenvector ``(D - A) x = lambda D x``, solved exactly (see :mod:`nbsupport.maskcut.cut`; the fast exact
solver is :mod:`nbsupport.maskcut.krylov`), and the :class:`SolverStats` a run records its solves in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.maskcut import krylov


@dataclass
class SolverStats:
    """What the eigen-solves of one run cost and how well posed they were: pass one instance as ``stats=``
    to :func:`second_eigenvector` (or to ``maskcut`` and the pipeline, which pass it down) and read it
    afterwards; without one each call records into a throw-away instance, so nothing is shared.
    :meth:`summary` gives the counts and per-call times in one line."""

    calls: int = 0  # eigenvectors asked for (one per image and pass)
    fallbacks: int = 0  # iterative solves that missed their residual bound and were redone densely
    seconds: float = 0.0  # time in the eigen-solves
    gaps: list = field(default_factory=list)  # lambda3 - lambda2 of the generalised problem, per call
    direct: int = 0  # graphs small enough to be solved densely on purpose (not a failure)
    cached: int = 0  # passes whose graph had not changed (after a rejection): the previous vector reused
    matmats: int = 0  # Krylov: block products with the normalised affinity
    restarts: int = 0  # Krylov: restarts (Rayleigh-Ritz steps)
    shift_inverts: int = 0  # Krylov: solves that switched to shift-invert (crowded spectra)
    ties: int = 0  # Krylov: lambda2 and lambda3 equal to within krylov.TIE_GAP (vector not unique)
    residuals: list = field(default_factory=list)  # Krylov: |M y - theta y| of each returned vector
    graph_seconds: float = 0.0  # time building cosine matrices and graphs (the engine records it)

    def summary(self) -> str:
        """One line: calls, fallbacks, ties, time per call, products per solve, worst residual."""
        solved = max(1, self.calls - self.cached - self.direct)
        worst = max(self.residuals) if self.residuals else float("nan")
        return (
            f"{self.calls} eigenvectors ({self.cached} reused, {self.direct} direct), {self.fallbacks} dense "
            f"fallbacks, {self.shift_inverts} shift-invert, {self.ties} ties; {self.seconds:.3f} s in solves "
            f"({1000 * self.seconds / max(1, self.calls):.1f} ms per call, {self.matmats / solved:.1f} "
            f"products per solve), {self.graph_seconds:.3f} s building graphs; worst residual {worst:.1e}"
        )


BLOCK = 2  # block of the legacy ``lobpcg`` solver (misses the tolerance on multi-object spectra)


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


def dense_fiedler(A: np.ndarray) -> tuple[np.ndarray, float]:
    """The reference solve: ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` (dense, float64) ->
    the second-smallest generalised eigenvector and ``lambda3 - lambda2``."""
    import scipy.linalg

    A = np.asarray(A, dtype=np.float64)
    d = A.sum(1)
    vals, vecs = scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 2])
    return vecs[:, 0], float(vals[1] - vals[0])


def second_eigenvector(
    A, solver: str = "auto", tol: float = 1e-6, seed: int = 0, stats: SolverStats | None = None
) -> np.ndarray:
    """The second-smallest generalised eigenvector ``x [N]`` of ``(D - A) x = lambda D x`` (the Ncut
    relaxation, thesis 3.3) for a symmetric non-negative affinity ``A [N, N]`` (numpy or torch), float64,
    up to sign and scale. ``solver``: ``auto`` / ``krylov`` (:func:`nbsupport.maskcut.krylov.fiedler`:
    block Krylov with Rayleigh-Ritz, exact whatever the spectrum, residual bound ``tol``, dense fallback
    counted), ``lobpcg`` (the former default: a block of :data:`BLOCK` vectors, dense fallback when it
    misses ``tol``, as it does on multi-object spectra), ``torch`` (``torch.linalg.eigh`` in float64) or
    ``dense`` (the reference). ``stats``: a :class:`SolverStats` to record the call in."""
    if stats is None:
        stats = SolverStats()
    if solver == "auto":
        solver = "krylov"
    if solver not in ("krylov", "lobpcg", "torch", "dense"):
        raise ValueError(f"unknown solver {solver!r}: use 'auto', 'krylov', 'lobpcg', 'torch' or 'dense'")
    t0 = time.perf_counter()
    stats.calls += 1
    A_t = torch.as_tensor(A, dtype=torch.float64)
    if A_t.dim() != 2 or A_t.shape[0] != A_t.shape[1]:
        raise ValueError(f"affinity must be a square matrix [N, N], got {tuple(A_t.shape)}")
    n = A_t.shape[0]
    if solver == "dense" or (solver == "krylov" and n < 48):
        x, gap = dense_fiedler(A_t.cpu().numpy())
        stats.gaps.append(gap)
        stats.direct += solver == "krylov"
        stats.seconds += time.perf_counter() - t0
        return x
    if solver == "krylov":
        r = krylov.fiedler(A_t, 0.0, tol=tol, seed=seed)
        stats.matmats += r.matmats
        stats.restarts += r.restarts
        stats.shift_inverts += int(r.shift_inverted)
        if bool(r.converged[0]):
            stats.gaps.append(float(r.gap[0]))
            stats.residuals.append(float(r.residual[0]))
            stats.ties += bool(r.gap[0] <= krylov.TIE_GAP)
            x = r.x[0].cpu().numpy()
        else:
            stats.fallbacks += 1
            x, gap = dense_fiedler(A_t.cpu().numpy())
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
    else:
        import warnings

        from scipy.sparse.linalg import LinearOperator, lobpcg

        An = A_t.cpu().numpy()
        dn = dis.cpu().numpy()
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
                except (np.linalg.LinAlgError, ValueError) as e:  # ill-conditioned block: the dense solve below
                    warnings.warn(f"LOBPCG failed ({e}); using the dense solve")
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
    stats.seconds += time.perf_counter() - t0
    return np.asarray(x)
