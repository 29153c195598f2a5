"""CutLER's released detectors (detectron2 files) as this package's torchvision model, and official-layout
fixtures of them with seeded random weights.

:func:`load_detector` takes what ``python -m nbsupport cutler predict --checkpoint`` takes: a run's own
checkpoint (``model_final.pth``), a released file (``cutler_cascade_final.pth``, ``cutler_mrcnn_final.pth``,
the self-training rounds ``cutler_cascade_r1.pth`` / ``_r2.pth``) by path, or a release name, looked up in
``$NBSUPPORT_CACHE/cutler/`` (downloaded once unless offline). :func:`write_release_fixtures` writes the
releases' layout with random weights for the offline real path.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

from nbsupport.core import paths
from nbsupport.core.io import atomic_write_json, atomic_write_text
from nbsupport.models import checkpoints
from nbsupport.training.cutler import d2format
from nbsupport.training.cutler.config import CutlerConfig, model_kwargs
from nbsupport.training.cutler.heads import CASCADE_IOUS, CASCADE_WEIGHTS
from nbsupport.training.cutler.model import build_model

_BASE = "http://dl.fbaipublicfiles.com/cutler/checkpoints/"
#: The released CutLER detectors (CutLER's README model zoo and self-training table): name -> (URL, head).
RELEASES = {
    "cutler_cascade_final": (_BASE + "cutler_cascade_final.pth", "cascade"),
    "cutler_mrcnn_final": (_BASE + "cutler_mrcnn_final.pth", "mask_rcnn"),
    "cutler_cascade_r1": (_BASE + "cutler_cascade_r1.pth", "cascade"),
    "cutler_cascade_r2": (_BASE + "cutler_cascade_r2.pth", "cascade"),
}
#: What a fixture written here says it is (in the file and in its ``.source.json``).
FIXTURE_NOTE = "seeded random weights in the layout of CutLER's release; NOT the release: it has learned nothing"
FIXTURE_FORMAT = 1

# --------------------------------------------------------------------------------------------------
# Loading


def release_path(name: str, cache_dir=None) -> Path:
    """Where release ``name`` lives in the weight cache: ``<cache>/cutler/<name>.pth``."""
    if name.endswith(".pth"):
        name = name[: -len(".pth")]
    if name not in RELEASES:
        raise ValueError(f"{name!r} is not a CutLER release: one of {sorted(RELEASES)}")
    return Path(cache_dir or paths.cache_dir()) / "cutler" / f"{name}.pth"


def resolve_checkpoint(spec) -> Path:
    """A checkpoint path from ``spec``: an existing file, or a release name (with or without ``.pth``) found in
    (or downloaded once into) ``$NBSUPPORT_CACHE/cutler/``; a cached fixture is checked against its own pin, a
    cached release against the hash recorded at its download. Offline, a missing release is an error naming
    its URL and where to put it."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    name = p.name[: -len(".pth")] if p.name.endswith(".pth") else p.name
    if name not in RELEASES or len(p.parts) > 1:
        raise FileNotFoundError(
            f"checkpoint {spec} not found: give a file (a run's model_final.pth or a released CutLER file) or "
            f"a release name ({', '.join(sorted(RELEASES))})"
        )
    dst = release_path(name)
    url = RELEASES[name][0]
    if dst.is_file() and _fixture_info(dst) is not None:
        _check_fixture(dst)
        return dst
    return checkpoints.fetch_release(
        url, dst, f"CutLER weights {name!r}", "python -m nbsupport cutler predict --checkpoint"
    )


def is_detectron2(obj: dict) -> bool:
    """Whether a checkpoint dict holds a detectron2 model (CutLER's release layout)."""
    state = obj["model"] if isinstance(obj.get("model"), dict) else obj
    return any(isinstance(k, str) and k.startswith("backbone.bottom_up.") for k in state)


def release_kwargs(state: dict, **model_overrides) -> dict:
    """``build_model`` keywords for a detectron2 state dict: the reference settings of
    :class:`~nbsupport.training.cutler.config.CutlerConfig` (test size 800, 100 detections, score threshold
    0, ROIAlignV2) with what the file itself says (:func:`d2format.describe`), then ``model_overrides``."""
    info = d2format.describe(state)
    kw = model_kwargs(CutlerConfig())
    n = info.pop("cascade_stages")
    if info["head"] == "cascade":
        if n > len(CASCADE_IOUS):
            raise checkpoints.CheckpointError(f"{n} cascade stages: CutLER's configs define {len(CASCADE_IOUS)}")
        kw.update(cascade_ious=list(CASCADE_IOUS[:n]), cascade_weights=[list(w) for w in CASCADE_WEIGHTS[:n]])
    kw.update(info, weights=None)
    kw.update(model_overrides)
    return kw


def load_release(path, device="cpu", input_format: str = "RGB", obj: dict | None = None, **model_overrides):
    """This package's detector (eval mode) holding the weights of a detectron2 CutLER checkpoint at ``path``
    (read with :func:`d2format.read_detectron2`, never ``torch.load``; ``obj``: the file already read): the
    architecture read from the keys, every tensor converted (:func:`d2format.convert`) and loaded strictly. A
    key left over or missing is a :class:`~nbsupport.models.checkpoints.CheckpointError` naming it.
    ``model.nbs_info`` says what was loaded (``"random weights, fixture"`` for a fixture)."""
    path = Path(path)
    obj = d2format.read_detectron2(path) if obj is None else obj
    state = d2format.model_state(obj, str(path))
    kw = release_kwargs(state, **model_overrides)
    model = build_model(**kw)
    target = model.state_dict()
    sd, report = d2format.convert(state, target, input_format)
    problems = [f"{k} (no place in the model)" for k in report["unexpected"]]
    problems += [f"{k} (not in the file)" for k in report["missing"]] + report["shape"]
    if problems:
        raise checkpoints.CheckpointError(
            f"{path}: does not convert to the {kw['head']} detector: {len(problems)} problems: {problems[:8]}"
        )
    model.load_state_dict(sd, strict=True)
    fixture = _fixture_info(path, obj)
    what = f"CutLER {kw['head'].replace('_', ' ')} R50-FPN from {path.name}"
    model.nbs_info = {
        "description": what + (f" ({checkpoints.FIXTURE_LABEL})" if fixture else ""),
        "source": str(path),
        "format": "detectron2",
        "input_format": report["input_format"],
        "converted": len(sd) - len(report["filled"]),
        "fixture": fixture,
    }
    return model.to(device).eval()


def load_detector(spec, device="cpu", input_format: str = "RGB", **model_overrides):
    """A detector from a run's checkpoint (:func:`~nbsupport.training.cutler.loop.load_trained`) or a CutLER
    release (:func:`load_release`): ``spec`` is a path or a release name (:func:`resolve_checkpoint`)."""
    from nbsupport.training.cutler.loop import load_trained

    path = resolve_checkpoint(spec)
    obj = d2format.read_detectron2(path)
    if isinstance(obj.get("config"), dict) and not is_detectron2(obj):
        model = load_trained(path, device=device, **model_overrides)
        model.nbs_info = {"description": f"CutLER run {path.parent.name}/{path.name}", "source": str(path)}
        return model
    if not is_detectron2(obj):
        raise checkpoints.CheckpointError(
            f"{path}: neither a checkpoint of `cutler train` (no config) nor a detectron2 CutLER model "
            "(no backbone.bottom_up.* keys)"
        )
    return load_release(path, device, input_format, obj, **model_overrides)


# --------------------------------------------------------------------------------------------------
# Fixtures


def _values(key: str, shape: tuple, kind: str, seed: int, name: str) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}/{name}/{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if kind == "count":
        return np.array(0, np.int64)
    v = rng.standard_normal(shape, dtype=np.float32)
    np.clip(v, -2, 2, out=v)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    scale = {
        "conv": np.sqrt(2.0 / fan_in),
        "linear": np.sqrt(1.0 / fan_in),
        "delta": 1e-3,
        "bias": 0.01,
        "bn_bias": 0.02,
        "bn_mean": 0.02,
        "bn_weight": 0.02,
        "bn_last": 0.02,
        "bn_var": 0.1,
    }[kind]
    v *= np.float32(scale)
    if kind == "bn_weight":
        v += 1
    elif kind == "bn_last":  # the residual branch's last norm starts small, so random activations stay finite
        v += 0.2
    elif kind == "bn_var":
        np.abs(v, out=v)
        v += 1
    return v


def _fixture_info(path: Path, obj: dict | None = None) -> dict | None:
    """The fixture record of a file (inside it, or its ``.source.json`` saying kind ``fixture``), or None."""
    rec = obj.get("nbsupport_fixture") if isinstance(obj, dict) else None
    if isinstance(rec, dict) and rec.get("kind") == checkpoints.FIXTURE_KIND:
        return rec
    return checkpoints.fixture_marker(path)


def _check_fixture(path: Path) -> None:
    """A cached fixture must match its SHA-256 pin (else it changed after it was written)."""
    pin = checkpoints.sidecar(path)
    if not pin.is_file() or checkpoints.sha256(path) != pin.read_text().strip():
        raise checkpoints.CheckpointError(
            f"{path} is a CutLER fixture whose bytes do not match its pin {pin.name}: rewrite it with "
            "nbsupport.training.cutler.release.write_release_fixtures"
        )


def write_release_fixture(path, name: str = "cutler_cascade_final", seed: int = 0) -> Path:
    """Write release ``name``'s detectron2 layout (:func:`d2format.layout`) with seeded random weights to
    ``path``, as the released files are: a pickled dict ``{"model": {detectron2 key: numpy array}, ...}``,
    plus ``nbsupport_fixture`` (the record saying it is a fixture), and the ``.source.json`` / ``.sha256``
    sidecars of :mod:`nbsupport.models.checkpoints`. The same seed writes the same bytes; a file that is not
    a fixture (the real release) is never overwritten."""
    path = Path(path)
    if name not in RELEASES:
        raise ValueError(f"{name!r} is not a CutLER release: one of {sorted(RELEASES)}")
    if path.exists() and _fixture_info(path) is None:
        raise checkpoints.CheckpointError(
            f"{path} exists and is not a fixture (it may be the release): not overwritten"
        )
    marker = {"kind": checkpoints.FIXTURE_KIND, "name": name, "seed": seed, "format": FIXTURE_FORMAT}
    src = checkpoints.source_sidecar(path)
    if path.is_file() and src.is_file():
        try:
            meta = json.loads(src.read_text())
        except ValueError:
            meta = {}
        if all(meta.get(k) == v for k, v in marker.items()) and meta.get("sha256") == checkpoints.sha256(path):
            return path
    head = RELEASES[name][1]
    model = {key: _values(key, shape, kind, seed, name) for key, shape, kind in d2format.layout(head)}
    obj = {"model": model, "__author__": "nbsupport fixture", "nbsupport_fixture": dict(marker, note=FIXTURE_NOTE)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=4)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = checkpoints.sha256(path)
    atomic_write_text(checkpoints.sidecar(path), digest + "\n")
    source = dict(marker, note=FIXTURE_NOTE, sha256=digest, bytes=path.stat().st_size, release_url=RELEASES[name][0])
    atomic_write_json(src, source, indent=1)
    return path


def write_release_fixtures(cache_dir, seed: int = 0, names=("cutler_cascade_final", "cutler_mrcnn_final")) -> dict:
    """Fixtures of the released CutLER detectors at their cache paths (``<cache_dir>/cutler/<name>.pth``, where
    :func:`resolve_checkpoint` looks); returns ``{name: path}``. ~300 MB (cascade) and ~170 MB (Mask R-CNN)."""
    return {n: write_release_fixture(release_path(n, cache_dir), n, seed) for n in names}
