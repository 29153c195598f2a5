"""``python -m nbsupport groupvit-train``."""

from __future__ import annotations

import json
import logging

from nbsupport.core import distributed
from nbsupport.core.config import add_config_options
from nbsupport.core.config import config_from_args as _config_from_args
from nbsupport.training.groupvit.config import RECIPE_DIR, TrainConfig
from nbsupport.training.groupvit.loop import beats_floors, export_safetensors, train

# ============================================================================================== CLI
#: Recipes whose result is a shipped file: ``--recipe NAME`` also exports there (if it beats the floors).
RECIPE_EXPORTS = {"tiny_groupvit_synth": "data/weights/tiny_groupvit_synth.safetensors"}


def add_cli(subparsers):
    """Registers ``python -m nbsupport groupvit-train`` (every :class:`TrainConfig` field is an option)."""
    p = subparsers.add_parser(
        "groupvit-train", help="train / fine-tune GroupViT (thesis 5.5-5.10)", description=__doc__.split("\n\n")[0]
    )
    add_config_options(
        p,
        TrainConfig,
        recipe_help="start from a recipe: a name in nbsupport/training/groupvit/recipes (tiny_groupvit_synth) "
        "or a YAML path; -o and explicit options override it",
    )
    p.add_argument("--export", default="", help="also copy the final weights to this .safetensors path")
    p.set_defaults(func=_run_cli)


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``groupvit-train`` options: defaults < ``--recipe`` < ``-o`` < explicit
    options; a recipe of :data:`RECIPE_EXPORTS` also sets ``--export`` to its shipped file."""
    cfg = _config_from_args(TrainConfig, args, RECIPE_DIR)
    if args.recipe and not args.export and args.recipe in RECIPE_EXPORTS:
        from nbsupport.core import paths

        args.export = str(paths.project_root() / RECIPE_EXPORTS[args.recipe])
    return cfg


def _run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = config_from_args(args)
    try:
        res = train(
            cfg,
            progress=lambda r: print(
                json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "iou"}),
                flush=True,
            ),
        )
        if args.export and distributed.setup(cfg.device).is_main:
            ok, why = True, ""
            if args.recipe in RECIPE_EXPORTS:  # shipped weights must beat the floors clearly
                ok, why = beats_floors(res["model"], cfg)
            if ok:
                export_safetensors(res["model"], args.export, f"groupvit-train {cfg.model} {cfg.data}")
                print("exported", args.export, why)
            else:
                print(f"not exported to {args.export}: {why}; the weights are in {res['out_dir']}/final.safetensors")
    finally:
        distributed.cleanup()
    return 0
