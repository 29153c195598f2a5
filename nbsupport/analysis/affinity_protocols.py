"""The feature-affinity studies as pipelines: thesis 4.1 / Fig 8 (notebook 01) and 5.14.1 / Fig 26 (notebook 07).

Notebook 01 asks which similarity measure, facet and layer separates object classes, beside a
random-init floor: :func:`study_inputs` (images + patch ground truth of any
:class:`~nbsupport.data.CocoInstances`: the synthetic world, COCO, VOC's objects), :func:`summarise_features`
(what is kept of every (facet, layer) grid of each model), then one call per table
(:func:`object_separability`, :func:`prompt_sweep` with :func:`example_object` for its figure,
:func:`main_patch_pairs`, :func:`patch_separability`). Notebook 07 compares the contrast of DINO keys and
GroupViT stage-1 tokens: :func:`contrast_inputs` (images + patch labels of the synthetic world, PASCAL VOC
with its instances, or any segmentation dataset), :func:`dino_groupvit_affinities` and
:func:`contrast_summary`. The measures themselves live in :mod:`nbsupport.analysis.affinity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbsupport.analysis import affinity
from nbsupport.analysis.grid_truth import GridTruth
from nbsupport.data.images import image_to_tensor
from nbsupport.models import features

# ----------------------------------------------------------------------------------------------------
# Notebook 01: data and features


def study_inputs(coco, ids, image_size: int, patch: int) -> tuple[torch.Tensor, GridTruth]:
    """The images ``ids`` of a :class:`~nbsupport.data.CocoInstances` as model inputs ``[B, 3, S, S]``
    (``S = image_size``, resized ignoring the aspect ratio) and their ground truth on the ``patch``-pixel
    grid (:meth:`GridTruth.from_coco`: majority class and instance per patch)."""
    ids = list(ids)
    if not ids:
        raise ValueError("no image ids given")
    images = torch.stack([image_to_tensor(coco.load(i), image_size) for i in ids])
    grid = features.grid_size(image_size, image_size, patch)
    return images, GridTruth.from_coco(coco, ids, (image_size, image_size), grid, patch)


@dataclass
class FeatureSummary:
    """What the study keeps of one model's features, so memory stays flat on large datasets.

    ``objects``: ``{(facet, layer): (descriptors [N, D] float32, classes [N] int64)}``, one descriptor per
    object (the mean of its patches); ``patches``: ``{(facet, layer): (features [P, D], classes [P])}``, a
    seeded sample of labelled object patches; ``main``: the full grids ``[B, h, w, D]`` of the main
    (facet, layer)."""

    objects: dict
    patches: dict
    main: torch.Tensor


def summarise_features(
    models: dict,
    images: torch.Tensor,
    truth: GridTruth,
    requests,
    main_key: tuple[str, int],
    patches_per_image: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    device="cpu",
) -> dict[str, FeatureSummary]:
    """Every requested (facet, layer) grid of every model in ``models`` (``{tag: backbone}``, e.g. the model
    and its random-init floor), one forward pass per batch of ``images [B, 3, S, S]``, reduced to a
    :class:`FeatureSummary` per tag. The sampled patches (up to ``patches_per_image`` object patches per
    image, ``truth.semantic >= 1``) are drawn once per image from one generator seeded by ``seed``, so
    every model and every (facet, layer) sees the same patches. ``main_key`` must be one of ``requests``."""
    requests = list(requests)
    if tuple(main_key) not in requests:
        raise ValueError(f"main_key {main_key} is not among the requested (facet, layer) pairs {requests}")
    if len(images) != len(truth):
        raise ValueError(f"got {len(images)} images but ground truth for {len(truth)}")
    rng = np.random.default_rng(seed)
    obj = {tag: {k: ([], []) for k in requests} for tag in models}
    pat = {tag: {k: ([], []) for k in requests} for tag in models}
    main = {tag: [] for tag in models}
    sem, inst = truth.semantic, truth.instances
    for s in range(0, len(images), batch_size):
        keep = []
        for b in range(s, min(s + batch_size, len(images))):
            cand = np.flatnonzero(sem[b].ravel() >= 1)
            keep.append(rng.choice(cand, min(patches_per_image, len(cand)), replace=False) if len(cand) else cand)
        for tag, m in models.items():
            out = features.extract_many(m, images[s : s + batch_size].to(device), requests)
            for key, g in out.items():
                g = g.float().cpu()
                for bi, b in enumerate(range(s, s + g.shape[0])):
                    for k in range(1, len(truth.instance_class[b])):
                        mask = inst[b] == k
                        if mask.any():
                            obj[tag][key][0].append(affinity.image_descriptor(g[bi], mask=torch.from_numpy(mask)))
                            obj[tag][key][1].append(truth.instance_class[b][k])
                    flat = g[bi].reshape(-1, g.shape[-1])
                    pat[tag][key][0].append(flat[keep[bi]])
                    pat[tag][key][1].append(sem[b].ravel()[keep[bi]])
                if key == tuple(main_key):
                    main[tag].append(g)
    out = {}
    for tag in models:
        if not all(obj[tag][k][0] for k in requests):
            raise ValueError("no object covers a majority of any patch: use larger images or objects")
        out[tag] = FeatureSummary(
            objects={k: (torch.stack(d), np.array(lab)) for k, (d, lab) in obj[tag].items()},
            patches={k: (torch.cat(d), np.concatenate(lab)) for k, (d, lab) in pat[tag].items()},
            main=torch.cat(main[tag]),
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Notebook 01: the tables


def object_separability(summaries: dict, measures, max_pairs: int = 20000, seed: int = 0):
    """Thesis Fig 8 for every model: :func:`~nbsupport.analysis.affinity.separability_table` of the object
    descriptors of each (facet, layer), the same seeded pairs for every key; one DataFrame, column
    ``model`` = the tag."""
    import pandas as pd

    tables = []
    for tag, s in summaries.items():
        by_key = {key: d for key, (d, _) in s.objects.items()}
        labels = next(iter(s.objects.values()))[1]
        tables.append(
            affinity.separability_table(by_key, labels, measures, max_pairs=max_pairs, rng=seed).assign(model=tag)
        )
    return pd.concat(tables, ignore_index=True)


def prompt_sweep(summaries: dict, truth: GridTruth, thresholds):
    """MMC's prompt-patch threshold sweep on every model's main grids: one row per model (index = tag),
    columns = the thresholds' mIoU (fractions) and ``opt`` (:func:`~nbsupport.analysis.affinity.sweep_summary`)."""
    import pandas as pd

    thresholds = list(thresholds)
    masks = [truth.object_masks(b) for b in range(len(truth))]
    rows = {}
    for tag, s in summaries.items():
        df = affinity.threshold_sweep_miou([s.main[b] for b in range(len(truth))], masks, thresholds)
        rows[tag] = affinity.sweep_summary(df, thresholds)
    return pd.DataFrame(rows).T


def example_object(truth: GridTruth) -> tuple[int, np.ndarray]:
    """``(image index, patch mask [h, w])`` of the object the prompt-patch figure shows: the first object
    (images in order, then objects in order) that holds at least one patch. ValueError when none does."""
    for b in range(len(truth)):
        for m in truth.object_masks(b):
            if m.any():
                return b, m
    raise ValueError("no object covers a majority of any patch: use larger images or objects")


def main_patch_pairs(summaries: dict, truth: GridTruth, max_pairs: int = 20000, seed: int = 0):
    """MMC protocol (b) on every model's main grids: ``({tag: (intra [n], inter [n])}, table)``, the cosine
    scores of same-class and different-class object patch pairs (background excluded) and one row of
    :func:`~nbsupport.analysis.affinity.separability` per model."""
    import pandas as pd

    pairs, rows = {}, []
    for tag, s in summaries.items():
        intra, inter = affinity.patch_pairs(s.main, truth.semantic, "cosine", max_pairs, seed)
        pairs[tag] = (intra, inter)
        rows.append({"model": tag, **affinity.separability(intra, inter)})
    return pairs, pd.DataFrame(rows)


def patch_separability(summaries: dict, max_pairs: int = 20000, seed: int = 0):
    """Patch-level separability for every model and (facet, layer): the sampled labelled patches of all
    images pooled as one flat "image", scored by cosine intra- vs inter-class pairs."""
    import pandas as pd

    rows = []
    for tag, s in summaries.items():
        for (f, layer), (pf, pl) in s.patches.items():
            intra, inter = affinity.patch_pairs(pf[None, None], pl[None, None], "cosine", max_pairs, seed)
            rows.append({"model": tag, "facet": f, "layer": layer, **affinity.separability(intra, inter)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Notebook 07: DINO keys vs GroupViT stage-1 tokens (thesis 5.14.1, Fig 26)


def contrast_inputs(
    dataset: str | None,
    root=None,
    split: str = "val",
    n_images: int = 10,
    image_size: int = 128,
    patch: int = 8,
    seed: int = 0,
) -> tuple[list, GridTruth, str]:
    """The images of notebook 07 and their ground truth on the ``patch``-pixel grid of an ``image_size``
    input: ``(images [PIL], truth, source)``.

    ``dataset=None``: the synthetic world's ``split`` (``n_images`` scenes rendered at ``image_size`` px,
    ``seed``), truth from its instances (:meth:`GridTruth.from_coco`). ``"voc"``: the first ``n_images`` of
    PASCAL VOC 2012's ``split`` under ``root`` (``VOCdevkit/VOC2012``) with their ``SegmentationObject``
    instances (:meth:`GridTruth.from_label_maps`, 255 ignored). Any other name of
    :func:`~nbsupport.data.datasets.segmentation_dataset`: its semantic labels only (no instances). ``source``:
    the data in a few words for titles (``"voc val"``)."""
    from nbsupport.data.datasets import segmentation_dataset
    from nbsupport.data.instances import describe_dataset

    grid = features.grid_size(image_size, image_size, patch)
    if dataset is None:
        from nbsupport.data.scenes import synthetic_coco

        coco = synthetic_coco(n_images=n_images, seed=seed, size=image_size, split=split)
        ids = coco.image_ids[:n_images]
        truth = GridTruth.from_coco(coco, ids, image_size, grid, patch)
        return [coco.load(i) for i in ids], truth, describe_dataset(None, split, seed)
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs dataset_root (the folder of its official layout)")
    ds = segmentation_dataset(dataset, root, split)
    n = min(int(n_images), len(ds))
    if n < 1:
        raise ValueError(f"{ds.name} split {ds.split!r} of {ds.root} has no images")
    if hasattr(ds, "load_with_instances"):
        items = [ds.load_with_instances(i) for i in range(n)]
    else:
        items = [(*ds[i], None) for i in range(n)]
    images, semantic, inst = zip(*items)
    instances = None if all(m is None for m in inst) else list(inst)
    truth = GridTruth.from_label_maps(list(semantic), image_size, grid, instances, patch)
    return list(images), truth, describe_dataset(ds.name, ds.split)


def dino_groupvit_affinities(dino, gvit, images, layer: int, image_size: int, device="cpu") -> dict:
    """Patch-by-patch cosine matrices ``[h*w, h*w]`` (CPU, float32) of each image (PIL or uint8 array):
    ``"DINO"`` from the keys of block ``layer`` at ``image_size``, ``"GroupViT"`` from the stage-1 segment
    tokens ``Ŝ^1`` (Eq 14) with the input resized to ``grid * patch`` so that both share the DINO grid."""
    p_d, p_g = features.patch_size(dino), gvit.cfg.patch_size
    grid = features.grid_size(image_size, image_size, p_d)
    out = {"DINO": [], "GroupViT": []}
    with torch.no_grad():
        for im in images:
            xd = image_to_tensor(im, image_size)[None].to(device)
            out["DINO"].append(affinity.patch_affinity(features.extract(dino, xd, "key", layer)[0]).cpu())
            xg = image_to_tensor(im, (grid[0] * p_g, grid[1] * p_g))[None].to(device)
            tokens = gvit.encode_image(xg).segment_tokens[0][0]  # [h*w, C]
            out["GroupViT"].append(affinity.patch_affinity(tokens.reshape(*grid, -1)).cpu())
    return out


def contrast_summary(affinities: dict, labels) -> tuple:
    """How much contrast each feature space has (thesis 5.14.1): ``(table, {name: (same, different)})``.

    ``affinities``: ``{name: [A [N, N] per image]}``; ``labels``: per image the patch labels ``[N]`` (or
    ``[h, w]``; -1 = none, e.g. from :func:`~nbsupport.analysis.grid_truth.labels_to_grid`). Over all
    images: the standard deviation of every off-diagonal similarity, the mean similarity of same-label and
    different-label pairs (distinct patches, both labelled; background is a label) and the gap between
    them. Table columns: features, std of similarities, mean same, mean different, gap."""
    import pandas as pd

    labels = [np.asarray(lab).ravel() for lab in labels]
    rows, samples = [], {}
    for name, mats in affinities.items():
        if len(mats) != len(labels):
            raise ValueError(f"{name}: {len(mats)} affinity matrices but labels for {len(labels)} images")
        same, diff, allv = [], [], []
        for A, lab in zip(mats, labels):
            A = A.numpy() if torch.is_tensor(A) else np.asarray(A)
            if A.shape != (len(lab), len(lab)):
                raise ValueError(f"{name}: affinity {A.shape} does not match {len(lab)} patch labels")
            off = ~np.eye(len(A), dtype=bool)
            valid = (lab[:, None] >= 0) & (lab[None, :] >= 0) & off
            eq = lab[:, None] == lab[None, :]
            same.append(A[valid & eq])
            diff.append(A[valid & ~eq])
            allv.append(A[off])
        same, diff, allv = map(np.concatenate, (same, diff, allv))
        samples[name] = (same, diff)
        rows.append(
            {
                "features": name,
                "std of similarities": float(allv.std()),
                "mean same": float(same.mean()) if len(same) else np.nan,
                "mean different": float(diff.mean()) if len(diff) else np.nan,
            }
        )
    table = pd.DataFrame(rows)
    table["gap"] = table["mean same"] - table["mean different"]
    return table, samples
