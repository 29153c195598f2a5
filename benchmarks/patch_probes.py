"""How separable are the synthetic world's classes at patch level? Reference points for a backbone's class-AUC target.

The tiny DINO is judged on same- vs different-class patch-key similarity (ROC AUC, objects only; see
``backbone_quality.py``). This script measures what that AUC is for:

1. raw RGB patches (colour is random per instance, so about 0.5);
2. a hand-made colour-invariant texture descriptor: per-patch grayscale, standardised, |FFT|;
3. a noisy one-hot of the true label (a sanity check of the measure itself);
4. a *supervised* twin: the tiny DINO's architecture (ViT 4x128/8) trained with per-patch labels
   (7-way cross-entropy, random channel permutation) for ``--minutes`` on one thread, then its keys and
   tokens at every block, and its accuracy on object patches.

    python benchmarks/patch_probes.py --minutes 7 --size 64 --images 48
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis import grid_truth


def _val(size: int, n_images: int, patch: int = 8):
    """Validation images ``[B, 3, size, size]`` and their semantic ground truth on the ``patch`` grid."""
    from nbsupport.analysis.affinity_protocols import study_inputs
    from nbsupport.data.scenes import synthetic_coco

    coco = synthetic_coco(n_images=n_images, seed=0, size=size, split="val")
    imgs, truth = study_inputs(coco, coco.image_ids, size, patch)
    return imgs, truth.semantic


def _auc(feats, sem) -> float:
    from nbsupport.analysis import affinity

    intra, inter = affinity.patch_pairs(feats, sem, "cosine", 20000, 0)
    return affinity.separability(intra, inter)["auc"]


def descriptors(imgs: torch.Tensor, sem: np.ndarray, p: int = 8, seed: int = 0) -> dict:
    """AUC of raw RGB patches, of |FFT| of standardised grayscale patches, and of a noisy one-hot label."""
    from nbsupport.training.dino.quality import fft_texture

    patches = imgs.unfold(2, p, p).unfold(3, p, p)  # [B, 3, h, w, p, p]
    fft = fft_texture(imgs.mean(1), p)  # [B, h, w, p*p]
    rgb = patches.permute(0, 2, 3, 1, 4, 5).flatten(3)
    g = torch.Generator().manual_seed(seed)
    onehot = F.one_hot(torch.from_numpy(sem).clamp(min=0), 7).float()
    onehot = onehot + 0.5 * torch.randn(onehot.shape, generator=g)
    return {"raw RGB": _auc(rgb, sem), "|FFT| of grayscale": _auc(fft, sem), "noisy one-hot label": _auc(onehot, sem)}


def supervised_twin(minutes: float, size: int, seed: int = 0, batch: int = 32):
    """ViT 4x128/8 (the tiny DINO's architecture) trained on per-patch labels of synthetic train scenes."""
    from nbsupport.data.images import image_to_tensor
    from nbsupport.data.synthetic import render_scene, scene_rng
    from nbsupport.models import backbones

    torch.manual_seed(seed)
    arch = backbones.Arch(8, 128, 4, 4, img_size=size)
    model = backbones.build(arch)
    backbones._attach(model, "supervised_twin", arch, False, "ViT-4x128/8 trained with patch labels", "cpu")
    head = torch.nn.Linear(128, 7)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=5e-4, weight_decay=0.04)
    h = size // 8
    t0, step = time.time(), 0
    model.train()
    while time.time() - t0 < 60 * minutes:
        scenes = [render_scene(scene_rng(seed, "train", step * batch + k), size=size) for k in range(batch)]
        x = torch.stack([image_to_tensor(s.image) for s in scenes])
        y = torch.stack(
            [
                torch.from_numpy(grid_truth.labels_to_grid(s.semantic, size, (h, h), 8, ignore=None, min_fraction=0.0))
                for s in scenes
            ]
        )
        if step % 2:
            x, y = x.flip(-1), y.flip(-1)
        x = x[:, torch.randperm(3)]  # colour carries no class information
        loss = F.cross_entropy(head(model.forward_features(x)[:, 1:]).reshape(-1, 7), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    model.eval()
    return model, head, step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--minutes", type=float, default=7.0, help="training time of the supervised twin (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nbsupport.models import features

    imgs, sem = _val(args.size, args.images)
    h = args.size // 8
    for k, v in descriptors(imgs, sem).items():
        print(f"{k:<34} patch AUC {v:.3f}")
    if args.minutes > 0:
        model, head, steps = supervised_twin(args.minutes, args.size)
        with torch.no_grad():
            pred = head(model.forward_features(imgs)[:, 1:]).argmax(-1).reshape(-1, h, h).numpy()
            obj = sem > 0
            print(
                f"supervised twin: {steps} steps, object-patch accuracy {(pred[obj] == sem[obj]).mean():.3f} "
                f"(chance {1 / 6:.3f})"
            )
            for layer in range(len(model.blocks)):
                aucs = [_auc(features.extract(model, imgs, f, layer), sem) for f in ("key", "token")]
                print(f"  block {layer}: key AUC {aucs[0]:.3f}  token AUC {aucs[1]:.3f}")


if __name__ == "__main__":
    main()
