"""``python -m nbsupport dino train|export``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from nbsupport.training.dino.config import Config
from nbsupport.training.dino.crops import CropBatches
from nbsupport.training.dino.loop import export_teacher, train
from nbsupport.training.dino.losses import CENTERINGS


def add_cli(subparsers) -> None:
    from nbsupport.core.cli import cli_bool

    p = subparsers.add_parser("dino", help="DINO self-distillation: train a ViT, export its teacher")
    sub = p.add_subparsers(dest="dino_cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train (resumes from OUT/checkpoint.pth when present)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f, v in asdict(Config()).items():
        typ = cli_bool if isinstance(v, bool) else type(v)
        choices = {"appearance": CropBatches.APPEARANCES, "centering": CENTERINGS}.get(f)
        t.add_argument(f"--{f.replace('_', '-')}", type=typ, default=v, choices=choices)
    t.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    t.add_argument("--max-steps", type=int, default=None, help="stop early (schedules still span --steps)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this wall-clock time")

    def _train(a):
        cfg = Config(**{f: getattr(a, f) for f in asdict(Config())})
        last = train(cfg, resume=not a.no_resume, max_steps=a.max_steps, max_minutes=a.max_minutes)
        print(json.dumps(last))
        return 0

    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write the teacher backbone as .safetensors")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--description", default="tiny DINO (synthetic world)")
    e.set_defaults(func=lambda a: (print(export_teacher(a.checkpoint, a.out, a.description)), 0)[1])
