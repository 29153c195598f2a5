"""Affinity math: parity with scipy / sklearn / numpy, hand-computed cases and planted structure."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from nbsupport.analysis import affinity


@pytest.fixture
def ab():
    g = np.random.default_rng(0)
    return g.normal(size=(37, 16)), g.normal(size=(23, 16))


# ---------------------------------------------------------------- measures


@pytest.mark.parametrize(
    "measure,metric",
    [("cosine", "cosine"), ("euclidean", "euclidean"), ("manhattan", "cityblock"), ("chebyshev", "chebyshev")],
)
def test_pairwise_matches_scipy(ab, measure, metric):
    a, b = ab
    got = affinity.pairwise(a, b, measure, chunk=5, dtype=torch.float64).numpy()
    ref = cdist(a, b, metric)
    if measure == "cosine":
        ref = 1 - ref
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # float32 default, from torch input, still close
    got32 = affinity.pairwise(torch.from_numpy(a).float(), torch.from_numpy(b).float(), measure)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_pearson_dot_and_paired(ab):
    a, b = ab
    got = affinity.pairwise(a, b, "pearson", dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, np.corrcoef(a, b)[: len(a), len(a) :], atol=1e-10)
    np.testing.assert_allclose(affinity.pairwise(a, b, "dot", dtype=torch.float64).numpy(), a @ b.T, atol=1e-10)
    for m in affinity.MEASURES:
        full = affinity.pairwise(a[:20], b[:20], m, dtype=torch.float64).numpy()
        p = affinity.paired(a[:20], b[:20], m, chunk=3)
        assert isinstance(p, np.ndarray) and p.shape == (20,)
        np.testing.assert_allclose(p, np.diag(full), atol=1e-9)
    assert set(affinity.MEASURES) >= {"cosine", "dot", "euclidean", "manhattan", "pearson", "chebyshev"}
    assert [m for m, v in affinity.MEASURES.items() if not v.higher_is_similar] == [
        "euclidean",
        "manhattan",
        "chebyshev",
    ]


def test_pairwise_chunked_equals_unchunked_and_errors(ab):
    a, b = ab
    for m in affinity.MEASURES:
        full = affinity.pairwise(a, b, m, chunk=10_000)
        assert full.shape == (37, 23)
        # same numbers up to float32 rounding of the BLAS blocking
        torch.testing.assert_close(affinity.pairwise(a, b, m, chunk=4), full, rtol=1e-6, atol=1e-5)
    self_aff = affinity.pairwise(a, None, "euclidean", dtype=torch.float64).numpy()
    np.testing.assert_allclose(self_aff, cdist(a, a), atol=1e-6)  # fast |a|^2+|b|^2-2ab path
    # features with a large shared offset (as ViT keys have): float32 distances stay accurate
    off = torch.from_numpy(a).float() + 100.0
    np.testing.assert_allclose(
        affinity.pairwise(off, None, "euclidean").numpy(), cdist(a, a), atol=1e-2
    )  # uncentred: 0.1+
    with pytest.raises(ValueError, match=r"unknown measure 'hamming'.*cosine"):
        affinity.pairwise(a, b, "hamming")
    with pytest.raises(ValueError, match="same D"):
        affinity.pairwise(a, b[:, :3])
    with pytest.raises(ValueError, match="unknown measure"):
        affinity.paired(a, a, "jaccard")


def test_image_descriptor():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, generator=g)
    torch.testing.assert_close(affinity.image_descriptor(f[0]), f[0].reshape(12, 5).mean(0))
    torch.testing.assert_close(affinity.image_descriptor(f, "max"), f.reshape(2, 12, 5).amax(1))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 1:3] = True
    torch.testing.assert_close(affinity.image_descriptor(f[1], mask=mask), (f[1, 1, 1] + f[1, 1, 2]) / 2)
    bmask = torch.stack([mask, ~mask])
    got = affinity.image_descriptor(f, mask=bmask)
    torch.testing.assert_close(got[1], f[1][~mask].mean(0))
    cls = torch.randn(2, 5, generator=g)
    assert torch.equal(affinity.image_descriptor(f, "cls", cls=cls), cls)
    with pytest.raises(ValueError, match="CLS"):
        affinity.image_descriptor(f, "cls")
    with pytest.raises(ValueError, match="how"):
        affinity.image_descriptor(f, "median")
    with pytest.raises(ValueError, match="no patch"):
        affinity.image_descriptor(f[0], mask=torch.zeros(3, 4, dtype=torch.bool))


# ---------------------------------------------------------------- pairs, AUC, overlap


def test_pair_sampling_is_exact_uniform_and_seeded():
    n = 37
    k = np.arange(n * (n - 1) // 2)
    i, j = affinity._triu_from_linear(k, n)
    ti, tj = np.triu_indices(n, 1)
    assert np.array_equal(i, ti) and np.array_equal(j, tj)
    # 20000 items -> 2e8 pairs: sampled without building the list, unique, i < j, seeded
    i, j = affinity._sample_pairs(20000, 5000, rng=3)
    assert len(i) == 5000 and (i < j).all() and j.max() < 20000
    assert len(set(zip(i.tolist(), j.tolist()))) == 5000
    i2, j2 = affinity._sample_pairs(20000, 5000, rng=3)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)
    assert not np.array_equal(i, affinity._sample_pairs(20000, 5000, rng=4)[0])


def test_same_vs_different_counts_and_sampling():
    g = np.random.default_rng(5)
    desc, labels = g.normal(size=(300, 8)), g.integers(0, 3, 300)
    same, diff = affinity.same_vs_different(desc, labels, "euclidean", max_pairs=10**6)
    n_same = sum(c * (c - 1) // 2 for c in Counter(labels.tolist()).values())
    assert len(same) == n_same and len(diff) == 300 * 299 // 2 - n_same
    # brute-force one same pair and one different pair
    s0, d0 = [], []
    for a in range(300):
        for b in range(a + 1, 300):
            (s0 if labels[a] == labels[b] else d0).append(np.linalg.norm(desc[a] - desc[b]))
    np.testing.assert_allclose(same, s0, atol=1e-10)
    np.testing.assert_allclose(diff, d0, atol=1e-10)
    ss, dd = affinity.same_vs_different(desc, labels, "euclidean", max_pairs=1000, rng=1)
    assert len(ss) + len(dd) == 1000 and 200 < len(ss) < 470  # ~1/3 same-label pairs
    assert set(ss.tolist()) <= set(same.tolist())
    ss2, _ = affinity.same_vs_different(desc, labels, "euclidean", max_pairs=1000, rng=1)
    assert np.array_equal(ss, ss2)


def test_roc_auc_equals_sklearn_with_ties():
    g = np.random.default_rng(1)
    same = np.round(g.normal(0.5, 1, 300), 1)
    diff = np.round(g.normal(0.0, 1, 400), 1)
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(400)], np.r_[same, diff])
    assert affinity.roc_auc(same, diff) == pytest.approx(ref, abs=1e-12)
    assert affinity.roc_auc(-same, -diff, higher_is_similar=False) == pytest.approx(ref, abs=1e-12)
    assert affinity.roc_auc([1, 2], [0, 0]) == 1.0 and affinity.roc_auc([1], [1]) == 0.5
    assert np.isnan(affinity.roc_auc([], [1.0]))


def test_overlap_known_values():
    g = np.random.default_rng(2)
    x = g.normal(size=20000)
    assert affinity.distribution_overlap(x, x) == pytest.approx(1.0)
    assert affinity.distribution_overlap(np.zeros(10), np.ones(10)) == 0.0
    d = 1.0
    x, y = g.normal(0, 1, size=200000), g.normal(d, 1, size=200000)
    assert affinity.distribution_overlap(x, y, bins=200) == pytest.approx(2 * norm.cdf(-d / 2), abs=0.02)
    # hand case: half of a's mass shares a bin with b
    assert affinity.distribution_overlap([0.1, 0.9], [0.8, 0.85], bins=2, range=(0, 1)) == pytest.approx(0.5)


def test_separability_hand_values():
    s = affinity.separability([1.0, 3.0], [0.0, 0.0, 2.0, 2.0])
    assert s["mean_same"] == 2.0 and s["mean_diff"] == 1.0 and s["d_prime"] == pytest.approx(1.0)
    assert s["auc"] == pytest.approx(6 / 8)  # 1 beats 0, 0; loses to 2, 2; 3 beats all four
    assert s["n_same"] == 2 and s["n_diff"] == 4
    # a tie counts 1/2: 1 vs [0, 1, 2, 2] -> 1.5, 3 -> 4
    assert affinity.separability([1.0, 3.0], [0.0, 1.0, 2.0, 2.0])["auc"] == pytest.approx(5.5 / 8)
    # distances: smaller is more similar
    assert affinity.separability([0.1, 0.2], [0.5, 0.9], higher_is_similar=False)["auc"] == 1.0


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
    assert list(table.columns[:7]) == ["facet", "layer", "measure", "auc", "overlap", "mean_same", "mean_diff"]
    assert len(table) == 4
    good = table[table.layer == 9].set_index("measure").auc
    bad = table[table.layer == 0].set_index("measure").auc
    assert (good > 0.99).all() and (abs(bad - 0.5) < 0.1).all()


# ---------------------------------------------------------------- image-level pairs (Fig 8 as the thesis draws it)


def test_image_class_sets_by_rule():
    classes = [{1: 50}, {1: 10, 2: 40}, {2: 30}, {}, {3: 5, 1: 5}]
    keep, member = affinity.image_class_sets(classes, "dominant")  # labels 1, 2, 2, -, 1 (tie: smaller id)
    assert keep.tolist() == [0, 1, 2, 4] and member.argmax(1).tolist() == [0, 1, 1, 0]
    keep, member = affinity.image_class_sets(classes, "shared")  # columns: classes 1, 2, 3
    assert keep.tolist() == [0, 1, 2, 4]
    assert member.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 1]]
    keep, member = affinity.image_class_sets(classes, "single")
    assert keep.tolist() == [0, 2] and member.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="rule"):
        affinity.image_class_sets(classes, "majority")
    with pytest.raises(ValueError, match="positive"):
        affinity.image_class_sets([{1: 0}], "shared")


def test_image_pairs_follow_the_rule_by_hand():
    """Five images (the fourth without objects): one-hot descriptors so that each pair's score names it."""
    classes = [{1: 50}, {1: 10, 2: 40}, {2: 30}, {}, {3: 5, 1: 5}]
    desc = np.eye(5) * np.arange(1, 6)[:, None]  # image b = (b + 1) e_b: dot(i, j) = 0, euclidean named below
    name = {round(float(np.hypot(i + 1, j + 1)), 9): (i, j) for i in range(5) for j in range(i + 1, 5)}

    def pairs(rule):
        same, diff = affinity.same_vs_different_images(desc, classes, rule, "euclidean")
        return sorted(name[round(v, 9)] for v in same), sorted(name[round(v, 9)] for v in diff)

    assert pairs("dominant") == ([(0, 4), (1, 2)], [(0, 1), (0, 2), (1, 4), (2, 4)])
    assert pairs("shared") == ([(0, 1), (0, 4), (1, 2), (1, 4)], [(0, 2), (2, 4)])
    assert pairs("single") == ([], [(0, 2)])
    with pytest.raises(ValueError, match="len\\(classes\\)"):
        affinity.same_vs_different_images(desc[:4], classes)


def test_image_pairs_planted_auc_is_seven_twelfths():
    """Class 1: four images along e0; class 2: two along e1 and two along e0 (look like class 1). Cosine:
    same pairs 8 x 1 and 4 x 0, different pairs 8 x 0 and 8 x 1, so AUC = 2/3 * 1/2 + (1/3 + 1/6) / 2."""
    e0, e1 = np.eye(2)
    desc = np.stack([e0] * 4 + [e1] * 2 + [e0] * 2)
    classes = [{1: 100}] * 4 + [{2: 100}] * 4
    same, diff = affinity.same_vs_different_images(desc, classes, "dominant", "cosine")
    assert sorted(same.round(6).tolist()) == [0.0] * 4 + [1.0] * 8
    assert sorted(diff.round(6).tolist()) == [0.0] * 8 + [1.0] * 8
    table = affinity.image_separability_table({("key", 9): desc}, classes, "dominant", ("cosine", "euclidean"))
    assert table.set_index("measure").auc.tolist() == pytest.approx([7 / 12, 7 / 12])
    assert table.n_same.tolist() == [12, 12] and table.n_diff.tolist() == [16, 16]


def test_image_separability_table_dominant_equals_labels_table():
    desc, labels = planted(n_per=12)
    rng = np.random.default_rng(0)
    # every image gets its planted class as the dominant one and a smaller second class
    classes = [{int(c): 100, int(rng.integers(1, 4)) + 10: 40} for c in labels]
    classes[5] = {}  # an image without objects takes no part
    keep = [b for b in range(len(labels)) if b != 5]
    img = affinity.image_separability_table({("key", 9): desc}, classes, "dominant", ("cosine",), max_pairs=300)
    ref = affinity.separability_table({("key", 9): desc[keep]}, labels[keep], ("cosine",), max_pairs=300)
    assert img.equals(ref)
    assert img.auc[0] > 0.99
    shared = affinity.image_separability_table({("key", 9): desc}, classes, "shared", ("cosine",))
    assert shared.n_same[0] > ref.n_same[0] and shared.auc[0] < img.auc[0]  # extra classes add mixed pairs


# ---------------------------------------------------------------- intra / inter patch pairs (MMC b)


def image_class_features():
    """Patch feature = e_class + e_(4 + image): cos is 1 (same class, same image), 0.5 (same class,
    other image or other class, same image) and 0 (other class, other image)."""
    B, h, w = 3, 4, 5
    labels = np.zeros((B, h, w), int)
    labels[:, :2, :3] = 1
    labels[:, 2:, 1:4] = 2
    labels[1, 0, 0] = -1
    f = torch.zeros(B, h, w, 8)
    for b in range(B):
        f[b] += torch.eye(8)[4 + b]
        for c in range(3):
            f[b][torch.from_numpy(labels[b] == c)] += torch.eye(8)[c]
    return f, labels


@pytest.mark.parametrize("limit", [1_000_000, 0])  # exact enumeration, then sampling
def test_patch_pairs_planted_image_and_class(limit):
    f, labels = image_class_features()
    kw = dict(max_pairs=300, rng=0, enumerate_limit=limit)
    intra, inter = affinity.patch_pairs(f, labels, **kw)
    assert np.isin(np.round(intra, 6), [1.0, 0.5]).all() and np.isin(np.round(inter, 6), [0.5, 0.0]).all()
    iw, ew = affinity.patch_pairs(f, labels, within_image=True, **kw)
    ia, ea = affinity.patch_pairs(f, labels, within_image=False, **kw)
    np.testing.assert_allclose(iw, 1.0, atol=1e-6)
    np.testing.assert_allclose(ew, 0.5, atol=1e-6)
    np.testing.assert_allclose(ia, 0.5, atol=1e-6)
    np.testing.assert_allclose(ea, 0.0, atol=1e-6)
    assert min(map(len, (intra, inter, iw, ew, ia, ea))) > 50 and len(intra) <= 300
    # background included: class 0 patches now count as a category
    ib, _ = affinity.patch_pairs(f, labels, exclude_background=False, **kw)
    assert len(ib) >= len(intra)


def test_patch_pairs_exact_counts_against_brute_force():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 3, 6, generator=g)
    labels = np.array([[[1, 1, 2], [0, 2, 2], [1, -1, 0]], [[2, 2, 2], [1, 0, 0], [0, 1, 1]]])
    ff, ll = f.reshape(-1, 6).double(), labels.ravel()
    img = np.repeat([0, 1], 9)
    for within in (None, True, False):
        ref = {True: [], False: []}
        for a in range(18):
            for b in range(a + 1, 18):
                if ll[a] <= 0 or ll[b] <= 0 or (within is not None and (img[a] == img[b]) != within):
                    continue
                ref[bool(ll[a] == ll[b])].append(float(torch.nn.functional.cosine_similarity(ff[a], ff[b], dim=0)))
        intra, inter = affinity.patch_pairs(f, labels, max_pairs=1000, within_image=within)
        np.testing.assert_allclose(intra, ref[True], atol=1e-6)
        np.testing.assert_allclose(inter, ref[False], atol=1e-6)
    # list input with different grid sizes per image
    intra, inter = affinity.patch_pairs([f[0], f[1, :2]], [labels[0], labels[1, :2]], max_pairs=1000)
    assert len(intra) + len(inter) == (6 + 4) * (6 + 4 - 1) // 2
    with pytest.raises(ValueError, match="labels"):
        affinity.patch_pairs(f, labels[:, :2])


def test_group_pairs_are_uniform():
    groups = np.array([0, 0, 0, 1, 1, 2])
    i, j = affinity._group_pairs(groups, 40000, np.random.default_rng(0))
    freq = Counter(zip(i.tolist(), j.tolist()))
    assert set(freq) == {(0, 1), (0, 2), (1, 2), (3, 4)}
    assert all(abs(v / 40000 - 0.25) < 0.01 for v in freq.values())


def test_intra_inter_on_planted_patches():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 6, 6, 8, generator=g) * 0.01
    labels = np.zeros((2, 6, 6), int)
    labels[:, :3] = 1
    labels[:, 3:5] = 2
    for c in range(3):
        f[torch.from_numpy(labels == c)] += torch.eye(8)[c]
    intra, inter = affinity.patch_pairs(f, labels, max_pairs=500, rng=0)
    assert intra.mean() > 0.99 and abs(inter.mean()) < 0.05 and len(intra) == len(inter) == 500
    s = affinity.separability(intra, inter)
    assert s["auc"] == 1.0 and s["overlap"] == 0.0


# ---------------------------------------------------------------- patch affinity (Fig 26)


def test_patch_affinity_by_hand(grid_with_square):
    f, m = grid_with_square
    A = affinity.patch_affinity(f)
    assert A.shape == (64, 64) and torch.allclose(A, A.T) and torch.allclose(A.diagonal(), torch.ones(64))
    assert A[2 * 8 + 3, 4 * 8 + 6] == 1.0 and A[0, 2 * 8 + 3] == 0.0  # row-major patch order
    D = affinity.patch_affinity(f, "euclidean", dtype=torch.float64)
    np.testing.assert_allclose(D.numpy(), cdist(f.reshape(64, 4), f.reshape(64, 4)), atol=1e-12)


# ---------------------------------------------------------------- LarvSeg prototypes, mIoU


def test_prototype_segmentation_and_miou(grid_with_square):
    f, m = grid_with_square
    labels = np.where(m, 1, 0)
    pred = affinity.prototype_response_segmentation(f, labels, rng=0)
    np.testing.assert_array_equal(pred, labels)
    assert affinity.miou_fraction(pred, labels) == 1.0
    # class 0: predicted on 3 valid pixels, true on 1 -> IoU 1/3; class 1: never predicted -> 0
    assert affinity.miou_fraction(np.zeros((2, 2)), np.array([[0, 1], [-1, 1]])) == pytest.approx(1 / 6)


def test_prototype_segmentation_noisy_planted():
    """Three classes as three directions plus noise: one random prototype per class recovers them."""
    g = torch.Generator().manual_seed(0)
    labels = np.zeros((10, 10), int)
    labels[:, 4:] = 1
    labels[6:, 6:] = 2
    labels[0, 0] = -1
    f = torch.randn(10, 10, 16, generator=g) * 0.1
    for c in range(3):
        f[torch.from_numpy(labels == c)] += torch.eye(16)[c]
    scores = [
        affinity.miou_fraction(affinity.prototype_response_segmentation(f, labels, rng=r), labels) for r in range(5)
    ]
    assert min(scores) > 0.95
    shuffled = f.reshape(100, 16)[torch.randperm(100, generator=g)].reshape(10, 10, 16)
    assert (
        np.mean(
            [
                affinity.miou_fraction(affinity.prototype_response_segmentation(shuffled, labels, rng=r), labels)
                for r in range(5)
            ]
        )
        < 0.6
    )
