"""``python -m nbsupport cutler train|selftrain|predict|eval``."""

from __future__ import annotations

import json
from pathlib import Path

from nbsupport.core import distributed
from nbsupport.core.config import add_config_options, config_from_args
from nbsupport.core.io import atomic_write_json
from nbsupport.training.cutler.config import RECIPE_DIR, CutlerConfig
from nbsupport.training.cutler.data import PseudoMaskDataset
from nbsupport.training.cutler.experiments import evaluate_splits, selftrain_round
from nbsupport.training.cutler.loop import train
from nbsupport.training.cutler.predict import predict
from nbsupport.training.cutler.release import RELEASES, load_detector

# --------------------------------------------------------------------------------------------------
# CLI: python -m nbsupport cutler train|selftrain|predict|eval


def config_from_cli(args) -> CutlerConfig:
    """The :class:`CutlerConfig` of parsed options: defaults < ``--config`` recipe < ``-o`` < explicit flags."""
    return config_from_args(CutlerConfig, args, RECIPE_DIR)


def _cmd_train(a) -> int:
    try:
        s = train(config_from_cli(a), a.out, resume=a.resume, init=a.init, progress=not a.no_progress)
    finally:
        distributed.cleanup()
    print(json.dumps(s))
    return 0


def _cmd_selftrain(a) -> int:
    cfg = config_from_cli(a)
    if not cfg.train_json:
        raise SystemExit("selftrain needs --train-json: the previous round's pseudo-labels (round 1: MaskCut's)")
    if not a.init:
        raise SystemExit("selftrain needs --init: the detector of the previous round")
    try:
        s = selftrain_round(cfg, cfg.train_json, cfg.image_root, a.init, a.out, a.round, a.resume, not a.no_progress)
    finally:
        distributed.cleanup()
    print(json.dumps(s))
    return 0


def _cmd_predict(a) -> int:
    device = distributed.resolve_device(a.device or "auto")
    overrides = {k: v for k, v in (("min_size_test", a.test_size), ("max_size", a.max_size)) if v is not None}
    model = load_detector(a.checkpoint, device, a.input_format, **overrides)
    ds = PseudoMaskDataset(a.json, a.image_root, train=False)
    preds = predict(model, ds, device, detections=a.detections, progress=True)
    atomic_write_json(a.out, preds)
    print(f"{model.nbs_info['description']}: {len(preds)} detections on {len(ds)} images -> {a.out}")
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
        add_config_options(
            q,
            CutlerConfig,
            recipe_option="--config",
            recipe_default="paper",
            recipe_help="recipe: smoke | paper (nbsupport/training/cutler/recipes) or a YAML path",
        )
        q.add_argument("--out", required=True, help="output folder (config.yaml, checkpoints, metrics.jsonl)")
        q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pth")
        q.add_argument("--init", help="detector checkpoint to start from")
        q.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train on pseudo-masks (torchrun for multi-GPU)")
    common(t)
    t.set_defaults(func=_cmd_train)
    s = sub.add_parser("selftrain", help="one self-training round: predict, relabel, retrain (DropLoss off)")
    common(s)
    s.add_argument("--round", type=int, default=1, help="1 (score >= 0.7) or 2 (>= 0.65)")
    s.set_defaults(func=_cmd_selftrain)
    q = sub.add_parser("predict", help="COCO results JSON of a trained or released detector")
    q.add_argument(
        "--checkpoint",
        required=True,
        help="a run's model_final.pth, a released CutLER file (cutler_cascade_final.pth, cutler_mrcnn_final.pth: "
        f"detectron2 layout, converted) or a release name looked up in $NBSUPPORT_CACHE/cutler ({', '.join(RELEASES)})",
    )
    q.add_argument("--json", required=True, help="COCO JSON listing the images")
    q.add_argument("--image-root")
    q.add_argument("--out", required=True)
    q.add_argument("--detections", type=int, default=100)
    q.add_argument("--test-size", type=int, help="short side at test time (default: the checkpoint's; releases 800)")
    q.add_argument("--max-size", type=int, help="longest side at test time (default: the checkpoint's; releases 1333)")
    q.add_argument(
        "--input-format",
        default="RGB",
        choices=["RGB", "BGR"],
        help="channel order a detectron2 file was trained on (CutLER's: RGB; detectron2's default: BGR)",
    )
    q.add_argument("--device", help="cpu | cuda | auto (default)")
    q.set_defaults(func=_cmd_predict)
    e = sub.add_parser("eval", help="class-agnostic box/segm AP, AP50 on all / without / only overlapping")
    e.add_argument("--gt", required=True)
    e.add_argument("--pred", required=True)
    e.add_argument("--overlap-by", default="box", choices=["box", "mask"])
    e.add_argument("--out", help="CSV of the table")
    e.set_defaults(func=_cmd_eval)
