"""t-SNE / UMAP: planted clusters stay apart, seeds reproduce."""

import numpy as np
import pytest

from nbsupport.analysis import embedding


def clusters(n=40, d=64, k=4, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, d)) * 4
    x = np.concatenate([c + g.normal(size=(n, d)) for c in centres])
    return x, np.repeat(np.arange(k), n)


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_planted_clusters_are_kept_and_seeded(method):
    x, y = clusters()
    a = embedding.embed(x, method, pca=20, seed=0)
    b = embedding.embed(x, method, pca=20, seed=0)
    assert a.shape == (160, 2)
    np.testing.assert_allclose(a, b)
    assert embedding.knn_purity(a, y) > 0.95
    shuffled = np.random.default_rng(1).permutation(y)
    assert embedding.knn_purity(a, shuffled) < 0.5


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        embedding.embed(np.zeros((10, 3)), "pca")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        embedding.embed(np.zeros(10))
