"""``python -m nbsupport dino train|export``."""

from __future__ import annotations

import json

from nbsupport.core import distributed
from nbsupport.core.config import add_config_options, config_from_args
from nbsupport.training.dino.config import RECIPE_DIR, Config
from nbsupport.training.dino.crops import CropBatches
from nbsupport.training.dino.loop import export_teacher, train
from nbsupport.training.dino.losses import CENTERINGS


def config_from_cli(args) -> Config:
    """The :class:`Config` of parsed ``dino train`` options: defaults < ``--recipe`` < ``-o`` < flags."""
    return config_from_args(Config, args, RECIPE_DIR)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("dino", help="DINO self-distillation: train a ViT, export its teacher")
    sub = p.add_subparsers(dest="dino_cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train (resumes from OUT/checkpoint.pth when present)",
        description="Every Config field is an option; --recipe NAME|PATH and -o key=value set several at once "
        "(explicit options win over -o, -o over the recipe).",
    )
    add_config_options(
        t,
        Config,
        recipe_help="recipe: a name in nbsupport/training/dino/recipes (tiny_dino_synth) or a YAML path",
        choices={"appearance": CropBatches.APPEARANCES, "centering": CENTERINGS},
    )
    t.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")

    def _train(a):
        try:
            last = train(config_from_cli(a), resume=not a.no_resume)
        finally:
            distributed.cleanup()
        print(json.dumps(last))
        return 0

    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write the teacher backbone as .safetensors")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--description", default="tiny DINO (synthetic world)")
    e.set_defaults(func=lambda a: (print(export_teacher(a.checkpoint, a.out, a.description)), 0)[1])
