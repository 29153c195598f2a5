"""Where things live: the project root, shipped data, generated data, run folders, the weight cache."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository root: ``$NBSUPPORT_ROOT``, else the nearest parent of the cwd holding
    ``pyproject.toml`` and ``nbsupport/``, else the parent of this package (editable installs)."""
    env = os.environ.get("NBSUPPORT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "nbsupport").is_dir():
            return d
    pkg_parent = Path(__file__).resolve().parents[2]
    if (pkg_parent / "pyproject.toml").is_file():
        return pkg_parent
    return here


def data_dir() -> Path:
    """Shipped data (sample images, small weights): ``<root>/data``."""
    return project_root() / "data"


def generated_dir() -> Path:
    """Data the project generates (synthetic world); git-ignored: ``<root>/data/generated``."""
    p = Path(os.environ.get("NBSUPPORT_GENERATED", project_root() / "data" / "generated"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    """Download cache for official weights: ``$NBSUPPORT_CACHE``, else ``$XDG_CACHE_HOME/nbsupport``
    (``~/.cache/nbsupport``)."""
    env = os.environ.get("NBSUPPORT_CACHE")
    if env:
        p = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        p = (Path(xdg) if xdg else Path.home() / ".cache") / "nbsupport"
    p.mkdir(parents=True, exist_ok=True)
    return p


def run_dir() -> Path:
    """The current run folder: ``$NBSUPPORT_RUN_DIR`` (set by the runner), else ``<root>/runs/interactive``."""
    env = os.environ.get("NBSUPPORT_RUN_DIR")
    p = Path(env) if env else project_root() / "runs" / "interactive"
    p.mkdir(parents=True, exist_ok=True)
    return p
