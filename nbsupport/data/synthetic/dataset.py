"""The synthetic world on disk: seeded split streams, PNG + COCO instances / captions writing, and the
cache under ``data/generated/`` that a killed run never leaves half-written (:func:`synthetic_dataset`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.core import paths
from nbsupport.data.synthetic.render import WORLD_VERSION, render_scene
from nbsupport.data.synthetic.world import CLASSES

#: Fixed seed-stream codes of the usual splits (other split names get a CRC32 code), so splits never share scenes.
SPLITS = {"train": 0, "val": 1, "test": 2}


# --------------------------------------------------------------------------------------------------
# Datasets on disk


def _split_code(split: str) -> int:
    if not isinstance(split, str) or not split or not split.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"split must be a simple name such as {list(SPLITS)}, got {split!r}")
    return SPLITS.get(split, zlib.crc32(split.encode()) + 3)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent of how many scenes are made, and
    different splits are different streams (train and val never share scenes)."""
    return np.random.default_rng([int(seed), _split_code(split), int(index)])


def categories() -> list[dict]:
    """COCO categories: name = the noun, supercategory = the texture adjective."""
    return [{"id": c.id, "name": c.noun, "supercategory": c.texture} for c in CLASSES]


def _params(n_images, seed, size, split, n_objects, overlap, kw) -> dict:
    """The JSON-able parameters that determine a dataset's bytes (the manifest and the cache key)."""
    no = [int(x) for x in n_objects] if not isinstance(n_objects, (int, np.integer)) else int(n_objects)
    extra = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(kw.items())}
    return {
        "world_version": WORLD_VERSION,
        "n_images": int(n_images),
        "seed": int(seed),
        "size": int(size),
        "split": split,
        "n_objects": no,
        "overlap": overlap,
        **extra,
    }


def make_dataset(
    root,
    n_images: int,
    seed: int = 0,
    size: int = 128,
    split: str = "train",
    n_objects=(1, 3),
    overlap: str = "none",
    progress: bool | None = None,
    **kw,
) -> Path:
    """Write ``n_images`` scenes of ``split`` under ``root`` and return ``root``.

    Files: ``images/<split>_<i:06d>.png``; ``instances_<split>.json`` (COCO instances: image ids 1..n,
    file names relative to ``images/``, RLE masks with ASCII counts, area and bbox from the RLE,
    iscrowd 0); ``captions_<split>.json`` (COCO captions); ``manifest.json`` (parameters per split).
    Scene ``i`` comes from :func:`scene_rng` ``(seed, split, i)``; same arguments give identical bytes.
    ``kw`` goes to :func:`render_scene`. A tqdm bar shows for ``n_images > 200`` unless ``progress``.
    """
    from pycocotools import mask as mask_utils
    from tqdm.auto import tqdm

    if int(n_images) < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images!r}")
    params = _params(n_images, seed, size, split, n_objects, overlap, kw)
    render_scene(0, size=size, n_objects=n_objects, overlap=overlap, **kw)  # validate arguments up front
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    it = range(int(n_images))
    if progress or (progress is None and n_images > 200):
        it = tqdm(it, desc=f"synthetic {split}", unit="img")
    for i in it:
        sc = render_scene(scene_rng(seed, split, i), size=size, n_objects=n_objects, overlap=overlap, **kw)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(sc.image).save(root / "images" / name)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": int(size), "height": int(size)})
        caps.append({"id": image_id, "image_id": image_id, "caption": sc.caption})
        for m, c in zip(sc.instance_masks, sc.category_ids):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(c),
                    "iscrowd": 0,
                    "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(x) for x in mask_utils.toBbox(rle)],
                }
            )
    info = {
        "description": "nbsupport synthetic scene world",
        "version": str(WORLD_VERSION),
        "split": split,
        "seed": int(seed),
    }
    inst = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": categories()}
    (root / f"instances_{split}.json").write_text(json.dumps(inst))
    (root / f"captions_{split}.json").write_text(
        json.dumps({"info": info, "licenses": [], "images": images, "annotations": caps})
    )
    manifest_path = root / "manifest.json"
    manifest = {"world_version": WORLD_VERSION, "splits": {}}
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("world_version") == WORLD_VERSION:
                manifest["splits"] = dict(old.get("splits", {}))
        except (json.JSONDecodeError, AttributeError):
            pass
    manifest["splits"][split] = params
    manifest_path.write_text(json.dumps(manifest, sort_keys=True, indent=1))
    return root


def _manifest_matches(root: Path, split: str, params: dict) -> bool:
    try:
        man = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        isinstance(man, dict)
        and man.get("splits", {}).get(split) == params
        and (root / f"instances_{split}.json").is_file()
        and (root / f"captions_{split}.json").is_file()
    )


def _install(tmp: Path, root: Path, split: str) -> None:
    """Move the ``split`` files of a finished dataset ``tmp`` into ``root``: a fresh ``root`` is one
    rename; an existing synthetic root keeps its other splits, and its manifest is written last so an
    interrupted move is regenerated on the next call."""
    if not root.exists():
        try:
            os.replace(tmp, root)
            return
        except OSError:  # another process created it meanwhile: merge below
            pass
    (root / "images").mkdir(parents=True, exist_ok=True)
    for old in (root / "images").glob(f"{split}_*.png"):
        old.unlink()
    for img in (tmp / "images").iterdir():
        os.replace(img, root / "images" / img.name)
    for name in (f"instances_{split}.json", f"captions_{split}.json"):
        os.replace(tmp / name, root / name)
    new = json.loads((tmp / "manifest.json").read_text())
    try:
        man = json.loads((root / "manifest.json").read_text())
        if man.get("world_version") != WORLD_VERSION:
            man = {"world_version": WORLD_VERSION, "splits": {}}
    except (OSError, json.JSONDecodeError, AttributeError):
        man = {"world_version": WORLD_VERSION, "splits": {}}
    man.setdefault("splits", {})[split] = new["splits"][split]
    (root / "manifest.json").write_text(json.dumps(man, sort_keys=True, indent=1))


def synthetic_dataset(
    n_images: int = 64,
    seed: int = 0,
    size: int = 128,
    split: str = "val",
    n_objects=(1, 3),
    overlap: str = "none",
    root=None,
    progress: bool | None = None,
    **kw,
) -> Path:
    """A cached dataset: ``data/generated/synthetic-<split>-<hash of the parameters>`` (or ``root``).

    Generated only when missing or when its ``manifest.json`` does not match the parameters (which
    include :data:`WORLD_VERSION`). Generation writes a temporary folder that is renamed (or, into an
    existing synthetic ``root``, moved split by split) at the end, so a killed run never leaves half a
    dataset. Splits use different seed streams (:func:`scene_rng`), so ``split="train"`` and
    ``split="val"`` with the same ``seed`` never share scenes. A ``root`` that exists, is not empty and
    has no ``manifest.json`` is refused rather than overwritten.
    Read it with ``CocoInstances(root / f"instances_{split}.json")``.
    """
    params = _params(n_images, seed, size, split, n_objects, overlap, kw)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(root) if root is not None else paths.generated_dir() / f"synthetic-{split}-{key}"
    if _manifest_matches(root, split, params):
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / "manifest.json").is_file())):
        raise ValueError(
            f"root {root} exists and is not a synthetic dataset (no manifest.json): "
            "refusing to overwrite it; pass an empty or new folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        make_dataset(tmp, n_images, seed, size, split, n_objects, overlap, progress=progress, **kw)
        if not _manifest_matches(root, split, params):  # another process may have finished first
            _install(tmp, root, split)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
