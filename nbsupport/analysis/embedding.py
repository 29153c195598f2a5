"""2-D embeddings of token features (thesis Fig 23: t-SNE of GroupViT's final segment tokens).

Seeded t-SNE (scikit-learn) and UMAP (umap-learn) after a PCA pre-reduction, returning coordinates;
plotting lives in the notebooks / ``nbsupport.notebook.viz``.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_array(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    return x


def pca_reduce(x, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """PCA to at most ``n_components`` dimensions (fewer when N or D is smaller)."""
    from sklearn.decomposition import PCA

    x = _as_array(x)
    k = min(n_components, x.shape[0], x.shape[1])
    if k >= x.shape[1]:
        return x
    return PCA(n_components=k, random_state=seed).fit_transform(x)


def embed(
    x,
    method: str = "tsne",
    n_components: int = 2,
    pca: int | None = 50,
    seed: int = 0,
    perplexity: float = 30.0,
    n_neighbors: int = 15,
    metric: str = "cosine",
) -> np.ndarray:
    """Coordinates ``[N, n_components]`` of features ``[N, D]`` by ``"tsne"`` or ``"umap"``, seeded."""
    x = _as_array(x)
    if pca:
        x = pca_reduce(x, pca, seed)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perp = min(perplexity, max(2.0, (len(x) - 1) / 3))
        return TSNE(n_components, perplexity=perp, init="pca", random_state=seed, metric=metric).fit_transform(x)
    if method == "umap":
        import umap

        return umap.UMAP(
            n_components=n_components,
            n_neighbors=min(n_neighbors, len(x) - 1),
            metric=metric,
            random_state=seed,
            n_jobs=1,
        ).fit_transform(x)
    raise ValueError(f"method must be 'tsne' or 'umap', got {method!r}")


def knn_purity(coords, labels, k: int = 10) -> float:
    """Mean fraction of each point's ``k`` nearest 2-D neighbours sharing its label (how well an embedding
    keeps classes together)."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    idx = nn.kneighbors(coords, return_distance=False)[:, 1:]
    return float((labels[idx] == labels[:, None]).mean())
