"""``python -m nbsupport groupvit-eval``: GroupViT's zero-shot mIoU on a benchmark in its official layout
(thesis 5.3 protocol by default), resumable image by image, split over ``torchrun`` ranks.

    python -m nbsupport groupvit-eval --model group_vit_gcc_yfcc_30e --dataset voc \\
        --root /data/VOCdevkit/VOC2012 --out runs/eval_voc
    torchrun --nproc_per_node 8 -m nbsupport groupvit-eval --model ... --dataset coco_object --root /data/coco

A killed run restarts where it stopped when run again with the same ``--out``.
``NBSUPPORT_GROUPVIT_EVAL_STOP_AFTER=k`` stops a process after ``k`` new images (a test hook simulating a
kill).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STOP_ENV = "NBSUPPORT_GROUPVIT_EVAL_STOP_AFTER"


def _int_or_none(text: str):
    t = str(text).strip().lower()
    if t in ("none", "null", "0", "off"):
        return None
    try:
        v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'none', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text!r}")
    return v


def _stop_hook():
    k = int(os.environ.get(STOP_ENV, "0") or 0)
    if k <= 0:
        return None
    seen = [0]

    def hook(rec):
        seen[0] += 1
        if seen[0] >= k:
            raise SystemExit(f"simulated crash after {seen[0]} images ({STOP_ENV}={k})")

    return hook


def default_out(model: str, dataset: str, split: str) -> Path:
    from nbsupport.core.paths import project_root

    stem = Path(str(model)).name.replace("/", "_").removesuffix(".pth").removesuffix(".safetensors")
    return project_root() / "runs" / "groupvit-eval" / f"{stem}_{dataset}_{split}"


def run_cli(args) -> int:
    from nbsupport.analysis import segmentation_eval as se
    from nbsupport.analysis.zero_shot_protocol import EvalSettings
    from nbsupport.core import distributed as dist
    from nbsupport.data.datasets import segmentation_dataset
    from nbsupport.data.datasets.base import DatasetLayoutError
    from nbsupport.models import groupvit as gv

    try:
        settings = EvalSettings(
            short_side=args.short_side,
            max_long=args.max_long,
            window=args.window,
            stride=args.stride,
            bg_thresh=args.bg_thresh,
            topk=args.topk,
            templates=tuple(args.template) if args.template else EvalSettings().templates,
        )
        ds = segmentation_dataset(args.dataset, args.root, args.split)
    except (ValueError, DatasetLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = dist.setup(args.device)
    try:
        try:
            model = gv.load(args.model, device=ctx.device, seed=args.seed)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"error: --model {args.model}: {e}", file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else default_out(args.model, args.dataset, ds.split)
        if ctx.is_main:
            print(f"groupvit-eval: {ds!r} -> {out} ({ctx.world} process(es), {ctx.device})", flush=True)
        try:
            res = se.evaluate_zero_shot(
                model,
                ds,
                out,
                settings,
                n_images=args.n_images,
                workers=args.workers,
                window_batch=args.window_batch,
                distributed=ctx.ddp,
                fresh=args.fresh,
                progress=not args.quiet,
                on_image=_stop_hook(),
            )
        except (se.ResumeMismatch, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if ctx.is_main:
            print(se.format_report(res))
            print(f"wrote {out / 'results.json'} and {out / 'per_class_iou.csv'}")
        return 0
    finally:
        dist.cleanup()


def add_cli(subparsers) -> None:
    from nbsupport.analysis.zero_shot_protocol import PROTOCOL_DEFAULTS as D

    p = subparsers.add_parser(
        "groupvit-eval",
        help="GroupViT zero-shot mIoU on voc / context / coco_object / ade20k (thesis 5.3), resumable",
        description="GroupViT zero-shot semantic segmentation on a dataset in its official layout, with the "
        "thesis protocol by default (short side 448, sliding window 448/224, the dataset's background "
        "threshold from GroupViT's configs, 'a photo of a {}.'), scored at the ground truth's full resolution "
        "from one dataset-wide confusion matrix. Writes OUT/results.json, OUT/per_class_iou.csv and the "
        "per-image records OUT/parts/*.jsonl (a rerun with the same --out resumes). Under torchrun the images "
        "are split over the ranks.",
    )
    p.add_argument("--model", required=True, help="GroupViT name (group_vit_gcc_yfcc_30e, ...) or checkpoint path")
    p.add_argument("--dataset", required=True, help="voc, context, coco_object, ade20k (or any segmentation dataset)")
    p.add_argument("--root", required=True, help="the dataset's root folder in its official layout")
    p.add_argument("--split", default=None, help="split (default: the dataset's evaluation split, val)")
    p.add_argument("--out", default=None, help="output folder (default runs/groupvit-eval/<model>_<dataset>_<split>)")
    p.add_argument("--n-images", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--bg-thresh", type=float, default=None, help="background threshold (default: the dataset's)")
    p.add_argument("--short-side", type=_int_or_none, default=D.short_side, help="short side in px ('none': as is)")
    p.add_argument("--max-long", type=_int_or_none, default=D.max_long, help="cap of the long side (mmcv 2048)")
    p.add_argument("--window", type=_int_or_none, default=D.window, help="sliding window ('none': whole image)")
    p.add_argument("--stride", type=int, default=D.stride, help="sliding-window stride")
    p.add_argument("--topk", type=int, default=D.topk, help="image-level classes kept (Eq 31)")
    p.add_argument(
        "--template", action="append", help="prompt template with {} (repeatable; default 'a photo of a {}.')"
    )
    p.add_argument("--workers", type=int, default=2, help="image-loading worker processes")
    p.add_argument("--window-batch", type=int, default=4, help="sliding-window crops per forward pass (speed only)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init model (random:<config>)")
    p.add_argument("--fresh", action="store_true", help="discard earlier per-image results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nbsupport")
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
