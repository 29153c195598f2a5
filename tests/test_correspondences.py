"""Best buddies: planted permutations, relaxed superset, symmetry, chunked == dense, selection."""
import numpy as np
import pytest
import torch

from nbsupport import backbones, correspondences as cc


def planted(n=300, d=64, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    perm = torch.randperm(n, generator=g)
    b = a[perm] + noise * torch.randn(n, d, generator=g)  # b[j] ~ a[perm[j]]
    return a, b, perm


def as_set(pairs):
    return {tuple(p) for p in pairs.tolist()}


def test_best_buddies_recover_the_permutation():
    a, b, perm = planted()
    pairs = cc.best_buddies(a, b)
    assert len(pairs) == len(a)
    expected = {(int(perm[j]), j) for j in range(len(perm))}
    assert as_set(pairs) == expected


def test_relaxed_is_a_superset_and_grows_with_k():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 16, generator=g), torch.randn(180, 16, generator=g)
    prev = set()
    counts = []
    for k in (1, 2, 3, 5, 10):
        pairs, sims = cc.relaxed_best_buddies(a, b, k)
        s = as_set(pairs)
        assert prev <= s
        prev = s
        counts.append(len(s))
        assert len(sims) == len(pairs)
        ref = torch.nn.functional.normalize(a, dim=1)[pairs[:, 0]] * torch.nn.functional.normalize(b, dim=1)[pairs[:, 1]]
        torch.testing.assert_close(sims, ref.sum(1), rtol=1e-5, atol=1e-5)
    assert counts[-1] > 3 * counts[0]


def test_k1_equals_mutual_nearest_neighbours_by_hand():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    s = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    nn_ab, nn_ba = s.argmax(1), s.argmax(0)
    ref = {(i, int(nn_ab[i])) for i in range(50) if int(nn_ba[nn_ab[i]]) == i}
    assert as_set(cc.best_buddies(a, b)) == ref


@pytest.mark.parametrize("k", [1, 4])
def test_symmetric_and_chunked_equals_dense(k):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(257, 32, generator=g), torch.randn(199, 32, generator=g)
    dense = as_set(cc.relaxed_best_buddies(a, b, k, chunk=None)[0])
    for chunk in (1, 7, 64, 1000):
        assert as_set(cc.relaxed_best_buddies(a, b, k, chunk=chunk)[0]) == dense
    swapped = {(j, i) for i, j in as_set(cc.relaxed_best_buddies(b, a, k)[0])}
    assert swapped == dense


def test_bad_arguments():
    with pytest.raises(ValueError, match="descriptor sizes"):
        cc.relaxed_best_buddies(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="k must be"):
        cc.relaxed_best_buddies(torch.randn(3, 4), torch.randn(3, 4), k=0)


def test_select_diverse_is_seeded_and_prefers_salient():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(100, 8, generator=g)
    b = a + 0.01 * torch.randn(100, 8, generator=g)
    pairs = torch.stack([torch.arange(100), torch.arange(100)], 1)
    sal = torch.rand(100, generator=g)
    s1 = cc.select_diverse(pairs, a, b, sal, sal, n=10, seed=0)
    s2 = cc.select_diverse(pairs, a, b, sal, sal, n=10, seed=0)
    assert torch.equal(s1, s2) and len(s1) == 10
    # two planted clusters of pairs: one pick each, the most salient member of each
    a2 = torch.cat([torch.ones(5, 4) + 0.01 * torch.randn(5, 4, generator=g), -torch.ones(5, 4)])
    sal2 = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.1, 0.95, 0.2, 0.3])
    p2 = torch.stack([torch.arange(10), torch.arange(10)], 1)
    chosen = cc.select_diverse(p2, a2, a2, sal2, sal2, n=2, seed=0)
    assert sorted(chosen[:, 0].tolist()) == [1, 7]
    assert torch.equal(cc.select_diverse(p2[:2], a2, a2, sal2, sal2, n=5), p2[:2])


def test_coordinates_and_precision():
    pix = cc.patch_index_to_pixel([0, 16, 17], grid=(15, 15), stride=4, patch=8)
    assert pix.tolist() == [[4, 4], [8, 8], [8, 12]]
    la = np.zeros((10, 10), int)
    la[:5] = 1
    lb = np.zeros((10, 10), int)
    lb[:, :5] = 1
    lb[:, 5:] = 2
    pa = [[1, 1], [1, 1], [8, 8]]
    pb = [[1, 1], [1, 8], [8, 8]]
    assert cc.pair_precision(pa, pb, la, lb) == pytest.approx(1 / 3)  # background never matches
    assert np.isnan(cc.pair_precision(np.zeros((0, 2)), np.zeros((0, 2)), la, lb))


def test_find_correspondences_end_to_end():
    from PIL import Image

    model = backbones.load("random_tiny8")
    g = np.random.default_rng(0)
    img = Image.fromarray((g.random((80, 100, 3)) * 255).astype(np.uint8))
    res = cc.find_correspondences(model, img, img, n_pairs=5, size=64, layer=2, stride=4, thresh=-1.0)
    # the same image against itself: every patch is its own best buddy
    assert len(res.all_pairs) == 15 * 15
    assert (res.all_pairs[:, 0] == res.all_pairs[:, 1]).all()
    assert len(res.pairs) == 5 and np.allclose(res.points_a, res.points_b)
    assert np.allclose(res.points_a_orig, res.points_a * [80 / 64, 100 / 64])
    salient = cc.find_correspondences(model, img, img, n_pairs=5, size=64, layer=2, stride=4, thresh=0.5)
    sal = salient.saliency_a.reshape(-1)
    assert (sal[salient.all_pairs[:, 0]] > 0.5).all() and len(salient.all_pairs) < 225
