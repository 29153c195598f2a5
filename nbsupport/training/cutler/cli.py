"""``python -m nbsupport cutler train|selftrain|predict|eval``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from nbsupport.training.cutler.config import SELFTRAIN_TRAIN_KEYS, load_config
from nbsupport.training.cutler.data import PseudoMaskDataset
from nbsupport.training.cutler.experiments import evaluate_splits, selftrain_annotations
from nbsupport.training.cutler.loop import _dist_setup, load_trained, train
from nbsupport.training.cutler.predict import predict

# --------------------------------------------------------------------------------------------------
# CLI: python -m nbsupport cutler train|selftrain|predict|eval


def _overrides(items) -> dict:
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"-o expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _cfg_from_args(a) -> dict:
    over = _overrides(a.set)
    for k in ("train_json", "image_root", "weights", "device"):
        if getattr(a, k, None) is not None:
            over[k] = getattr(a, k)
    return load_config(a.config, over)


def _cmd_train(a) -> int:
    cfg = _cfg_from_args(a)
    s = train(cfg, a.out, resume=a.resume, init=a.init, progress=not a.no_progress)
    print(json.dumps(s))
    return 0


def _cmd_selftrain(a) -> int:
    cfg = _cfg_from_args(a)
    st = cfg["selftrain"]
    r = int(a.round)
    thr = st["score_thresh"][min(r, len(st["score_thresh"])) - 1]
    rank, world, _, device = _dist_setup(cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    next_json = out / f"pseudo_round{r}.json"
    # rank 0 relabels (once: idempotent on resume, written atomically); the other ranks wait for the file
    if rank == 0 and not next_json.is_file():
        model = load_trained(a.init, device=device)
        ds = PseudoMaskDataset(cfg["train_json"], cfg.get("image_root"), train=False)
        preds = predict(model, ds, device, detections=st["detections"], progress=not a.no_progress)
        nxt = selftrain_annotations(ds.data, preds, thr, st["keep_iou"])
        tmp = next_json.with_name(next_json.name + ".tmp")
        tmp.write_text(json.dumps(nxt))
        os.replace(tmp, next_json)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    cfg2 = dict(
        cfg,
        **{k: st[k] for k in SELFTRAIN_TRAIN_KEYS if k in st},
        train_json=str(next_json),
        image_root=cfg.get("image_root") or str(Path(cfg["train_json"]).parent / "images"),
    )
    s = train(cfg2, out / "train", resume=a.resume, init=a.init, progress=not a.no_progress)
    print(json.dumps({**s, "pseudo_labels": str(next_json), "score_thresh": thr}))
    return 0


def _cmd_predict(a) -> int:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained(a.checkpoint, device=device)
    ds = PseudoMaskDataset(a.json, a.image_root, train=False)
    preds = predict(model, ds, device, detections=a.detections, progress=True)
    Path(a.out).write_text(json.dumps(preds))
    print(f"{len(preds)} detections on {len(ds)} images -> {a.out}")
    return 0


def _cmd_eval(a) -> int:
    dets = json.loads(Path(a.pred).read_text())
    table = evaluate_splits(a.gt, dets, a.overlap_by)
    print(table.round(2).to_string(index=False))
    if a.out:
        table.to_csv(a.out, index=False)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("cutler", help="CutLER detector on MaskCut pseudo-masks (train/selftrain/predict/eval)")
    sub = p.add_subparsers(dest="cutler_command", metavar="ACTION", required=True)

    def common(q):
        q.add_argument("--config", default="paper", help="recipe (smoke|paper|...) or YAML path")
        q.add_argument("--train-json", dest="train_json", help="MaskCut / pseudo-label COCO JSON")
        q.add_argument("--image-root", dest="image_root", help="image folder (default: images/ beside the JSON)")
        q.add_argument("--weights", help="ResNet backbone weights (e.g. DINO ResNet-50); default random init")
        q.add_argument("--device", help="cpu | cuda | auto")
        q.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl)")
        q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pth")
        q.add_argument("--init", help="detector checkpoint to start from")
        q.add_argument("-o", "--set", action="append", metavar="KEY=VALUE", help="config override (YAML value)")
        q.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train on pseudo-masks (torchrun for multi-GPU)")
    common(t)
    t.set_defaults(func=_cmd_train)
    s = sub.add_parser("selftrain", help="one self-training round: predict, relabel, retrain (DropLoss off)")
    common(s)
    s.add_argument("--round", type=int, default=1, help="1 (score >= 0.7) or 2 (>= 0.65)")
    s.set_defaults(func=_cmd_selftrain)
    q = sub.add_parser("predict", help="COCO results JSON of a trained detector")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--json", required=True, help="COCO JSON listing the images")
    q.add_argument("--image-root")
    q.add_argument("--out", required=True)
    q.add_argument("--detections", type=int, default=100)
    q.add_argument("--device")
    q.set_defaults(func=_cmd_predict)
    e = sub.add_parser("eval", help="class-agnostic box/segm AP, AP50 on all / without / only overlapping")
    e.add_argument("--gt", required=True)
    e.add_argument("--pred", required=True)
    e.add_argument("--overlap-by", default="box", choices=["box", "mask"])
    e.add_argument("--out", help="CSV of the table")
    e.set_defaults(func=_cmd_eval)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbsupport.cutler_engine")
    sub = ap.add_subparsers(dest="command")
    add_cli(sub)
    a = ap.parse_args(["cutler", *(argv if argv is not None else sys.argv[1:])])
    return int(a.func(a) or 0)
