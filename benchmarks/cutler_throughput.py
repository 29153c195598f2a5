"""CutLER training throughput: images/s of full training steps (copy-paste on, flip on, AMP on CUDA).

Synthetic scenes with 1-4 instances are held in memory as tensors on the device (so the number is the
step's, not the disk's); each step runs :func:`nbsupport.training.cutler.augment_batch` on the device, the
forward/backward of the class-agnostic Mask R-CNN with DropLoss, gradient clipping and an SGD step,
exactly as :func:`nbsupport.training.cutler.train` does. The reference reports ~7 images/s per V100 (CutLER,
detectron2, Cascade R50-FPN, 16 images/batch over 8 GPUs, multi-scale 240-1024 px).

In the same run (so load and threads are shared) it times plain torchvision: ``MaskRCNN`` on
``resnet_fpn_backbone`` of the same arch, the same sizes, RPN and sampling settings, two classes, no
copy-paste, no DropLoss, no FPN norm, torchvision's RoIAlign, and prints each head's throughput as a ratio
to it (goal: the plain head with copy-paste and DropLoss >= 0.9x; the cascade runs three box stages, so its
ratio is the price of the headline model, not overhead).

    python benchmarks/cutler_throughput.py                         # CPU: resnet50, 256 px, batch 2
    python benchmarks/cutler_throughput.py --device cuda --size 800 --batch 8 --steps 30
    python benchmarks/cutler_throughput.py --arch resnet18 --size 128 --threads 1   # small CPU check
    python benchmarks/cutler_throughput.py --heads mask_rcnn          # one head only
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def scenes(n: int, size: int, seed: int):
    from nbsupport.data.synthetic import render_scene
    from nbsupport.training import cutler as C

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = render_scene(rng, size=size, n_objects=(1, 4), overlap="allowed")
        img = torch.from_numpy(s.image).permute(2, 0, 1).float() / 255
        m = torch.from_numpy(s.instance_masks.astype(np.uint8))
        out.append((img, {"masks": m, "boxes": C.masks_to_boxes(m), "labels": torch.ones(len(m), dtype=torch.int64)}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet50", help="resnet50 | resnet50_v2 | resnet18 | resnet34")
    ap.add_argument("--size", type=int, default=256, help="short side (fixed; the reference samples 240-1024)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--no-copy-paste", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--heads", default="mask_rcnn,cascade", help="CutLER heads to time, comma-separated")
    ap.add_argument("--json", help="append the results as JSON lines to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from nbsupport.training import cutler as C

    dev = torch.device(args.device)
    amp = dev.type == "cuda" and not args.no_amp
    data = [
        (im.to(dev), {k: v.to(dev) for k, v in t.items()}) for im, t in scenes(max(8, args.batch * 2), args.size, 0)
    ]
    settings = dict(
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=4000 if args.size >= 480 else 1000,
        rpn_nms_thresh=0.65,
        box_batch_size_per_image=512,
    )
    base = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "amp": amp,
        "steps": args.steps,
    }
    torch.manual_seed(0)
    plain = time_steps(plain_torchvision(args.arch, args.size, settings).to(dev), data, args, amp, augment=False)
    print(json.dumps({**base, "model": "torchvision MaskRCNN (plain)", **plain}))
    results = []
    for head in args.heads.split(","):
        torch.manual_seed(0)
        model = C.build_model(
            args.arch,
            min_size=(args.size,),
            max_size=int(args.size * 1.667),
            min_size_test=args.size,
            head=head,
            **settings,
        ).to(dev)
        r = time_steps(model, data, args, amp, augment=True)
        res = {**base, "model": f"cutler {head}", "copy_paste": not args.no_copy_paste, **r}
        res["ratio_to_plain"] = r["images_per_s"] / plain["images_per_s"]
        if dev.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        print(json.dumps(res))
        results.append(res)
    print("\nimages/s ratio to plain torchvision Mask R-CNN (same images, size, batch, settings):")
    for r in results:
        print(
            f"  {r['model']:<20s} {r['images_per_s']:.3f} img/s vs {plain['images_per_s']:.3f}: {r['ratio_to_plain']:.2f}x"
        )
    if args.json:
        with open(args.json, "a") as f:
            for r in [{**base, "model": "torchvision", **plain}, *results]:
                f.write(json.dumps(r) + "\n")


def plain_torchvision(arch: str, size: int, settings: dict):
    """torchvision's own Mask R-CNN (no CutLER code), same backbone, sizes and RPN / sampling settings."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    name = "resnet50" if arch.startswith("resnet50") else arch
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=5)
    return MaskRCNN(
        backbone,
        num_classes=2,
        min_size=size,
        max_size=int(size * 1.667),
        rpn_pre_nms_top_n_train=settings["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=settings["rpn_post_nms_top_n_train"],
        rpn_nms_thresh=settings["rpn_nms_thresh"],
        box_batch_size_per_image=settings["box_batch_size_per_image"],
    )


def time_steps(model, data, args, amp: bool, augment: bool) -> dict:
    """Seconds per training step and images/s of ``model`` over ``data`` (``augment``: CutLER's flip and
    copy-paste on the device, as its trainer; else the batch as it is, as plain torchvision trains)."""
    from nbsupport.training import cutler as C

    dev = data[0][0].device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    gen = torch.Generator().manual_seed(0)

    def step(k):
        batch = [data[(k * args.batch + i) % len(data)] for i in range(args.batch)]
        images, targets = [b[0] for b in batch], [b[1] for b in batch]
        if augment:
            images, targets = C.augment_batch(images, targets, gen, flip=True, do_copy_paste=not args.no_copy_paste)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    for k in range(args.warmup):
        step(k)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(args.steps):
        step(args.warmup + k)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"s_per_step": dt / args.steps, "images_per_s": args.batch * args.steps / dt}


if __name__ == "__main__":
    main()
