"""Does a GroupViT group and recognise the synthetic world's objects? Diagnoses for the tiny offline model.

For each model (a ``groupvit.load`` name, a ``.safetensors`` file, or a ``groupvit-train`` ``last.pt``) on the
first ``--images`` synthetic validation scenes at ``--size`` px:

- image-level recall: of the object classes present, how many are among the top-|present| classes of the
  image embedding (chance ~0.32 for 1-3 of 6 classes);
- grouping: final groups that own at least one pixel per image, the mean share of the largest group, and for
  each object the best IoU of one group's pixels with it (a group per object would give ~1);
- the zero-shot mIoU of ``nbsupport.analysis.zero_shot.zero_shot_miou`` (background names as extra classes) with
  per-class IoU.

    python benchmarks/groupvit_grouping.py runs/tiny_groupvit_synth/last.pt small --size 64 --images 64
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from nbsupport.analysis import zero_shot
from nbsupport.data.segmentation import SegmentationSet, segmentation_set


def load(name: str):
    from nbsupport.models import groupvit as gv

    if name.endswith(".pt"):  # a groupvit-train checkpoint (tensors only)
        from nbsupport.training.common import load_checkpoint

        state = load_checkpoint(name)
        arch = json.loads(state.get("config") or "{}").get("model", "small").removeprefix("random:")
        model = gv.build(arch if arch in gv.CONFIGS else "small")  # else (a file path): assumed "small"
        model.load_state_dict(state["model"])
        return model.eval()
    return gv.load(name).eval()


@torch.no_grad()
def diagnose(model, data: SegmentationSet) -> dict:
    from nbsupport.data import caption_labels as textmod
    from nbsupport.models import groupvit as gv

    images, semantic = data.images, data.semantic
    names, bgs = data.class_names, data.background_names
    te = gv.text_embeddings(model, list(names) + list(bgs), textmod.TEMPLATES)
    out = model.encode_image(images)
    size = tuple(images.shape[-2:])
    score = out.image_embeds @ te[: len(names)].T  # [n, C]
    hit = tot = 0
    used, largest, best_iou = [], [], []
    for i in range(len(images)):
        present = {int(c) for c in semantic[i].unique() if c > 0}
        top = set((score[i].topk(len(present)).indices + 1).tolist()) if present else set()
        hit, tot = hit + len(present & top), tot + len(present)
        g = gv.resize_attn(out.attn[i], out.grid, size).argmax(0)  # [H, W] group per pixel
        share = torch.bincount(g.flatten(), minlength=out.attn.shape[1]).float() / g.numel()
        used.append(int((share > 0).sum()))
        largest.append(float(share.max()))
        for c in present:
            obj = semantic[i] == c
            best_iou.append(
                max(float((g == k)[obj].sum()) / float(((g == k) | obj).sum()) for k in range(out.attn.shape[1]))
            )
    r = zero_shot.zero_shot_miou(model, images, semantic, names, bgs)
    return {
        "image_recall": hit / max(tot, 1),
        "groups_used": float(np.mean(used)),
        "largest_group_share": float(np.mean(largest)),
        "best_group_iou": float(np.mean(best_iou)),
        "miou": r["miou"],
        "iou": [round(x, 1) for x in r["iou"]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = segmentation_set(None, a.images, a.size, seed=0, split="val")
    for name in a.models:
        r = diagnose(load(name), data)
        print(json.dumps({"model": name, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
