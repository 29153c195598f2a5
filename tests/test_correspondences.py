"""Best buddies: planted permutations, relaxed superset, symmetry, chunked == dense, ties, saliency
filtering, k-means selection, coordinates and the ground-truth precision."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbsupport.analysis import correspondences as cc
from nbsupport.models import backbones


def planted(n=300, d=64, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    perm = torch.randperm(n, generator=g)
    b = a[perm] + noise * torch.randn(n, d, generator=g)  # b[j] ~ a[perm[j]]
    return a, b, perm


def as_set(pairs):
    return {tuple(p) for p in pairs.tolist()}


def relaxed_by_hand(a, b, k):
    """Independent reference in numpy: full similarity matrix, stable argsort (ties -> lower index)."""
    a = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    b = b.numpy() / np.linalg.norm(b.numpy(), axis=1, keepdims=True)
    s = a @ b.T
    nn_ab = np.argsort(-s, axis=1, kind="stable")[:, :k]
    nn_ba = np.argsort(-s.T, axis=1, kind="stable")[:, :k]
    return {(i, int(j)) for i in range(len(a)) for j in nn_ab[i] if i in nn_ba[j]}


@pytest.mark.parametrize("chunk", [None, 37, 2048])
def test_best_buddies_recover_the_planted_permutation(chunk):
    a, b, perm = planted()
    pairs = cc.best_buddies(a, b, chunk=chunk)
    assert as_set(pairs) == {(int(perm[j]), j) for j in range(len(perm))}


def test_relaxed_is_a_superset_grows_with_k_and_returns_cosines():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 16, generator=g), torch.randn(180, 16, generator=g)
    prev, counts = set(), []
    for k in (1, 2, 3, 5, 10):
        pairs, sims = cc.relaxed_best_buddies(a, b, k)
        s = as_set(pairs)
        assert prev <= s
        prev = s
        counts.append(len(s))
        ref = (F.normalize(a, dim=1)[pairs[:, 0]] * F.normalize(b, dim=1)[pairs[:, 1]]).sum(1)
        torch.testing.assert_close(sims, ref, rtol=1e-5, atol=1e-5)
    assert counts[-1] > 3 * counts[0]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_matches_an_independent_numpy_implementation(k):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    assert as_set(cc.relaxed_best_buddies(a, b, k, chunk=16)[0]) == relaxed_by_hand(a, b, k)


@pytest.mark.parametrize("k", [1, 4])
def test_symmetric_and_chunked_equals_dense(k):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(257, 32, generator=g), torch.randn(199, 32, generator=g)
    dense_pairs, dense_sims, dense_ranks = cc.mutual_ranks(a, b, k, chunk=None)
    for chunk in (1, 7, 64, 1000):
        p, s, r = cc.mutual_ranks(a, b, k, chunk=chunk)
        assert torch.equal(p, dense_pairs) and torch.equal(r, dense_ranks)
        torch.testing.assert_close(s, dense_sims)
    swapped = {(j, i) for i, j in as_set(cc.relaxed_best_buddies(b, a, k)[0])}
    assert swapped == as_set(dense_pairs)


def test_mutual_ranks_give_every_smaller_k():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(120, 12, generator=g), torch.randn(100, 12, generator=g)
    pairs, _, ranks = cc.mutual_ranks(a, b, 6)
    assert ranks.min() == 1 and ranks.max() <= 6
    for k in range(1, 7):
        assert as_set(pairs[ranks <= k]) == as_set(cc.relaxed_best_buddies(a, b, k)[0])


def test_ties_are_broken_by_the_lower_index_whatever_the_chunk():
    # three identical descriptors on each side: every similarity ties
    a, b = torch.ones(3, 4), torch.ones(3, 4)
    for chunk in (None, 1, 2):
        assert as_set(cc.best_buddies(a, b, chunk=chunk)) == {(0, 0)}
        pairs, _, ranks = cc.mutual_ranks(a, b, 2, chunk=chunk)
        assert dict(zip(map(tuple, pairs.tolist()), ranks.tolist())) == {(0, 0): 1, (0, 1): 2, (1, 0): 2, (1, 1): 2}
    # duplicated rows in B (j = 1 and 3): the lower copy is the best buddy
    g = torch.Generator().manual_seed(6)
    a = torch.randn(5, 6, generator=g)
    b = torch.stack([a[4], a[0], a[2], a[0], a[1]])
    for chunk in (None, 1, 3):
        assert as_set(cc.best_buddies(a, b, chunk=chunk)) == {(0, 1), (1, 4), (2, 2), (4, 0)}
    # four tied copies spread over a longer row (torch.topk alone returns 15 here, not 3)
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]]).repeat(20, 1)
    b[[3, 7, 11, 15]] = a
    for chunk in (None, 1):
        assert cc.best_buddies(a, b, chunk=chunk).tolist() == [[0, 3]]
        assert cc.mutual_ranks(a, b, 3, chunk=chunk)[0].tolist() == [[0, 3], [0, 7], [0, 11]]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="descriptor sizes"):
        cc.relaxed_best_buddies(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="k must be"):
        cc.relaxed_best_buddies(torch.randn(3, 4), torch.randn(3, 4), k=0)
    with pytest.raises(ValueError, match="chunk"):
        cc.best_buddies(torch.randn(3, 4), torch.randn(3, 4), chunk=0)
    with pytest.raises(ValueError, match="desc_b contains NaN"):
        cc.best_buddies(torch.randn(3, 4), torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="desc_a is empty"):
        cc.best_buddies(torch.zeros(0, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="foreground"):
        cc.match(
            (torch.ones(1, 2), torch.ones(1, 1), (1, 1)),
            (torch.ones(1, 2), torch.ones(1, 1), (1, 1)),
            (8, 8),
            (8, 8),
            8,
            8,
            8,
            foreground="both",
        )


def test_saliency_filter_drops_pairs_with_a_background_end():
    # identical 6x6 grids; foreground = a 3x3 square in A and rows 0-2 in B
    g = torch.Generator().manual_seed(7)
    desc = torch.randn(36, 16, generator=g)
    sa, sb = torch.zeros(6, 6), torch.zeros(6, 6)
    sa[1:4, 1:4] = 1.0
    sb[:3] = 1.0
    res = cc.match((desc, sa, (6, 6)), (desc, sb, (6, 6)), (48, 48), (48, 48), 48, 8, 8, n_pairs=0)
    assert res.n_unfiltered == 36  # every patch is its own best buddy before the filter
    fg = {int(i) for i in np.flatnonzero(sa.reshape(-1) > 0) if sb.reshape(-1)[i] > 0}
    assert as_set(res.all_pairs) == {(i, i) for i in fg}  # rows 1-2 of the square: 6 pairs
    assert len(fg) == 6 and len(res.pairs) == 0 and res.points_a.shape == (0, 2)


def test_restrict_mode_finds_buddies_among_salient_patches_only():
    # A's only patch is identical to B's background patch 0 and close to B's salient patch 1
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    sa, sb = torch.ones(1, 1), torch.tensor([[0.0, 1.0]])
    args = ((a, sa, (1, 1)), (b, sb, (1, 2)), (8, 8), (8, 16), (8, 16), 8, 8)
    assert len(cc.match(*args, n_pairs=0, foreground="filter").all_pairs) == 0
    res = cc.match(*args, n_pairs=0, foreground="restrict")
    assert res.all_pairs.tolist() == [[0, 1]]


def test_select_diverse_is_seeded_bounded_and_prefers_salient():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(100, 8, generator=g)
    b = a + 0.01 * torch.randn(100, 8, generator=g)
    pairs = torch.stack([torch.arange(100), torch.arange(100)], 1)
    sal = torch.rand(100, generator=g)
    s1 = cc.select_diverse(pairs, a, b, sal, sal, n=10, seed=0)
    assert torch.equal(s1, cc.select_diverse(pairs, a, b, sal, sal, n=10, seed=0))
    assert len(s1) == 10 and as_set(s1) <= as_set(pairs)
    # two planted clusters of pairs: one pick each, the most salient member of each
    a2 = torch.cat([torch.ones(5, 4) + 0.01 * torch.randn(5, 4, generator=g), -torch.ones(5, 4)])
    sal2 = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.1, 0.95, 0.2, 0.3])
    p2 = torch.stack([torch.arange(10), torch.arange(10)], 1)
    assert sorted(cc.select_diverse(p2, a2, a2, sal2, sal2, n=2, seed=0)[:, 0].tolist()) == [1, 7]
    # only 2 distinct descriptors: at most 2 non-empty clusters whatever n
    dup = torch.cat([torch.ones(6, 4), -torch.ones(6, 4)])
    p3 = torch.stack([torch.arange(12), torch.arange(12)], 1)
    assert len(cc.select_diverse(p3, dup, dup, torch.ones(12), torch.ones(12), n=5)) <= 5
    # fewer pairs than n: all of them; n = 0: none
    assert torch.equal(cc.select_diverse(p2[:2], a2, a2, sal2, sal2, n=5), p2[:2])
    assert len(cc.select_diverse(p2, a2, a2, sal2, sal2, n=0)) == 0
    with pytest.raises(ValueError, match="n must be"):
        cc.select_diverse(p2, a2, a2, sal2, sal2, n=-1)


def test_coordinates_by_hand():
    pix = cc.patch_index_to_pixel([0, 16, 17], grid=(15, 15), stride=4, patch=8)
    assert pix.tolist() == [[4, 4], [8, 8], [8, 12]]
    # 64 x 64 model input of an 80 x 100 original: (y + 0.5) * scale - 0.5
    out = cc.to_original_frame([[4, 4], [60, 32]], (64, 64), (80, 100))
    np.testing.assert_allclose(out, [[5.125, 6.53125], [75.125, 50.28125]])
    np.testing.assert_allclose(cc.to_original_frame([[3, 7]], (64, 64), (64, 64)), [[3, 7]])
    assert cc.grid_extent((15, 15), 4, 8) == (2.0, 62.0, 62.0, 2.0)
    with pytest.raises(ValueError, match="out of range"):
        cc.patch_index_to_pixel([225], grid=(15, 15), stride=4, patch=8)


def test_pair_precision_and_chance_by_hand():
    la = np.zeros((10, 10), int)
    la[:5] = 1
    lb = np.zeros((10, 10), int)
    lb[:, :5] = 1
    lb[:, 5:] = 2
    pa = [[1, 1], [1, 1], [8, 8]]
    pb = [[1, 1], [1, 8], [8, 8]]
    assert cc.pair_precision(pa, pb, la, lb) == pytest.approx(1 / 3)  # background never matches
    # rounding to the nearest pixel: (4.6, 0) lies on row 5 (background in A)
    assert cc.pair_precision([[4.4, 0.0], [4.6, 0.0]], [[0, 0], [0, 0]], la, lb) == pytest.approx(0.5)
    assert np.isnan(cc.pair_precision(np.zeros((0, 2)), np.zeros((0, 2)), la, lb))
    # A's points carry classes {1, 1, 0}; B is half class 1, half class 2: P_a(1) Q_b(1) = 2/3 * 1/2
    assert cc.chance_precision(pa, la, lb) == pytest.approx(1 / 3)
    # candidates restricted to B's points {1, 2, 2}: 2/3 * 1/3
    assert cc.chance_precision(pa, la, lb, candidates_b=pb) == pytest.approx(2 / 9)


def test_find_correspondences_end_to_end(tmp_path):
    from PIL import Image

    model = backbones.load("random_tiny8")
    rng = np.random.default_rng(0)
    arr = (rng.random((80, 100, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    res = cc.find_correspondences(model, tmp_path / "a.png", arr, n_pairs=5, size=64, layer=2, stride=4, thresh=-1.0)
    # the same image against itself: every patch is its own best buddy
    assert len(res.all_pairs) == 15 * 15 == res.n_unfiltered
    assert (res.all_pairs[:, 0] == res.all_pairs[:, 1]).all()
    assert len(res.pairs) == 5 and np.allclose(res.points_a, res.points_b)
    np.testing.assert_allclose(res.points_a_orig, (res.points_a + 0.5) * [80 / 64, 100 / 64] - 0.5)
    np.testing.assert_allclose(res.similarity, 1.0, atol=1e-5)
    salient = cc.find_correspondences(model, arr, arr, n_pairs=5, size=64, layer=2, stride=4, thresh=0.5)
    sal = salient.saliency_a.reshape(-1)
    assert (sal[salient.all_pairs[:, 0]] > 0.5).all() and 0 < len(salient.all_pairs) < 225
    assert len(salient.all_pairs) == int((sal > 0.5).sum())
    cand = salient.salient_points("a", frame="input")
    assert len(cand) == int((sal > 0.5).sum())
    assert {tuple(p) for p in salient.points("all", "input")[0].tolist()} == {tuple(p) for p in cand.tolist()}
