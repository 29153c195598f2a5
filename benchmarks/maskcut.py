"""MaskCut speed: our solver vs the dense reference on 60x60 grids, and full-pipeline images/s.

Part 1 runs ``maskcut`` (3 masks) on planted 60 x 60 feature grids (N = 3600 nodes; D = 384 and 768:
three objects as clustered vectors plus noise, so the masks are meaningful) with the default solver
and with the reference ``scipy.linalg.eigh(D - A, D)``; both share the affinity code, so the ratio is
the solver's. Mask agreement is the IoU of each mask pair. Part 2 times backbone (keys of the last
block at 480 px) + MaskCut on synthetic validation scenes (``synthetic_coco``), on CPU and on CUDA when present.

    python benchmarks/maskcut.py [--images 3] [--backbone random_vits8] [--pipeline-images 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def planted(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(4, d, generator=g)
    lab = torch.zeros(60, 60, dtype=torch.long)
    lab[5:25, 5:30] = 1
    lab[35:55, 10:25] = 2
    lab[30:50, 35:58] = 3
    return cent[lab] + 1.2 * torch.randn(60, 60, d, generator=g)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3, help="planted grids per feature size")
    ap.add_argument("--backbone", default="random_vits8")
    ap.add_argument("--pipeline-images", type=int, default=4)
    ap.add_argument("--size", type=int, default=480)
    args = ap.parse_args()
    import nbsupport.maskcut as mc
    from nbsupport.data.images import image_to_tensor
    from nbsupport.data.scenes import synthetic_coco
    from nbsupport.models import backbones, features

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'D':>5} {'ours s/img':>11} {'dense s/img':>12} {'ratio':>6} {'masks IoU>=0.99':>16} {'fallbacks':>9}")
    for d in (384, 768):
        ours, ref, agree, total = [], [], 0, 0
        stats = mc.SolverStats()  # the default solver's solves only: its dense fallbacks are counted
        for s in range(args.images):
            f = planted(d, s)
            t = time.perf_counter()
            a = mc.maskcut(f, 3, solver="lobpcg", stats=stats)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = mc.maskcut(f, 3, solver="dense")
            ref.append(time.perf_counter() - t)
            for k in range(3):
                u = (a[k] | b[k]).sum().item()
                agree += u == 0 or (a[k] & b[k]).sum().item() / u >= 0.99
                total += 1
        print(
            f"{d:>5} {np.mean(ours):>11.3f} {np.mean(ref):>12.3f} {np.mean(ref) / np.mean(ours):>6.1f} "
            f"{agree:>8}/{total:<7} {stats.fallbacks:>9}"
        )

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        model = backbones.load(args.backbone, device=dev)
        coco = synthetic_coco(n_images=args.pipeline_images, size=args.size)
        imgs = torch.stack([image_to_tensor(coco.load(i), args.size) for i in coco.image_ids]).to(dev)
        features.extract(model, imgs[:1], "key", -1)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        feats = torch.cat([features.extract(model, imgs[i : i + 8], "key", -1) for i in range(0, len(imgs), 8)])
        if dev == "cuda":
            torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        mc.maskcut(feats, 3, tau="median")
        t_mc = time.perf_counter() - t
        n = len(imgs)
        print(
            f"pipeline {dev}: {backbones.describe(model)} at {args.size} px, {n} images: forward "
            f"{t_fwd / n:.3f} s/img, maskcut {t_mc / n:.3f} s/img, total {n / (t_fwd + t_mc):.2f} images/s"
        )


if __name__ == "__main__":
    main()
