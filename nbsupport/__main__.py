"""``python -m nbsupport <command>``: the command line of every room, in one parser.

Each module in :data:`CLI_MODULES` exposes ``add_cli(subparsers)``; nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that offer subcommands; a missing optional one is skipped.
CLI_MODULES = (
    "notebook.runner",
    "notebook.fixtures",
    "analysis.segmentation_eval_cli",
    "maskcut.cli",
    "training.cutler.cli",
    "training.dino.cli",
    "training.groupvit.cli",
    "training.groupvit.sweep_cli",
    "training.standins.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbsupport", description="nbsupport command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CLI_MODULES:
        try:
            mod = importlib.import_module(f"nbsupport.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"nbsupport.{name}":
                continue
            raise
        mod.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
