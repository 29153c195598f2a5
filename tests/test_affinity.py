"""Affinity math: parity with scipy/sklearn/numpy and planted answers."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from nbsupport import affinity


@pytest.fixture
def ab():
    g = np.random.default_rng(0)
    return g.normal(size=(37, 16)), g.normal(size=(23, 16))


@pytest.mark.parametrize("measure,metric", [("cosine", "cosine"), ("euclidean", "euclidean"),
                                            ("manhattan", "cityblock"), ("chebyshev", "chebyshev")])
def test_pairwise_matches_scipy(ab, measure, metric):
    a, b = ab
    got = affinity.pairwise(a, b, measure, chunk=5, dtype=torch.float64).numpy()
    ref = cdist(a, b, metric)
    if measure == "cosine":
        ref = 1 - ref
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_pearson_dot_and_paired(ab):
    a, b = ab
    got = affinity.pairwise(a, b, "pearson", dtype=torch.float64).numpy()
    ref = np.corrcoef(a, b)[: len(a), len(a):]
    np.testing.assert_allclose(got, ref, atol=1e-10)
    np.testing.assert_allclose(affinity.pairwise(a, b, "dot", dtype=torch.float64).numpy(), a @ b.T, atol=1e-10)
    for m in affinity.MEASURES:
        full = affinity.pairwise(a[:20], b[:20], m, dtype=torch.float64).numpy()
        np.testing.assert_allclose(affinity.paired(a[:20], b[:20], m), np.diag(full), atol=1e-9)
    with pytest.raises(ValueError, match="unknown measure"):
        affinity.pairwise(a, b, "hamming")


def test_roc_auc_equals_sklearn_with_ties():
    g = np.random.default_rng(1)
    same = np.round(g.normal(0.5, 1, 300), 1)
    diff = np.round(g.normal(0.0, 1, 400), 1)
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(400)], np.r_[same, diff])
    assert affinity.roc_auc(same, diff) == pytest.approx(ref, abs=1e-12)
    assert affinity.roc_auc(-same, -diff, higher_is_similar=False) == pytest.approx(ref, abs=1e-12)


def test_overlap_known_values():
    g = np.random.default_rng(2)
    x = g.normal(size=20000)
    assert affinity.distribution_overlap(x, x) == pytest.approx(1.0)
    assert affinity.distribution_overlap(np.zeros(10), np.ones(10)) == 0.0
    d = 1.0
    y = g.normal(d, 1, size=200000)
    x = g.normal(0, 1, size=200000)
    assert affinity.distribution_overlap(x, y, bins=200) == pytest.approx(2 * norm.cdf(-d / 2), abs=0.02)


def planted(n_per=30, d=32, noise=0.1, seed=0):
    g = np.random.default_rng(seed)
    centres = np.eye(d)[:3] * 3
    desc = np.concatenate([c + noise * g.normal(size=(n_per, d)) for c in centres])
    return desc, np.repeat([1, 2, 3], n_per)


def test_planted_classes_are_separable_and_table():
    desc, labels = planted()
    same, diff = affinity.same_vs_different(desc, labels, "cosine")
    assert len(same) == 3 * 30 * 29 // 2 and len(diff) == 3 * 30 * 60 // 2
    s = affinity.separability(same, diff)
    assert s["auc"] > 0.99 and s["overlap"] < 0.01 and s["mean_same"] > 0.95 and abs(s["mean_diff"]) < 0.1
    rnd = np.random.default_rng(3).normal(size=desc.shape)
    table = affinity.separability_table({("key", 9): desc, ("key", 0): rnd}, labels, ("cosine", "euclidean"))
    good = table[table.layer == 9].set_index("measure").auc
    bad = table[table.layer == 0].set_index("measure").auc
    assert (good > 0.99).all() and (abs(bad - 0.5) < 0.1).all()


def test_labels_on_grid_hand_case():
    sem = np.array([[1, 1, 2, 2],
                    [1, 0, 2, 2],
                    [0, 0, 255, 255],
                    [0, 3, 255, 3]])
    assert affinity.labels_on_grid(sem, (2, 2)).tolist() == [[1, 2], [0, -1]]
    assert affinity.labels_on_grid(sem, (2, 2), min_fraction=0.8).tolist() == [[-1, 2], [-1, -1]]


def grid_with_square():
    f = torch.zeros(8, 8, 4)
    f[..., 1] = 1.0
    f[2:5, 3:7] = torch.tensor([1.0, 0, 0, 0])
    m = np.zeros((8, 8), bool)
    m[2:5, 3:7] = True
    return f, m


def test_prompt_patch_segment_recovers_planted_region():
    f, m = grid_with_square()
    yx = affinity.sample_prompt_points(m)
    assert m[yx]
    for t in (0.1, 0.3, 0.5, 0.9):
        np.testing.assert_array_equal(affinity.prompt_patch_segment(f, yx, t).numpy(), m)
    df = affinity.threshold_sweep_miou([f], [m[None]], ts=(0.1, 0.5))
    assert affinity.sweep_summary(df) == {0.1: 1.0, 0.5: 1.0, "opt": 1.0}


def test_prompt_point_is_the_centre():
    m = np.zeros((9, 9), bool)
    m[2:7, 3:8] = True
    assert affinity.sample_prompt_points(m) == (4, 5)
    assert m[affinity.sample_prompt_points(m, "random", rng=1)]
    with pytest.raises(ValueError, match="empty"):
        affinity.sample_prompt_points(np.zeros((3, 3), bool))


def test_intra_inter_on_planted_patches():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 6, 6, 8, generator=g) * 0.01
    labels = np.zeros((2, 6, 6), int)
    labels[:, :3] = 1
    labels[:, 3:5] = 2
    f[torch.from_numpy(labels == 1)] += torch.eye(8)[0]
    f[torch.from_numpy(labels == 2)] += torch.eye(8)[1]
    f[torch.from_numpy(labels == 0)] += torch.eye(8)[2]
    intra, inter = affinity.patch_pairs(f, labels, max_pairs=500, rng=0)
    assert intra.mean() > 0.99 and abs(inter.mean()) < 0.05 and len(intra) > 100 and len(inter) > 100
    intra_w, _ = affinity.patch_pairs(f, labels, max_pairs=500, within_image=True)
    assert len(intra_w) > 0


def test_similarity_map_and_affinity():
    f, m = grid_with_square()
    s = affinity.similarity_map(f, (3, 4))
    assert s.shape == (8, 8) and torch.allclose(s[torch.from_numpy(m)], torch.ones(int(m.sum())))
    v = affinity.similarity_map(f, torch.tensor([0.0, 1, 0, 0]))
    assert torch.allclose(v[0, 0], torch.tensor(1.0))
    A = affinity.patch_affinity(f)
    assert A.shape == (64, 64) and torch.allclose(A, A.T) and torch.allclose(A.diagonal(), torch.ones(64))
    with pytest.raises(ValueError, match="query"):
        affinity.similarity_map(f, torch.ones(3))


def test_prototype_segmentation_and_miou():
    f, m = grid_with_square()
    labels = np.where(m, 1, 0)
    pred = affinity.prototype_response_segmentation(f, labels, rng=0)
    np.testing.assert_array_equal(pred, labels)
    assert affinity.miou(pred, labels) == 1.0
    # class 0: predicted on 3 valid pixels, true on 1 -> IoU 1/3; class 1: never predicted -> 0
    assert affinity.miou(np.zeros((2, 2)), np.array([[0, 1], [-1, 1]])) == pytest.approx(1 / 6)
