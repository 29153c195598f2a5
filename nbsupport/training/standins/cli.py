"""``python -m nbsupport standin train --recipe NAME``: train a supervised stand-in; the recipe's ``kind``
picks the trainer (``vit``: :mod:`.vit`, ``groupvit``: :mod:`.groupvit`)."""

from __future__ import annotations

import json
import shlex
import sys

from nbsupport.core.config import ConfigError, add_overrides_option, find_recipe, load_config, read_recipe
from nbsupport.training.standins.config import CONFIGS, RECIPE_DIR


def config_for(recipe, overrides=(), flags=None):
    """The configuration of ``recipe`` (a name in ``recipes/`` or a YAML path) with ``-o`` ``overrides`` and
    ``flags``: the dataclass named by the recipe's ``kind`` (default ``vit``), defaults < recipe < ``-o`` <
    flags."""
    kind = read_recipe(find_recipe(recipe, RECIPE_DIR)).get("kind", "vit")
    if kind not in CONFIGS:
        raise ConfigError(f"recipe {recipe}: kind must be one of {sorted(CONFIGS)}, got {kind!r}")
    return load_config(CONFIGS[kind], recipe, RECIPE_DIR, list(overrides), flags)


def run(cfg, command: str = "") -> dict:
    """Train ``cfg`` with the trainer of its kind; returns the trainer's summary."""
    if cfg.kind == "groupvit":
        from nbsupport.training.standins.groupvit import train
    else:
        from nbsupport.training.standins.vit import train
    return train(cfg, command=command)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("standin", help="supervised stand-ins trained with the synthetic world's labels")
    sub = p.add_subparsers(dest="standin_cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train a stand-in (recipes: tiny_vit_synth_supervised, tiny_groupvit_synth_supervised)",
        description="The recipe's fields, overridden by -o key=value (YAML values) and the options below.",
    )
    t.add_argument("--recipe", required=True, help="a name in nbsupport/training/standins/recipes or a YAML path")
    add_overrides_option(t)
    t.add_argument("--out", default=None, help="run folder (default: the recipe's out)")
    t.add_argument("--export", default=None, help="also write the weights to this .safetensors path")
    t.add_argument("--max-minutes", dest="max_minutes", type=float, default=None, help="wall-clock stop")

    def _train(a):
        flags = {k: getattr(a, k) for k in ("out", "export", "max_minutes") if getattr(a, k) is not None}
        try:
            cfg = config_for(a.recipe, a.overrides, flags)
        except (ConfigError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        command = "python -m nbsupport " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        r = run(cfg, command)
        print(json.dumps(r, default=str))
        return 0

    t.set_defaults(func=_train)
