"""Notebook 09's study as calls: probe datasets at a model's input size, then the cluster and linear probes of
every backbone on every dataset, one (backbone, dataset) at a time so that only one feature set is in memory.

Datasets (:data:`PROBE_DATASETS`): ``synthetic`` (the synthetic world, labels as rendered: 0 background,
1..6 the object classes, so K = 7), ``cocostuff27``, ``cityscapes27``, ``potsdam3`` (STEGO's label maps, as
HP evaluates), ``voc`` (PASCAL VOC 2012 val; the linear probe trains on trainaug as CrOC's does). Real images
are resized so that the shorter side is ``size`` (labels NEAREST) and centre-cropped to ``size x size``, the
preprocessing of STEGO and HP.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nbsupport.analysis.probes import cache as fcache
from nbsupport.analysis.probes import cluster, linear
from nbsupport.analysis.probes.crf import crf_available
from nbsupport.analysis.probes.matching import IGNORE

#: name -> (train dataset, train split), (eval dataset, eval split)
PROBE_DATASETS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "synthetic": (("synthetic", "train"), ("synthetic", "val")),
    "cocostuff27": (("cocostuff27", "train"), ("cocostuff27", "val")),
    "cityscapes27": (("cityscapes27", "train"), ("cityscapes27", "val")),
    "potsdam3": (("potsdam3", "train"), ("potsdam3", "val")),
    "voc": (("voc_aug", "train_aug"), ("voc", "val")),
}


@dataclass
class ProbeData:
    """``pixels`` uint8 ``[N, 3, S, S]``, ``labels`` uint8 ``[N, S, S]`` (class ids ``0..C-1``, 255 ignored),
    ``class_names`` (C), ``source`` for titles, ``key`` what identifies the images (the feature cache key)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: str
    key: dict = field(default_factory=dict)

    @property
    def images(self):
        from nbsupport.data.segmentation import NormalizedImages

        return NormalizedImages(self.pixels)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pixels)


def resize_crop(img: Image.Image, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """STEGO's preprocessing: shorter side to ``size`` (image bilinear, labels nearest), centre crop to
    ``size x size``. Returns uint8 ``[3, S, S]`` and uint8 ``[S, S]``."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    lab = Image.fromarray(np.asarray(mask).astype(np.uint8)).resize((nw, nh), Image.Resampling.NEAREST)
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left, top, left + size, top + size)
    px = torch.from_numpy(np.array(img.crop(box), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return px, torch.from_numpy(np.array(lab.crop(box), dtype=np.uint8))


def probe_data(
    dataset: str, root=None, split: str = "val", n_images: int | None = 8, size: int = 64, seed: int = 0
) -> ProbeData:
    """The first ``n_images`` (None: all) of ``dataset``'s ``split`` at ``size x size`` with labels
    ``0..C-1`` and 255. ``"synthetic"``: the synthetic world rendered at ``size`` (background 0 and the
    object classes, ``C = 7``); any other name of :func:`~nbsupport.data.datasets.segmentation_dataset`
    from ``root`` (STEGO's resize and centre crop, :func:`resize_crop`)."""
    if dataset == "synthetic":
        from nbsupport.data.segmentation import segmentation_set

        s = segmentation_set(None, n_images or 8, size, seed, split)
        labels = s.semantic.clamp(max=IGNORE).to(torch.uint8)
        return ProbeData(
            s.pixels, labels, s.label_names, s.source, {"dataset": "synthetic", "split": split, "seed": seed}
        )
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs its root (the folder of its official layout)")
    from nbsupport.data.datasets import segmentation_dataset

    ds = segmentation_dataset(dataset, root, split)
    n = len(ds) if n_images is None else min(int(n_images), len(ds))
    if n < 1:
        raise ValueError(f"{ds.name} split {ds.split!r} of {ds.root} has no images")
    px, lab = zip(*(resize_crop(*ds[i], size) for i in range(n)))
    key = {"dataset": dataset, "split": split, "root": str(root), "crop": "short-side+centre"}
    return ProbeData(torch.stack(px), torch.stack(lab), list(ds.classes), f"{ds.name} {ds.split}", key)


def probe_datasets(
    names: Sequence[str],
    roots: dict | None = None,
    n_images: int | None = 8,
    n_train: int | None = 8,
    size: int = 64,
    seed: int = 0,
) -> dict[str, tuple[ProbeData, ProbeData]]:
    """``{name: (train, eval)}`` for every probe dataset of :data:`PROBE_DATASETS` (roots by name; VOC's
    trainaug shares the VOC root)."""
    roots = roots or {}
    out = {}
    for name in names:
        if name not in PROBE_DATASETS:
            raise ValueError(f"unknown probe dataset {name!r}: use some of {sorted(PROBE_DATASETS)}")
        (tr_name, tr_split), (ev_name, ev_split) = PROBE_DATASETS[name]
        root = roots.get(name)
        train = probe_data(tr_name, root, tr_split, n_train, size, seed)
        val = probe_data(ev_name, root, ev_split, n_images, size, seed)
        if train.class_names != val.class_names:
            raise ValueError(f"{name}: train and eval class lists differ")
        out[name] = (train, val)
    return out


@dataclass
class ProbeReport:
    """What :func:`run_probes` measured. ``cluster``: one row per (dataset, backbone, estimator, criterion,
    seed); ``linear``: one row per (dataset, backbone); ``sources``: per backbone spec its description,
    patch, facet, layers, checkpoint; ``predictions``: ``{(dataset, backbone, probe): [n, S, S]}`` of the
    first images; ``settings``: resolution, recipe, CRF and what was skipped."""

    cluster: list[dict] = field(default_factory=list)
    linear: list[dict] = field(default_factory=list)
    sources: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def cluster_table(self):
        """Mean and std over seeds per (dataset, backbone, estimator, criterion)."""
        import pandas as pd

        return cluster.seed_summary(pd.DataFrame(self.cluster), ["dataset", "backbone", "estimator", "criterion"])

    def linear_table(self):
        import pandas as pd

        return pd.DataFrame(self.linear)


def run_probes(
    specs: Sequence[str],
    data: dict[str, tuple[ProbeData, ProbeData]],
    facet: str = "norm_token",
    layers: Sequence[int] = (-1,),
    estimators: Sequence[str] = cluster.ESTIMATORS,
    criteria: Sequence[str] = ("count", "iou"),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    cluster_options: dict | None = None,
    recipe: str = "default",
    recipe_overrides: dict | None = None,
    crf: bool = False,
    crf_workers: int = 0,
    device="cpu",
    seed: int = 0,
    cache: bool = True,
    n_shown: int = 2,
    batch_size: int = 16,
    log=print,
) -> ProbeReport:
    """Cluster and linear probes of every backbone ``spec`` (:func:`~.cache.load_source`) on every dataset
    of ``data`` (from :func:`probe_datasets`). Features are cached (:func:`~.cache.grids`); clusters are fit
    on the eval features (Leopart's k-means; STEGO fits its probe on train features); the linear probe
    trains on the train split by ``recipe`` (:data:`~.linear.RECIPES`; its ``layers`` replace ``layers``
    when the recipe names them). ``crf``: refine both probes' predictions with STEGO's dense CRF when
    ``pydensecrf`` is importable (else skipped, and the report says so), in ``crf_workers`` processes."""
    r = linear.recipe(recipe, **(recipe_overrides or {}))
    use_layers = tuple(r.layers) if r.layers != linear.DEFAULT.layers else tuple(layers)
    use_crf = bool(crf) and crf_available()
    rep = ProbeReport()
    rep.settings = {
        "facet": facet,
        "layers": list(use_layers),
        "recipe": r.name,
        "recipe_diff": linear.recipe_diff(r),
        "crf": use_crf,
        "crf_note": "" if use_crf or not crf else "CRF asked for but pydensecrf is not installed: skipped",
        "estimators": list(estimators),
        "criteria": list(criteria),
        "seeds": list(seeds),
        "cluster_fit": "eval features",
    }
    for spec in specs:
        t0 = time.time()
        src = fcache.load_source(spec, facet, use_layers, device, seed)
        rep.sources[spec] = {
            "description": src.description,
            "patch": src.patch,
            "facet": src.facet,
            "layers": list(src.layers),
            "checkpoint": src.checkpoint,
        }
        for name, (train, val) in data.items():
            size = int(val.pixels.shape[-1])
            if size % src.patch:
                raise ValueError(f"{spec}: input {size} px is not a multiple of its patch {src.patch}")
            key = dict(val.key, n=len(val), size=size)
            fv = fcache.grids(src, val.images, key, batch_size, cache, log)
            ft = fcache.grids(src, train.images, dict(train.key, n=len(train), size=size), batch_size, cache, log)
            res = cluster.cluster_probe(
                fv.to(device),
                val.labels.to(device),
                val.n_classes,
                estimators,
                criteria,
                seeds,
                n_keep=n_shown,
                batch_size=batch_size,
                options=cluster_options,
                images=val.pixels if use_crf else None,
                crf_workers=crf_workers,
            )
            for row in res.rows:
                rep.cluster.append({"dataset": name, "backbone": spec, **row})
            for (est, crit), pred in res.predictions.items():
                rep.predictions[(name, spec, f"cluster {est}/{crit}")] = pred
            probe, losses = linear.train_linear(ft, train.labels, val.n_classes, r, seed, device)
            sc, _, pred = linear.evaluate_linear(
                probe,
                fv,
                val.labels,
                val.n_classes,
                batch_size,
                images=val.pixels if use_crf else None,
                n_keep=n_shown,
                crf_workers=crf_workers,
            )
            rep.linear.append(
                {
                    "dataset": name,
                    "backbone": spec,
                    "accuracy": sc.accuracy,
                    "miou": sc.miou,
                    "train_images": len(train),
                    "eval_images": len(val),
                    "steps": len(losses),
                    "final_loss": losses[-1] if losses else float("nan"),
                }
            )
            if pred is not None:
                rep.predictions[(name, spec, "linear")] = pred
            rep.settings.setdefault("resolution", {})[name] = size
            rep.settings.setdefault("grid", {})[(name, spec)] = tuple(fv.shape[1:3])
            del fv, ft
        log(f"{spec}: probes done in {time.time() - t0:.1f} s")
    return rep
