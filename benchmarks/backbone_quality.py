"""How much has a backbone learned? Issue 8's three measures on the synthetic validation split.

For each backbone (names or checkpoint paths) and its seeded random-init twin:
1. same- vs different-class patch-key similarity (last block keys, objects only): ROC AUC and overlap;
2. MaskCut (3 masks, tau given) class-agnostic mask AP / AP50 against the ground truth;
3. best-buddies precision: fraction of salient best-buddy pairs between two scenes sharing a class
   that land on the same class.

A last row gives MaskCut's ceiling at that size: the AP when the "keys" are the ground-truth class of
each patch (one-hot, plus 0.1 seeded noise so the cut is well posed). At 64 px (an 8 x 8 grid for /8
models, objects 2-4 patches wide) it is only about 24 AP50, so a +10 AP50 gain there asks for nearly
perfect features; at 128 px (16 x 16) it is about 68. Measure at 128 px (``--size 128``).

    python benchmarks/backbone_quality.py tiny_dino_synth [path.safetensors ...] --size 64 --images 48
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def evaluate(model, size: int, n_images: int, tau, seed: int = 0) -> dict:
    from nbsupport import affinity, correspondences as cc, features, maskcut as mc, metrics
    from nbsupport.data import CocoInstances, image_to_tensor
    from nbsupport.data.synthetic import synthetic_dataset

    root = synthetic_dataset(n_images=n_images, seed=seed, size=size, split="val")
    coco = CocoInstances(root / "instances_val.json")
    ids = coco.image_ids
    imgs = torch.stack([image_to_tensor(coco.load(i), size) for i in ids])
    p = model.nbs_info["patch_size"]
    keys = torch.cat([features.extract(model, imgs[i:i + 16], "key", -1) for i in range(0, len(imgs), 16)])
    grid = keys.shape[1:3]
    sem = np.stack([affinity.labels_on_grid(coco.semantic_mask(i), grid) for i in ids])
    intra, inter = affinity.patch_pairs(keys, sem, "cosine", 20000, seed)
    sep = affinity.separability(intra, inter)
    pm = mc.maskcut(keys, 3, tau)
    dets = []
    for image_id, m in zip(ids, pm):
        dets += mc.coco_annotations(mc.pixel_masks(m.numpy(), (size, size), (size, size)), image_id)
    ap = metrics.coco_ap(coco.coco.dataset, dets)
    # best buddies between consecutive scenes that share a class
    precs = []
    for a, b in zip(ids[:-1], ids[1:]):
        if not set(coco.category_ids(a)) & set(coco.category_ids(b)):
            continue
        da = cc.descriptors(model, imgs[a - 1], -1, "key", False, p)
        db = cc.descriptors(model, imgs[b - 1], -1, "key", False, p)
        res = cc.match(da, db, (size, size), (size, size), size, p, p, n_pairs=0, thresh=0.05)
        pa, pb = cc.all_salient_points(res, p, p, size, (size, size), (size, size))
        if len(pa):
            precs.append(cc.pair_precision(pa, pb, coco.semantic_mask(a), coco.semantic_mask(b)))
    return {"patch AUC": sep["auc"], "overlap": sep["overlap"], "mask AP": ap["AP"], "mask AP50": ap["AP50"],
            "BB precision": float(np.mean(precs)) if precs else float("nan")}


def oracle(size: int, n_images: int, tau, seed: int = 0, patch: int = 8, noise: float = 0.1) -> dict:
    """MaskCut mask AP / AP50 on ground-truth features: one-hot semantic class per ``patch`` cell (background
    its own class) plus ``noise`` x N(0, 1), seeded. An upper bound of what any backbone's keys can give."""
    from nbsupport import affinity, maskcut as mc, metrics
    from nbsupport.data import CocoInstances
    from nbsupport.data.synthetic import CLASSES, synthetic_dataset

    root = synthetic_dataset(n_images=n_images, seed=seed, size=size, split="val")
    coco = CocoInstances(root / "instances_val.json")
    g = size // patch
    sem = np.stack([affinity.labels_on_grid(coco.semantic_mask(i), (g, g), min_fraction=0.0) for i in coco.image_ids])
    feats = np.eye(len(CLASSES) + 1)[sem] + noise * np.random.default_rng(seed).standard_normal(sem.shape + (len(CLASSES) + 1,))
    pm = mc.maskcut(torch.tensor(feats, dtype=torch.float32), 3, tau)
    dets = []
    for image_id, m in zip(coco.image_ids, pm):
        dets += mc.coco_annotations(mc.pixel_masks(m.numpy(), (size, size), (size, size)), image_id)
    ap = metrics.coco_ap(coco.coco.dataset, dets)
    return {"mask AP": ap["AP"], "mask AP50": ap["AP50"]}


def main():
    from nbsupport import backbones

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbones", nargs="+")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--tau", default="median", help="MaskCut tau: a number or 'median'")
    args = ap.parse_args()
    tau = args.tau if args.tau == "median" else float(args.tau)
    print(f"{'backbone':<44} {'patch AUC':>9} {'overlap':>8} {'mask AP':>8} {'AP50':>6} {'BB prec':>8}")
    for name in args.backbones:
        model = backbones.load(name)
        for m in (model, backbones.random_like(model)):
            r = evaluate(m, args.size, args.images, tau)
            print(f"{backbones.describe(m)[:44]:<44} {r['patch AUC']:>9.3f} {r['overlap']:>8.3f} {r['mask AP']:>8.1f} "
                  f"{r['mask AP50']:>6.1f} {r['BB precision']:>8.3f}")
    r = oracle(args.size, args.images, tau)
    print(f"{'ceiling: ground-truth class one-hot keys':<44} {'':>9} {'':>8} {r['mask AP']:>8.1f} {r['mask AP50']:>6.1f}")


if __name__ == "__main__":
    main()
