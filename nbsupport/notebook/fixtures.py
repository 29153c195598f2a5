"""The offline real path: every dataset in its official layout and every official checkpoint, tiny or random.

``python -m nbsupport fixtures OUT`` (and the ``fixture`` profile, which builds them into
``data/generated/fixtures``) writes, under ``OUT``:

- the datasets, each by its own ``write_fixture`` (the module that reads a layout also writes it):
  ``VOCdevkit/VOC2012`` (voc, voc_aug), ``VOCdevkit/VOC2010`` (context, context59), ``coco`` (val2017,
  train2017, instances and captions JSONs), ``ADEChallengeData2016``, ``cocostuff``, ``cityscapes``,
  ``potsdam``, ``DAVIS``, ``imagenet`` (train folders and CutLER's pseudo-label file);
- ``cache/``: official-layout checkpoints with seeded random weights for the DINO, DINOv2 and GroupViT releases,
  marked as fixtures (models loaded from them say "random weights, fixture" in their description);
- ``fixtures.json``: the version and the root of every dataset (what the profiles' ``{fixtures}/...``
  paths point at).

A complete folder of the same version is reused, so repeated runs cost nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nbsupport.core.io import atomic_write_json
from nbsupport.data.datasets import ade20k, cityscapes, coco_object, cocostuff, davis, imagenet, potsdam, voc

#: Bump when a fixture's content or layout changes: an older folder is then rebuilt.
FIXTURE_VERSION = 3
INDEX = "fixtures.json"

#: (key, writer): each writes its official tree under the base folder and returns what it planted.
DATASET_WRITERS = (
    ("voc", voc.write_fixture),
    ("coco", coco_object.write_fixture),
    ("ade20k", ade20k.write_fixture),
    ("cocostuff", cocostuff.write_fixture),
    ("cityscapes", cityscapes.write_fixture),
    ("potsdam", potsdam.write_fixture),
    ("davis", davis.write_fixture),
    ("imagenet", imagenet.write_fixture),
)


def _roots(key: str, info: dict) -> dict[str, str]:
    """``{name: root}`` of one writer's result (VOC's writer returns one root per dataset name)."""
    root = info["root"]
    if isinstance(root, dict):
        return {name: str(p) for name, p in root.items()}
    out = {key: str(root)}
    if "json" in info:
        out[f"{key}_json"] = str(info["json"])
    return out


def read_index(out) -> dict | None:
    """The ``fixtures.json`` of a fixture folder, or None when there is none (or it is unreadable)."""
    p = Path(out) / INDEX
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def build_fixtures(out, seed: int = 0, weights: bool = True, force: bool = False, log=None) -> Path:
    """Write every dataset fixture and (with ``weights``) the official-layout random checkpoints under
    ``out``; a folder already complete for this version, seed and ``weights`` is reused unless ``force``.
    Returns ``out``."""
    say = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    index = read_index(out)
    if (
        not force
        and index is not None
        and index.get("version") == FIXTURE_VERSION
        and index.get("seed") == seed
        and (index.get("weights") or not weights)
    ):
        return out
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # an interrupted build is never taken for a complete one
    roots: dict[str, str] = {}
    for key, writer in DATASET_WRITERS:
        roots.update(_roots(key, writer(out, seed)))
    files = {}
    if weights:
        from nbsupport.models.fixtures import write_official_weights

        files = {name: str(p) for name, p in write_official_weights(out / "cache", seed=seed).items()}
    atomic_write_json(
        out / INDEX,
        {"version": FIXTURE_VERSION, "seed": seed, "weights": bool(weights), "roots": roots, "checkpoints": files},
        indent=1,
    )
    say(
        f"fixtures: {len(roots)} dataset roots and {len(files)} checkpoints written to {out} ({time.time() - t0:.1f} s)"
    )
    return out


# ---------------------------------------------------------------------------------------------- command line
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "fixtures",
        help="write tiny datasets in their official layouts and official-layout random checkpoints",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-weights", action="store_true", help="datasets only (the checkpoints take ~2.2 GB)")
    p.add_argument("--force", action="store_true", help="rewrite even if the folder is complete")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    out = build_fixtures(args.out, args.seed, weights=not args.no_weights, force=args.force)
    for name, root in sorted(read_index(out)["roots"].items()):
        print(f"{name:14s} {root}")
    return 0
