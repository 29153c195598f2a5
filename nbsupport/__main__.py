"""``python -m nbsupport <command>``: every module with a command line registers it here."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that may offer subcommands (each exposes ``add_cli(subparsers)``); missing ones are skipped.
CLI_MODULES = ("runner", "maskcut", "cutler", "groupvit", "dino", "grouptrain")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def cli_bool(text: str) -> bool:
    """``type=`` for boolean options (``--flag true`` / ``--flag off``); anything else is an error, so a typo
    such as ``--amp flase`` stops the command instead of silently meaning False."""
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean ({'/'.join(_TRUE)} or {'/'.join(_FALSE)}), got {text!r}")


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
        if hasattr(mod, "add_cli"):
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
