"""The feature-affinity studies as pipelines: thesis 4.1 / Fig 8 (notebook 01) and 5.14.1 / Fig 26 (notebook 07).

Notebook 01 asks which similarity measure, facet and layer separates classes, beside a random-init floor:
:func:`study_inputs` (images + patch ground truth of any :class:`~nbsupport.data.CocoInstances`: the
synthetic world, COCO, VOC's objects), :func:`image_classes` (the classes each image shows, with their
areas), :func:`summarise_features` (what is kept of every (facet, layer) grid of each model: one
descriptor per image and per object, sampled patches, the main grids), then one call per table: thesis
Fig 8 over images (:func:`image_separability`, as the thesis draws it) or over objects
(:func:`object_separability`), with :func:`fig8_pairs` for its histograms; MMC's prompt-patch sweep in
the thesis setting (:func:`prompt_sweep`, :func:`example_object`) and in MMC's own
(:func:`mmc_prompt_sweep`: last-block tokens after the final LayerNorm, pixel-level IoU), compared with
MMC's published numbers by :func:`sweep_comparison` and :func:`settings_table`; :func:`main_patch_pairs`,
:func:`patch_separability`. Notebook 07 compares the contrast of DINO keys and GroupViT stage-1 tokens:
:func:`contrast_inputs` (images + patch labels of the synthetic world, PASCAL VOC with its instances, or
any segmentation dataset), :func:`dino_groupvit_affinities` and :func:`contrast_summary`. The measures
themselves live in :mod:`nbsupport.analysis.affinity` and :mod:`nbsupport.analysis.prompt_patch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nbsupport.analysis import affinity, prompt_patch
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


def image_classes(coco, ids) -> list[dict]:
    """The object classes each image shows, with their areas: per image ``{class id: pixels}`` on its
    label map (:func:`~nbsupport.data.instances.instance_map`: the object on top where two overlap; crowd
    regions and VOC's void band count for no class). The input of the image-level Fig 8
    (:func:`~nbsupport.analysis.affinity.image_class_sets`); an image without objects gives ``{}``."""
    from nbsupport.data.instances import instance_map

    out = []
    for i in ids:
        ids_map, classes = instance_map(coco, i)
        counts = np.bincount(ids_map[ids_map > 0].ravel(), minlength=len(classes))
        areas: dict = {}
        for k in range(1, len(classes)):
            if counts[k]:
                areas[int(classes[k])] = areas.get(int(classes[k]), 0) + int(counts[k])
        out.append(areas)
    return out


@dataclass
class FeatureSummary:
    """What the study keeps of one model's features, so memory stays flat on large datasets.

    ``objects``: ``{(facet, layer): (descriptors [N, D] float32, classes [N] int64)}``, one descriptor per
    object (the mean of its patches); ``patches``: ``{(facet, layer): (features [P, D], classes [P])}``, a
    seeded sample of labelled object patches; ``main``: the full grids ``[B, h, w, D]`` of the main
    (facet, layer); ``images``: ``{(facet, layer): [B, D]}``, one descriptor per image (thesis Fig 8,
    pooled as ``image_pool`` says)."""

    objects: dict
    patches: dict
    main: torch.Tensor
    images: dict = field(default_factory=dict)
    image_pool: str = "mean"


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
    image_pool: str = "mean",
) -> dict[str, FeatureSummary]:
    """Every requested (facet, layer) grid of every model in ``models`` (``{tag: backbone}``, e.g. the model
    and its random-init floor), one forward pass per batch of ``images [B, 3, S, S]``, reduced to a
    :class:`FeatureSummary` per tag. The sampled patches (up to ``patches_per_image`` object patches per
    image, ``truth.semantic >= 1``) are drawn once per image from one generator seeded by ``seed``, so
    every model and every (facet, layer) sees the same patches. ``main_key`` must be one of ``requests``.
    ``image_pool``: how the image descriptors pool a grid (:func:`~nbsupport.analysis.affinity.image_descriptor`):
    ``"mean"`` of all patches, per-channel ``"max"``, or the CLS token's own ``"cls"`` key / token."""
    if image_pool not in ("mean", "max", "cls"):
        raise ValueError(f"image_pool must be 'mean', 'max' or 'cls', got {image_pool!r}")
    requests = list(requests)
    if tuple(main_key) not in requests:
        raise ValueError(f"main_key {main_key} is not among the requested (facet, layer) pairs {requests}")
    if len(images) != len(truth):
        raise ValueError(f"got {len(images)} images but ground truth for {len(truth)}")
    rng = np.random.default_rng(seed)
    obj = {tag: {k: ([], []) for k in requests} for tag in models}
    pat = {tag: {k: ([], []) for k in requests} for tag in models}
    main = {tag: [] for tag in models}
    img = {tag: {k: [] for k in requests} for tag in models}
    sem, inst = truth.semantic, truth.instances
    for s in range(0, len(images), batch_size):
        keep = []
        for b in range(s, min(s + batch_size, len(images))):
            cand = np.flatnonzero(sem[b].ravel() >= 1)
            keep.append(rng.choice(cand, min(patches_per_image, len(cand)), replace=False) if len(cand) else cand)
        x = images[s : s + batch_size].to(device)
        for tag, m in models.items():
            out = features.extract_many(m, x, requests, include_cls=image_pool == "cls")
            for key, g in out.items():
                g, cls = g if image_pool == "cls" else (g, None)
                g = g.float().cpu()
                pooled = affinity.image_descriptor(g, image_pool, cls=None if cls is None else cls.float().cpu())
                img[tag][key].append(pooled)
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
            images={k: torch.cat(v) for k, v in img[tag].items()},
            image_pool=image_pool,
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Notebook 01: the tables


def object_separability(summaries: dict, measures, max_pairs: int = 20000, seed: int = 0):
    """Thesis Fig 8 over objects (the option beside :func:`image_separability`), for every model:
    :func:`~nbsupport.analysis.affinity.separability_table` of the object descriptors of each (facet,
    layer), the same seeded pairs for every key; one DataFrame, column ``model`` = the tag."""
    import pandas as pd

    tables = []
    for tag, s in summaries.items():
        by_key = {key: d for key, (d, _) in s.objects.items()}
        labels = next(iter(s.objects.values()))[1]
        tables.append(
            affinity.separability_table(by_key, labels, measures, max_pairs=max_pairs, rng=seed).assign(model=tag)
        )
    return pd.concat(tables, ignore_index=True)


def image_separability(summaries: dict, classes, rule: str, measures, max_pairs: int = 20000, seed: int = 0):
    """Thesis Fig 8 as the thesis draws it, over images: for every model the
    :func:`~nbsupport.analysis.affinity.image_separability_table` of its image descriptors (one per image)
    with ``classes`` (:func:`image_classes`) and the multi-label ``rule``; column ``model`` = the tag."""
    import pandas as pd

    tables = [
        affinity.image_separability_table(s.images, classes, rule, measures, max_pairs, seed).assign(model=tag)
        for tag, s in summaries.items()
    ]
    return pd.concat(tables, ignore_index=True)


def fig8_pairs(
    summary: FeatureSummary,
    key,
    measure: str,
    level: str = "image",
    classes=None,
    rule: str = "dominant",
    max_pairs: int = 20000,
    seed: int = 0,
):
    """The scores behind one Fig 8 panel: numpy ``(same, different)`` for one (facet, layer) ``key`` and
    ``measure``; ``level="image"``: image pairs (``classes``, ``rule``: :func:`image_separability`'s),
    ``"object"``: object pairs (:func:`object_separability`'s)."""
    if level == "image":
        if classes is None:
            raise ValueError("level='image' needs the classes of every image (image_classes)")
        return affinity.same_vs_different_images(summary.images[key], classes, rule, measure, max_pairs, seed)
    if level == "object":
        desc, labels = summary.objects[key]
        return affinity.same_vs_different(desc, labels, measure, max_pairs, seed)
    raise ValueError(f"level must be 'image' or 'object', got {level!r}")


def prompt_sweep(summaries: dict, truth: GridTruth, thresholds):
    """MMC's prompt-patch threshold sweep on every model's main grids: one row per model (index = tag),
    columns = the thresholds' mIoU (fractions) and ``opt`` (:func:`~nbsupport.analysis.prompt_patch.sweep_summary`)."""
    import pandas as pd

    thresholds = list(thresholds)
    masks = [truth.object_masks(b) for b in range(len(truth))]
    rows = {}
    for tag, s in summaries.items():
        df = prompt_patch.threshold_sweep_miou([s.main[b] for b in range(len(truth))], masks, thresholds)
        rows[tag] = prompt_patch.sweep_summary(df, thresholds)
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
# Notebook 01: MMC's prompt-patch sweep in MMC's own setting

#: Facets of :func:`sweep_features`: the grids of :mod:`nbsupport.models.features` and ``token_norm``.
SWEEP_FACETS = ("token_norm", "key", "query", "value", "token")


def sweep_features(model, images: torch.Tensor, facet: str = "token_norm", layer: int = -1) -> torch.Tensor:
    """Feature grids ``[B, h, w, D]`` of ``images [B, 3, S, S]`` for the prompt-patch sweep.

    ``facet="token_norm"``: the tokens of block ``layer`` passed through the model's final LayerNorm
    (``model.norm``), i.e. at the last block the normalised tokens a timm / DINO ViT outputs (MMC's
    features). :mod:`nbsupport.models.features` has no such facet yet, so it is computed here from the
    ``token`` facet; any other facet is :func:`~nbsupport.models.features.extract`'s."""
    if facet not in SWEEP_FACETS:
        raise ValueError(f"facet must be one of {SWEEP_FACETS}, got {facet!r}")
    if facet != "token_norm":
        return features.extract(model, images, facet, layer)
    tokens = features.extract(model, images, "token", layer)
    with torch.no_grad():
        return model.norm(tokens)


def mmc_prompt_sweep(
    models: dict,
    coco,
    ids,
    image_size: int,
    thresholds,
    facet: str = "token_norm",
    layer: int = -1,
    iou: str = "pixel",
    batch_size: int = 8,
    device="cpu",
):
    """MMC Table 1 in MMC's own setting for every model: ``(summary, per_object)``.

    The images ``ids`` of a :class:`~nbsupport.data.CocoInstances` are resized to ``image_size`` (MMC: 480,
    aspect ignored) and described by :func:`sweep_features` (``facet``, ``layer``; MMC: the last block's
    normalised tokens). Every object (crowd excluded; where objects overlap the one on top, as
    :func:`~nbsupport.data.instances.instance_map` draws them) is prompted and scored for each threshold:
    ``iou="pixel"`` on the image's own pixels (:func:`~nbsupport.analysis.prompt_patch.pixel_threshold_sweep`,
    crowd and VOC void not judged), ``"patch"`` on the patch grid as in the thesis setting
    (:func:`~nbsupport.analysis.prompt_patch.threshold_sweep_miou`). ``summary``: one row per model (index
    = tag), the thresholds' mIoU over objects (fractions) and ``opt``; ``per_object``: ``{tag: table}``
    (column ``image`` indexes ``ids``)."""
    import pandas as pd

    from nbsupport.data.instances import instance_map

    if iou not in ("pixel", "patch"):
        raise ValueError(f"iou must be 'pixel' or 'patch', got {iou!r}")
    ids, thresholds = list(ids), list(thresholds)
    if not ids:
        raise ValueError("no image ids given")
    per = {tag: [] for tag in models}
    for s in range(0, len(ids), batch_size):
        chunk = ids[s : s + batch_size]
        x = torch.stack([image_to_tensor(coco.load(i), image_size) for i in chunk]).to(device)
        maps = [instance_map(coco, i) for i in chunk]
        for tag, m in models.items():
            grids = sweep_features(m, x, facet, layer).float()
            p = features.patch_size(m)
            if iou == "pixel":
                masks = [ids_map[None] == np.arange(1, len(c))[:, None, None] for ids_map, c in maps]
                valid = [ids_map >= 0 for ids_map, _ in maps]
                df = prompt_patch.pixel_threshold_sweep(
                    list(grids), masks, thresholds, (image_size, image_size), p, valid
                )
            else:
                truth = GridTruth.from_coco(coco, chunk, image_size, tuple(grids.shape[1:3]), p)
                masks = [truth.object_masks(b) for b in range(len(chunk))]
                df = prompt_patch.threshold_sweep_miou(list(grids), masks, thresholds)
            per[tag].append(df.assign(image=df["image"] + s))
    per_object, rows = {}, {}
    for tag, parts in per.items():
        df = pd.concat(parts, ignore_index=True)
        df.attrs["thresholds"] = thresholds
        per_object[tag] = df
        rows[tag] = prompt_patch.sweep_summary(df, thresholds)
    return pd.DataFrame(rows).T, per_object


def sweep_comparison(sweeps: dict, thresholds):
    """This study's sweeps beside MMC's published ones, in percent.

    ``sweeps``: ``{setting name: summary}`` with ``summary`` one row per model (index = tag) of mIoU
    fractions per threshold and ``opt`` (:func:`prompt_sweep`, :func:`mmc_prompt_sweep`). Returns one
    row per setting and model (``"<setting>: <tag>"``) and the rows of
    :data:`~nbsupport.analysis.prompt_patch.MMC_TABLE1` (``"MMC Table 1: <model>"``), columns the
    ``thresholds`` and ``opt`` in percent (NaN where MMC reports no such threshold)."""
    import pandas as pd

    thresholds = list(thresholds)
    cols = [*thresholds, "opt"]
    rows = {}
    for setting, df in sweeps.items():
        for tag, r in df.iterrows():
            rows[f"{setting}: {tag}"] = {c: 100 * float(r[c]) for c in cols}
    for name, r in prompt_patch.MMC_TABLE1.items():
        rows[f"MMC Table 1: {name}"] = {c: r.get(c, np.nan) for c in cols}
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols)


_FACET_WORDS = {
    "token_norm": "tokens after the final LayerNorm",
    "token": "tokens (block output)",
    "key": "keys",
    "query": "queries",
    "value": "values",
}


def sweep_setting(model, image_size: int, facet: str, layer: int, iou: str, data: str) -> dict:
    """The setting of one prompt-patch sweep in the words of
    :data:`~nbsupport.analysis.prompt_patch.MMC_SETTING` (backbone, input, token grid, features, IoU, data,
    prompt patch, mIoU), for :func:`settings_table`."""
    depth, p = model.nbs_info["depth"], features.patch_size(model)
    L = layer % depth
    g = features.grid_size(image_size, image_size, p)
    return {
        "backbone": model.nbs_info.get("description", type(model).__name__),
        "input": f"{image_size} x {image_size}",
        "token grid": f"{g[0]} x {g[1]}",
        "features": f"{_FACET_WORDS[facet]}, " + ("last block" if L == depth - 1 else f"block {L} of {depth}"),
        "IoU": "pixels (similarity upsampled to the image)" if iou == "pixel" else "patch grid (majority-rule masks)",
        "data": data,
        "prompt patch": "ours: the patch of the object's most interior pixel"
        if iou == "pixel"
        else "ours: the patch deepest in the object's grid mask",
        "mIoU": "ours: mean over objects",
    }


def settings_table(runs: dict):
    """The settings of this study's sweeps (``{column name: sweep_setting(...)}``) beside MMC's
    (:data:`~nbsupport.analysis.prompt_patch.MMC_SETTING`), one row per setting, with a last column per
    run saying whether it matches MMC ("same", "differs", or "not stated" where MMC does not say)."""
    import pandas as pd

    mmc = prompt_patch.MMC_SETTING
    df = pd.DataFrame({**runs, "MMC Table 1": mmc})
    for name, run in runs.items():
        df[f"{name} vs MMC"] = [
            "not stated" if mmc[k] == "not stated" else "same" if run[k].lower() == mmc[k].lower() else "differs"
            for k in df.index
        ]
    return df


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
