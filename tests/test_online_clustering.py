"""CrOC's online clustering: Sinkhorn against independent solvers (plain scaling, the exact LP as eps -> 0,
POT when installed), the merge loop's chosen k on planted clusters, positional cues, the view split and the
object-count comparison with MaskCut."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from nbsupport.analysis import online_clustering as oc


def random_problem(n=30, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, k, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    c = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    return cost, r / r.sum(), c / c.sum()


def test_sinkhorn_marginals_to_1e6():
    cost, r, c = random_problem()
    p, tc = oc.sinkhorn(cost, r, c, eps=0.05, n_iter=5000, tol=1e-10)
    assert torch.allclose(p.sum(1), r, atol=1e-6) and torch.allclose(p.sum(0), c, atol=1e-6)
    assert tc == pytest.approx(float((p * cost).sum()))
    p5, _ = oc.sinkhorn(cost, r, c, n_iter=5)  # CrOC's 5 iterations: columns exact, rows approximate
    assert torch.allclose(p5.sum(0), c, atol=1e-12)


def test_sinkhorn_matches_plain_scaling_iterations():
    cost, r, c = random_problem(seed=1)
    eps, iters = 0.2, 7
    kern = np.exp(-cost.numpy() / eps)
    u, v = np.ones(len(r)), np.ones(len(c))
    for _ in range(iters):
        u = r.numpy() / (kern @ v)
        v = c.numpy() / (kern.T @ u)
    plain = u[:, None] * kern * v[None]
    p, _ = oc.sinkhorn(cost, r, c, eps=eps, n_iter=iters)
    assert np.allclose(p.numpy(), plain, atol=1e-12)


def test_sinkhorn_cost_approaches_exact_transport():
    cost, r, c = random_problem(n=12, k=4, seed=2)
    n, k = cost.shape
    a_eq = np.zeros((n + k, n * k))
    for i in range(n):
        a_eq[i, i * k : (i + 1) * k] = 1
    for j in range(k):
        a_eq[n + j, j::k] = 1
    lp = linprog(cost.numpy().ravel(), A_eq=a_eq, b_eq=np.concatenate([r.numpy(), c.numpy()]), bounds=(0, None))
    _, tc = oc.sinkhorn(cost, r, c, eps=0.002, n_iter=20000, tol=1e-11)
    assert float(tc) == pytest.approx(lp.fun, abs=5e-3)
    assert float(tc) >= lp.fun - 1e-9


def test_sinkhorn_parity_with_pot():
    ot = pytest.importorskip("ot")
    cost, r, c = random_problem(seed=3)
    p, _ = oc.sinkhorn(cost, r, c, eps=0.1, n_iter=3000, tol=1e-12)
    ref = ot.sinkhorn(r.numpy(), c.numpy(), cost.numpy(), 0.1, numItermax=3000, stopThr=1e-12)
    assert np.allclose(p.numpy(), ref, atol=1e-7)


def planted(true_k, per=40, d=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(true_k).repeat_interleave(per)
    return torch.eye(d)[lab] + noise * torch.randn(len(lab), d, generator=g), lab


def same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("true_k", [2, 3, 4])
def test_chosen_k_equals_planted_clusters(true_k):
    x, lab = planted(true_k)
    capped = oc.croc_cluster(x, k_max=true_k, lambda_pos=0, generator=torch.Generator().manual_seed(0))
    assert capped["k"] == true_k and same_partition(capped["labels"], lab)
    loose = oc.croc_cluster(x, k_max=8, lambda_pos=0, tie_tol=0.05, generator=torch.Generator().manual_seed(0))
    assert loose["k"] == true_k and same_partition(loose["labels"], lab)
    # merging two true clusters costs much more than any over-split
    if true_k > 2:
        assert loose["costs"][true_k - 1] > 5 * loose["costs"][true_k]
    assert sorted(capped["costs"]) == list(range(2, 13)) and len(capped["merges"]) == 10


def test_per_head_clustering_finds_each_heads_structure():
    x2, lab2 = planted(2, per=60, seed=1)
    x3, lab3 = planted(3, per=40, seed=2)
    res = oc.croc_cluster_heads(
        torch.cat([x2, x3], 1), 2, k_max=3, lambda_pos=0, generator=torch.Generator().manual_seed(0)
    )
    assert res["k"] == [2, 3] and res["assignment"].shape == (120, 5)
    assert same_partition(res["heads"][0]["labels"], lab2) and same_partition(res["heads"][1]["labels"], lab3)
    assert torch.equal(res["assignment"].sum(1), torch.full((120,), 2.0))


def test_positional_cost_separates_look_alike_regions():
    g = torch.Generator().manual_seed(1)
    x = torch.ones(60, 8) + 0.01 * torch.randn(60, 8, generator=g)
    pos = torch.cat([torch.rand(30, 2, generator=g) * 5, 50 + torch.rand(30, 2, generator=g) * 5])
    side = torch.arange(60) >= 30
    with_pos = oc.croc_cluster(x, pos=pos, k_max=2, lambda_pos=4.0, generator=torch.Generator().manual_seed(0))
    assert same_partition(with_pos["labels"], side.long())
    d = oc.positional_cost(pos, pos[:3])
    assert d.max() == pytest.approx(1.0) and d.min() >= 0


def test_view_positions_and_split():
    p = oc.view_positions((0, 0, 8, 16), (2, 4))
    assert torch.allclose(p[0], torch.tensor([2.0, 2.0])) and torch.allclose(p[-1], torch.tensor([6.0, 14.0]))
    flipped = oc.view_positions((0, 16, 8, 0), (2, 4))
    assert torch.allclose(flipped.reshape(2, 4, 2).flip(1), p.reshape(2, 4, 2))
    l1, l2, kept = oc.split_views(torch.tensor([0, 0, 1, 2, 0, 2, 2, 3]), 4)
    assert kept == [0, 2]
    assert l1.tolist() == [0, 0, -1, 2] and l2.tolist() == [0, 2, 2, -1]


def test_compare_object_counts_hand_computed():
    out = oc.compare_object_counts(gt_counts=[1, 2, 3, 1], croc_k=[2, 4, 4, 3], maskcut_counts=[3, 3, 3, 1])
    assert out["rows"] == [(1, 1, 3), (2, 3, 3), (3, 3, 3), (1, 2, 1)]
    assert out["croc"] == {"mae": 0.5, "bias": 0.5, "exact": 0.5, "mean": 2.25}
    assert out["maskcut"] == {"mae": 0.75, "bias": 0.75, "exact": 0.5, "mean": 2.5}
    assert oc.compare_object_counts([1], [2], [3], maskcut_n=2)["maskcut"]["mean"] == 2.0


def test_image_clusters_on_a_random_backbone():
    from nbsupport.models import backbones

    model = backbones.load("random_tiny8")
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = oc.image_clusters(model, imgs, k_start=6, k_max=4)
    assert len(res) == 2
    for r in res:
        assert 2 <= r["k"] <= 4 and r["label_map"].shape == (8, 8)
        assert r["assignments"][r["k"]].shape == (128, r["k"])
        assert abs(float(r["assignments"][r["k"]].sum()) - 1) < 1e-4
