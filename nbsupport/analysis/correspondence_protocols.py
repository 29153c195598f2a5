"""The best-buddies study of notebook 02 (thesis 2.3, Fig 2; 4.2) as package calls.

:func:`choose_prototype` picks a prototype image and queries that share one object class (any
:class:`~nbsupport.data.CocoInstances`: the synthetic world, COCO or VOC's objects through
:func:`~nbsupport.data.instances.instance_dataset`), :func:`prototype_queries` loads them with their label
maps and the shared class's name from the dataset,
:func:`match_queries` matches the prototype against each query (:func:`~nbsupport.analysis.correspondences.match`),
:func:`fig2_correspondences` gives thesis Fig 2 (relaxed best buddies on the salient foreground) and its
comparison (plain best buddies as dino-vit-features finds them), :func:`k_table` counts relaxed best
buddies and their same-class precision for every ``k`` (:func:`k_tables`: for each foreground rule),
:func:`shifted_copy_control` checks the machinery on a case whose answer is known exactly, and
:func:`round_trip` is the explorer's patch -> nearest patch -> back computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis.correspondences import (
    FOREGROUND_MODES,
    Correspondences,
    ImageDescriptors,
    chance_precision,
    descriptors,
    match,
    pair_precision,
)
from nbsupport.models import features

# ----------------------------------------------------------------------------------------------------
# Images and matching


def choose_prototype(coco, n_queries: int, ids=None) -> tuple[int, int, list[int]]:
    """``(prototype id, shared class id, query ids)``: the first image (in id order) with a class that at
    least ``n_queries`` other images also contain (its classes tried in increasing id order), and the first
    ``n_queries`` of those images; so correct correspondences exist. Only objects count: COCO's crowd
    regions show no instance (:func:`~nbsupport.data.instances.object_category_ids`). RuntimeError when
    no class is shared by ``n_queries + 1`` images."""
    from nbsupport.data.instances import object_category_ids

    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    ids = list(coco.image_ids if ids is None else ids)
    classes_of = {i: set(object_category_ids(coco, i)) for i in ids}
    for proto in ids:
        for cls in sorted(classes_of[proto]):
            queries = [i for i in ids if i != proto and cls in classes_of[i]][:n_queries]
            if len(queries) == n_queries:
                return proto, cls, queries
    raise RuntimeError(f"no class is shared by {n_queries + 1} of the {len(ids)} images: use more images")


@dataclass
class PrototypeQueries:
    """:func:`prototype_queries`' result: ``ids`` (prototype first, then the queries), ``images`` (PIL, original
    frames), ``labels`` (int64 ``[H, W]`` per image: 0 background, the category id of the object on top, -1
    where nothing may be judged: crowd regions, VOC's void band), the shared class ``class_id`` and its
    ``class_name`` (the dataset's own)."""

    ids: list
    images: list
    labels: list
    class_id: int
    class_name: str


def prototype_queries(coco, n_queries: int, ids=None) -> PrototypeQueries:
    """The prototype and the queries of :func:`choose_prototype` among ``ids`` (default: all) of a
    :class:`~nbsupport.data.CocoInstances`, loaded with their label maps
    (:func:`~nbsupport.data.instances.semantic_labels`, ignored pixels -1 so that they never count as a
    match in :func:`~nbsupport.analysis.correspondences.pair_precision`)."""
    from nbsupport.data.instances import semantic_labels

    proto, cls, queries = choose_prototype(coco, n_queries, ids)
    chosen = [proto, *queries]
    return PrototypeQueries(
        chosen,
        [coco.load(i) for i in chosen],
        [semantic_labels(coco, i, ignore=-1) for i in chosen],
        int(cls),
        coco.categories[cls],
    )


def match_queries(
    desc,
    orig_hws,
    size,
    stride: int,
    patch: int,
    n_pairs: int = 10,
    thresh: float = 0.05,
    k: int = 1,
    seed: int = 0,
    foreground: str = "filter",
) -> list[Correspondences]:
    """The prototype ``desc[0]`` matched against each query ``desc[1:]`` (:class:`ImageDescriptors`)
    with :func:`~nbsupport.analysis.correspondences.match`; ``orig_hws``: each image's original ``(H, W)``.
    ``n_pairs=0`` skips the k-means selection (every salient pair up to ``k`` with its mutual rank)."""
    if len(desc) < 2 or len(desc) != len(orig_hws):
        raise ValueError(f"need a prototype and >= 1 query with a size each, got {len(desc)} and {len(orig_hws)}")
    return [
        match(
            desc[0],
            desc[j],
            orig_hws[0],
            orig_hws[j],
            size,
            stride,
            patch,
            n_pairs,
            thresh,
            k,
            seed,
            foreground=foreground,
        )
        for j in range(1, len(desc))
    ]


def fig2_correspondences(
    desc,
    orig_hws,
    size,
    stride: int,
    patch: int,
    n_pairs: int = 10,
    thresh: float = 0.05,
    k: int = 3,
    seed: int = 0,
    foreground: str = "restrict",
) -> dict:
    """Thesis Fig 2 and its comparison, the prototype ``desc[0]`` against every query:
    ``{"relaxed": [...], "plain": [...]}``, one :class:`Correspondences` per query each.

    ``"relaxed"``: relaxed best buddies at ``k`` with ``foreground`` (default ``"restrict"``, as thesis 2.3
    describes it: the algorithm runs on the descriptors of the salient foreground only, saliency >
    ``thresh`` in each image, so background patches never compete); ``"plain"``: plain best buddies
    (``k = 1``) as dino-vit-features finds them (among all patches, then pairs with a non-salient end
    dropped). Both keep ``n_pairs`` pairs by k-means (``seed``); ``all_pairs`` holds every pair."""
    return {
        "relaxed": match_queries(desc, orig_hws, size, stride, patch, n_pairs, thresh, k, seed, foreground),
        "plain": match_queries(desc, orig_hws, size, stride, patch, n_pairs, thresh, 1, seed, "filter"),
    }


# ----------------------------------------------------------------------------------------------------
# Relaxed best buddies against k (thesis 4.2)


def k_table(relaxed: list[Correspondences], ks, labels=None):
    """Pairs and their precision as the relaxation ``k`` grows: ``(per_query, pooled)`` DataFrames.

    ``relaxed``: :func:`match_queries` results computed at ``k >= max(ks)`` (query ``j`` = entry ``j - 1``).
    Per query and ``k``: pairs before the saliency filter ("pairs (all patches)") and after it ("pairs
    (salient)"); with ``labels`` (semantic maps ``[H, W]`` of the prototype then each query, original
    frames): the same-class ``precision`` (:func:`pair_precision`) and two chance levels that keep the
    prototype points and give each a random partner in the query: any salient patch, or any object pixel.
    ``pooled`` (index ``k``): mean counts over queries, rates weighted by each query's salient pairs."""
    import pandas as pd

    ks = list(ks)
    if labels is not None and len(labels) != len(relaxed) + 1:
        raise ValueError(f"labels must hold the prototype's and {len(relaxed)} queries' maps, got {len(labels)}")
    rows = []
    for j, r in enumerate(relaxed, start=1):
        pa, pb = r.points("all", "orig")
        for k in ks:
            m = r.at_k(k).numpy()
            row = {
                "query": j,
                "k": k,
                "pairs (all patches)": int((r.unfiltered_ranks <= k).sum()),
                "pairs (salient)": int(m.sum()),
            }
            if labels is not None:
                la, lb = labels[0], labels[j]
                row["precision"] = pair_precision(pa[m], pb[m], la, lb)
                row["chance: salient partner"] = chance_precision(pa[m], la, lb, r.salient_points("b"))
                row["chance: object partner"] = chance_precision(pa[m], la, lb, np.argwhere(lb > 0))
            rows.append(row)
    counts = pd.DataFrame(rows)
    w = counts["pairs (salient)"]
    pooled = counts.groupby("k")[["pairs (all patches)", "pairs (salient)"]].mean()
    for col in counts.columns[4:]:
        pooled[col] = (counts[col].fillna(0) * w).groupby(counts["k"]).sum() / w.groupby(counts["k"]).sum()
    return counts, pooled


def k_tables(desc, orig_hws, size, stride: int, patch: int, ks, thresh: float = 0.05, labels=None, modes=None):
    """:func:`k_table` for each foreground rule (``modes``, default both: ``"filter"``, ``"restrict"``):
    ``(relaxed, counts, pooled)`` with ``relaxed = {mode: [Correspondences per query at k = max(ks)]}``,
    ``counts`` the per-query tables stacked with a first column ``foreground``, ``pooled`` indexed by
    ``(foreground, k)``."""
    import pandas as pd

    modes = list(FOREGROUND_MODES if modes is None else modes)
    k_max = max(ks)
    relaxed, counts, pooled = {}, [], []
    for mode in modes:
        relaxed[mode] = match_queries(desc, orig_hws, size, stride, patch, 0, thresh, k_max, foreground=mode)
        c, p = k_table(relaxed[mode], ks, labels)
        counts.append(c.assign(foreground=mode)[["foreground", *c.columns]])
        pooled.append(p.assign(foreground=mode).set_index("foreground", append=True).reorder_levels([1, 0]))
    return relaxed, pd.concat(counts, ignore_index=True), pd.concat(pooled)


# ----------------------------------------------------------------------------------------------------
# The shifted-copy control


@dataclass
class ShiftedCopy:
    """:func:`shifted_copy_control`'s result. ``shift``: (dy, dx) in pixels; ``image``: the rolled input
    ``[3, H, W]``; ``result``: every salient pair up to ``max(ks)``; ``points_a``, ``points_b``: their
    (y, x) centres in the input frame ``[M, 2]``; ``distance [M]``: how far (px, wrap-around, max over
    the axes) each query point is from where the shift puts its prototype point; ``table``: pairs and
    the fraction correct (distance <= one stride) per ``k``."""

    shift: tuple[int, int]
    image: torch.Tensor
    result: Correspondences
    points_a: np.ndarray
    points_b: np.ndarray
    distance: np.ndarray
    stride: int
    table: object

    @property
    def correct(self) -> np.ndarray:
        """Bool ``[M]``: the pair lands within one stride of the known answer."""
        return self.distance <= self.stride


def shifted_copy_control(
    model,
    image: torch.Tensor,
    desc: ImageDescriptors,
    ks,
    layer: int = 9,
    facet: str = "key",
    bin: bool = True,
    stride: int = 4,
    thresh: float = 0.05,
    foreground: str = "filter",
    fractions=(0.1, 0.2),
) -> ShiftedCopy:
    """Correspondences whose answer is known: the prototype input ``image [3, H, W]`` (descriptors
    ``desc``) against itself rolled by whole strides (``fractions`` of the side, at least one stride),
    so patch ``(y, x)`` must match ``(y + dy, x + dx)`` modulo the size (shift ``dy`` from the height and
    the first fraction, ``dx`` from the width and the second). A pair is correct when its query
    point lies within one stride of that place. This tests descriptors, mutual top-k and coordinates
    independently of what the backbone learned."""
    import pandas as pd

    ks = list(ks)
    if image.dim() != 3:
        raise ValueError(f"image must be one model input [3, H, W], got shape {tuple(image.shape)}")
    in_hw = np.asarray(image.shape[-2:])
    shift = tuple(int(max(1, round(int(side) * f / stride)) * stride) for side, f in zip(in_hw, fractions))
    rolled = torch.roll(image, shifts=shift, dims=(1, 2))
    d_shift = descriptors(model, rolled, layer, facet, bin, stride)
    hw = tuple(int(v) for v in in_hw)
    res = match(
        desc, d_shift, hw, hw, hw, stride, features.patch_size(model), 0, thresh, max(ks), foreground=foreground
    )
    qa, qb = res.points("all", "input")
    expected = (qa + np.asarray(shift)) % in_hw
    dist = np.abs((qb - expected + in_hw / 2) % in_hw - in_hw / 2).max(axis=1)  # wrap-around distance in px
    rows = []
    for k in ks:
        m = res.at_k(k).numpy()
        rows.append(
            {"k": k, "pairs": int(m.sum()), "correct": float(np.mean(dist[m] <= stride)) if m.any() else np.nan}
        )
    return ShiftedCopy(shift, rolled, res, qa, qb, dist, stride, pd.DataFrame(rows).set_index("k"))


# ----------------------------------------------------------------------------------------------------
# The explorer


def round_trip(desc_a: ImageDescriptors, desc_b: ImageDescriptors, i: int):
    """Patch ``i`` of A -> its most cosine-similar patch ``j`` of B -> ``j``'s most similar patch of A:
    ``(sim_ab [h_b, w_b], j, sim_ba [h_a, w_a], back)``; ``i`` and ``j`` are best buddies when ``back == i``."""
    fa, fb = F.normalize(desc_a.desc, dim=1), F.normalize(desc_b.desc, dim=1)
    if not 0 <= i < len(fa):
        raise ValueError(f"patch index {i} is outside A's {len(fa)} patches")
    sim_ab = (fb @ fa[i]).reshape(desc_b.grid)
    j = int(sim_ab.argmax())
    sim_ba = (fa @ fb[j]).reshape(desc_a.grid)
    return sim_ab, j, sim_ba, int(sim_ba.argmax())
