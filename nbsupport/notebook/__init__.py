"""Notebook support, the top room: the papermill runner behind ``make demo`` / ``make test`` with its
profiles (``profiles.yaml``: smoke, demo, paper) and the plotting helpers that save every figure as PNG
and PDF into the run folder.

Import the modules directly (``from nbsupport.notebook import viz``); this file imports nothing.
"""

__all__ = ["runner", "viz"]
