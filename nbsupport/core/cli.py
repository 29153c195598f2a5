"""Command-line helpers shared by every ``python -m nbsupport`` command."""

from __future__ import annotations

import argparse

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
