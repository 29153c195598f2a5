"""The Krylov Ncut solver: exact on multi-object spectra (near-degenerate lambda2, lambda3), ties, crowded
spectra (shift-invert), counted fallbacks, the masked operator, warm starts and the batched float32 path."""

import numpy as np
import pytest
import scipy.linalg
import torch

import nbsupport.maskcut as mc
from nbsupport.maskcut import engine, krylov

BOXES = [(2, 11, 2, 14), (16, 27, 3, 12), (15, 26, 16, 28), (1, 7, 18, 28)]


def objects_grid(n_obj, noise=0.3, seed=0, size=30, d=384):
    """Background and ``n_obj`` boxes with random centroids in D = 384: at low noise no cosine between two
    parts exceeds tau, so the parts are coupled only by eps and lambda2..lambda(n_obj+1) nearly coincide."""
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(5, d, generator=g)
    lab = torch.zeros(size, size, dtype=torch.long)
    for k, (y0, y1, x0, x1) in enumerate(BOXES[:n_obj], 1):
        lab[y0:y1, x0:x1] = k
    return cent[lab] + noise * torch.randn(size, size, d, generator=g), lab.numpy()


def dense_pair(A):
    """Reference eigenpairs 2 and 3 of (D - A) x = lambda D x."""
    d = A.sum(1)
    return scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 2])


def gen_residual(A, x):
    """Relative residual of the generalised eigen-equation for ``x`` (Rayleigh quotient as lambda)."""
    d = A.sum(1)
    L = np.diag(d) - A
    lam = x @ L @ x / (x @ (d * x))
    return np.linalg.norm(L @ x - lam * d * x) / np.linalg.norm(d * x)


def cos_abs(a, b):
    return abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b)


def pass_graphs(f, tau=0.15):
    """The affinity of every pass of reference MaskCut on ``f`` (dense solver), as float64 matrices."""
    graphs = []
    orig = engine._solve

    def spy(B, counts, free, fills, eps, active, solver, *a):
        graphs.append(engine._dense_affinity(B[0], free[0], float(fills[0]), eps))
        return orig(B, counts, free, fills, eps, active, solver, *a)

    engine._solve = spy
    try:
        masks = mc.maskcut(f, 3, tau=tau, solver="dense")
    finally:
        engine._solve = orig
    return graphs, masks


def test_exact_where_the_former_default_fell_back():
    """Three objects coupled only by eps: gap ~3e-5 between lambda2 and lambda3 in the first pass. The
    Krylov vector matches the dense one to 1e-8 in every pass; the old LOBPCG missed its tolerance."""
    f, _ = objects_grid(3)
    graphs, ref_masks = pass_graphs(f)
    gaps = []
    for A in graphs:
        vals, vecs = dense_pair(A)
        gaps.append(vals[1] - vals[0])
        st = mc.SolverStats()
        x = mc.second_eigenvector(A, stats=st)
        assert st.fallbacks == 0 and st.direct == 0
        assert cos_abs(x, vecs[:, 0]) > 1 - 1e-8
        assert gen_residual(A, x) < 1e-9
    assert min(gaps) < 1e-4  # the near-degenerate case is really exercised
    lob = mc.SolverStats()
    mc.maskcut(f, 3, solver="lobpcg", stats=lob)
    assert lob.fallbacks >= 1  # what the new solver replaces
    st = mc.SolverStats()
    assert torch.equal(mc.maskcut(f, 3, stats=st), ref_masks)
    assert st.fallbacks == 0 and st.matmats / st.calls < 6  # a few products per solve, warm starts included


@pytest.mark.parametrize("n_obj", [1, 2, 4])
def test_masks_equal_the_dense_reference_for_one_to_four_objects(n_obj):
    for seed in range(2):
        f, lab = objects_grid(n_obj, noise=0.3 + 0.4 * seed, seed=seed)
        st, ref_st = mc.SolverStats(), mc.SolverStats()
        a = mc.maskcut(f, max(3, n_obj), stats=st)
        b = mc.maskcut(f, max(3, n_obj), solver="dense", stats=ref_st)
        assert torch.equal(a, b), (n_obj, seed, ref_st.gaps)
        assert st.fallbacks == 0
        found = {int(np.bincount(lab[m.numpy()]).argmax()) for m in a if m.any()}
        assert set(range(1, n_obj + 1)) <= found  # every planted object is one of the masks


def test_tie_returns_an_eigenvector_of_the_tied_eigenvalue():
    """Three identical cliques coupled only by eps: lambda2 = lambda3 exactly (symmetry), so the second
    eigenvector is not unique. The solver counts a tie and returns a vector of the tied eigenspace whose
    residual is within the tolerance."""
    n = 60
    B = torch.zeros(n, n, dtype=torch.float64)
    for s in (0, 20, 40):
        B[s : s + 20, s : s + 20] = 1
    A = ((1 - 1e-5) * B + 1e-5).numpy()
    d = A.sum(1)
    vals, vecs = scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 3])
    assert vals[1] - vals[0] < 1e-12 and vals[2] - vals[1] > 1e-6  # a tie of two, then a gap
    st = mc.SolverStats()
    r = krylov.fiedler(B, 1e-5)
    x = r.x[0].numpy()
    assert bool(r.converged[0]) and float(r.gap[0]) <= krylov.TIE_GAP
    assert gen_residual(A, x) < 1e-9
    # x lies in the D-orthonormal tied eigenspace spanned by the reference's vectors 2 and 3
    coef = vecs[:, :2].T @ (d * x)
    assert np.linalg.norm(vecs[:, :2] @ coef - x) < 1e-8 * np.linalg.norm(x)
    mc.second_eigenvector(A, stats=st)
    assert st.ties == 1 and st.fallbacks == 0


def test_crowded_spectrum_switches_to_shift_invert_and_stays_exact():
    """Many small identical pieces crowd the eigenvalues just below the wanted one: with a short Krylov
    space the solver switches to shift-invert and still returns the reference vector."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(30, 30, 32, generator=g)
    A = mc.affinity(f.reshape(-1, 32), 0.25)
    vals, vecs = dense_pair(A)
    assert vals[1] - vals[0] > 1e-4
    B = torch.from_numpy((A > 0.5).astype(np.float64))
    r = krylov.fiedler(B, 1e-5, block=4, depth=2, shift_invert_after=1)
    assert r.shift_inverted and bool(r.converged[0])
    assert cos_abs(r.x[0].numpy(), vecs[:, 0]) > 1 - 1e-8


def test_unconverged_solves_fall_back_densely_and_are_counted():
    f, _ = objects_grid(2, size=20)
    A = mc.affinity(f.reshape(-1, f.shape[-1]), 0.15)
    st = mc.SolverStats()
    x = mc.second_eigenvector(A, "krylov", tol=0.0, stats=st)  # a residual bound no vector can meet
    assert st.fallbacks == 1 and st.calls == 1
    assert cos_abs(x, dense_pair(A)[1][:, 0]) > 1 - 1e-10
    r = krylov.fiedler(
        torch.from_numpy((A > 0.5) * 1.0), 1e-5, tol=0.0, floor=0.0, max_restarts=2, shift_invert_after=None
    )
    assert not bool(r.converged[0]) and r.restarts == 2


def test_masked_operator_equals_the_rewritten_graph():
    """Taken patches as a mask on the operator == their rows and columns of B set to 0 > tau (both fills)."""
    g = torch.Generator().manual_seed(0)
    B = (torch.rand(2, 50, 50, generator=g) > 0.5).double()
    B = torch.maximum(B, B.mT)
    free = torch.rand(2, 50, generator=g) > 0.3
    fill = torch.tensor([0.0, 1.0], dtype=torch.float64)
    op = krylov.NcutOperator(B, 1e-5, free=free, fill=fill)
    ff = free[:, :, None] & free[:, None, :]
    Bp = torch.where(ff, B, fill[:, None, None].expand_as(B))
    ref = krylov.NcutOperator(Bp, 1e-5)
    X = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(X), ref(X), rtol=0, atol=1e-14)
    torch.testing.assert_close(op.d, ref.d, rtol=0, atol=0)
    torch.testing.assert_close(op.dense_binary(), Bp, rtol=0, atol=0)
    # the exact vector is constant on the taken nodes (identical rows): the solver returns it so
    r = krylov.fiedler(B, 1e-5, free=free, fill=fill)
    for j in range(2):
        xt = r.x[j][~free[j]]
        assert torch.all(xt == xt[0])


def test_warm_start_and_graph_reuse_cut_the_products():
    f, _ = objects_grid(3)
    B = engine.build_graphs(f.reshape(1, -1, f.shape[-1]), [0.15])
    cold = krylov.fiedler(B, 1e-5)
    warm = krylov.fiedler(B, 1e-5, start=cold.ritz)
    assert warm.matmats < cold.matmats and warm.matmats <= 2
    assert cos_abs(warm.x[0].numpy(), cold.x[0].numpy()) > 1 - 1e-10


def test_batched_mixed_precision_path_matches_the_dense_reference():
    """The GPU path (several images per call, float32 iterations, float64 polish), run on the CPU."""
    fs = torch.stack([objects_grid(k, noise=0.3 + 0.3 * (k % 2), seed=k, size=24)[0] for k in (1, 2, 3, 4)])
    st = mc.SolverStats()
    mixed = mc.maskcut(fs, 3, batch_size=4, precision="mixed", stats=st)
    dense = mc.maskcut(fs, 3, solver="dense")
    assert torch.equal(mixed, dense)
    assert st.fallbacks == 0 and max(st.residuals) < 1e-6
    assert torch.equal(mc.maskcut(fs, 3), dense)  # the CPU default (float64, one image at a time)
    with pytest.raises(ValueError, match="precision"):
        mc.maskcut(fs, 1, precision="half")
    with pytest.raises(ValueError, match="batch_size"):
        mc.maskcut(fs, 1, batch_size=0)


def test_graph_and_median_tau_match_their_plain_definitions():
    f, _ = objects_grid(2, size=20)
    flat = f.reshape(-1, f.shape[-1])
    B = engine.build_graphs(flat[None], [0.15])[0].numpy()
    np.testing.assert_array_equal(B > 0.5, mc.affinity(flat, 0.15) > 0.5)
    fn = torch.nn.functional.normalize(flat.double(), dim=1)
    s = fn @ fn.T
    off = s[~torch.eye(len(s), dtype=torch.bool)]
    assert mc.cut._resolve_tau(flat, "median") == float(off.median())


def test_seed_ties_are_broken_by_the_first_index():
    """Equal maxima of |v| in two components (rounding noise apart): the first one is the seed, whichever
    of them rounding made larger."""
    v = np.zeros((6, 6))
    v[0:2, 0:2] = 1.0
    v[4:6, 4:6] = 1.0
    for bump in (1e-13, -1e-13):
        w = v.copy()
        w[5, 5] += bump
        m = mc.bipartition(w.ravel() + 0.01, (6, 6))
        assert m[0, 0] and not m[5, 5]
