"""Official weights on disk: the one download-and-verify path every loader uses (:func:`fetch_release`), the
errors every loader raises, and a restricted unpickler for official releases that pickle more than tensors
(no code from the file ever runs).

Fixtures: :mod:`nbsupport.models.fixtures` writes files in the official layouts holding random weights. Such a
file carries a ``nbsupport_fixture.json`` record inside its zip archive (it cannot lose it) and a
``<file>.source.json`` sidecar (``{"kind": "fixture", "sha256": ...}``) beside the ``<file>.sha256`` pin.
:func:`verify` accepts a fixture in place of a release only when the record, both sidecars and the file's
bytes agree (the release's size and pinned hash do not apply to it), and loaders label every model read from
one with :data:`FIXTURE_LABEL` (:func:`fixture_marker` tells them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import urllib.error
import zipfile
from pathlib import Path

import torch

from nbsupport.core import paths


class WeightsUnavailableError(FileNotFoundError):
    """Official weights are not in the cache and cannot be downloaded (offline)."""


class CheckpointError(ValueError):
    """A checkpoint file that is not a ViT in the expected layout."""


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ============================================================================================== download
def offline() -> bool:
    """``NBSUPPORT_OFFLINE=1``: nothing is downloaded; a missing file is an error saying where to put it."""
    return os.environ.get("NBSUPPORT_OFFLINE") == "1"


def sidecar(path: Path) -> Path:
    """``<file>.sha256``: the hash recorded when ``path`` was downloaded (for releases without a pinned one)."""
    return path.with_name(path.name + ".sha256")


FIXTURE_KIND = "fixture"
#: Name of the JSON record inside a fixture checkpoint's zip archive (``<archive>/nbsupport_fixture.json``).
FIXTURE_RECORD = "nbsupport_fixture.json"
#: What the description of every model loaded from a fixture says (figure titles print it).
FIXTURE_LABEL = "random weights, fixture"


def source_sidecar(path: Path) -> Path:
    """``<file>.source.json``: where a file came from; ``{"kind": "fixture", ...}`` for random-weight fixtures."""
    path = Path(path)
    return path.with_name(path.name + ".source.json")


def fixture_record(path: str | Path) -> dict | None:
    """The ``nbsupport_fixture.json`` record inside a zip checkpoint (written only by
    :mod:`nbsupport.models.fixtures`), or None: not a zip, no such record, or one that is not a fixture's."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/" + FIXTURE_RECORD)]
            if not names:
                return None
            rec = json.loads(zf.read(names[0]))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("kind") == FIXTURE_KIND else None


def _source(path: Path) -> dict | None:
    try:
        src = json.loads(source_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    return src if isinstance(src, dict) else None


def fixture_marker(path: str | Path) -> dict | None:
    """What marks ``path`` as a random-weight fixture: its in-file record merged with its ``.source.json``
    (either one is enough to mark it), or None for any other file. Loaders use it to label the model."""
    rec, src = fixture_record(path), _source(Path(path))
    src = src if src and src.get("kind") == FIXTURE_KIND else None
    if rec is None and src is None:
        return None
    return {**(src or {}), **(rec or {})}


def _verify_fixture(path: Path, url: str) -> None:
    """A fixture stands in for the release at ``url`` only when its record, ``.source.json``, ``.sha256`` pin
    and bytes all agree; anything else is refused (it would be a half-written, altered or mislabelled file)."""
    rec, src = fixture_record(path), _source(path)
    pin = sidecar(path).read_text().strip() if sidecar(path).is_file() else None
    what = f"{path} is a random-weights fixture standing in for {url} (written by nbsupport.models.fixtures)"
    fix = "Rewrite it with nbsupport.models.fixtures.write_official_weights, or delete it and download the release."
    if rec is None or src is None or src.get("kind") != FIXTURE_KIND:
        part = "its fixture record" if rec is None else f"{source_sidecar(path).name} saying kind 'fixture'"
        raise CheckpointError(f"{what}, but {part} is missing or unreadable. {fix}")
    if pin is None or "sha256" not in src:
        raise CheckpointError(f"{what}, but its SHA-256 pin ({sidecar(path).name}) is missing. {fix}")
    if src.get("name") != rec.get("name") or src.get("seed") != rec.get("seed"):
        raise CheckpointError(f"{what}, but its record and {source_sidecar(path).name} describe different files. {fix}")
    got = sha256(path)
    if not got == pin == src["sha256"]:
        raise CheckpointError(
            f"{what}: sha256 {got[:12]}... differs from the recorded {pin[:12]}... (source.json "
            f"{str(src['sha256'])[:12]}...): the file changed after it was written. {fix}"
        )


def missing_message(what: str, url: str, dst: Path, loader: str, alternatives=()) -> str:
    """The error text for weights that are not on disk: the URL, the exact path to put the file at, the
    ``NBSUPPORT_CACHE`` layout and the offline alternatives."""
    try:
        rel = dst.relative_to(paths.cache_dir())
    except ValueError:
        rel = Path(dst.parent.name) / dst.name
    alt = f" Offline alternatives: {', '.join(alternatives)}." if alternatives else ""
    return (
        f"{what} are not available offline. Download\n  {url}\nand put the file at\n  {dst}\n"
        f"(or set NBSUPPORT_CACHE to a folder holding {rel.as_posix()}, or pass the file's path to {loader})."
        f"{alt}"
    )


def verify(path: Path, url: str, size: int | None = None, sha256_hex: str | None = None) -> None:
    """Refuse a cached file that is not the release: wrong size (when known), or a SHA-256 that differs from
    the pinned one (else from the one recorded in :func:`sidecar` at download). A file marked as a fixture
    (:func:`fixture_marker`) is checked as one instead: record, ``.source.json``, pin and bytes must agree, and
    the release's size and pinned hash do not apply. Raises :class:`CheckpointError`."""
    path = Path(path)
    if fixture_marker(path) is not None:
        _verify_fixture(path, url)
        return
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise CheckpointError(
            f"{path} has {got_size} bytes but must have {size}: the file is truncated or not {url}. "
            "Delete it and download again."
        )
    pinned = sha256_hex
    if pinned is None and sidecar(path).is_file():
        pinned = sidecar(path).read_text().strip()
    if pinned is not None:
        got = sha256(path)
        if got != pinned:
            raise CheckpointError(
                f"{path}: sha256 {got[:12]}... differs from the recorded {pinned[:12]}... of {url}; the file "
                "changed since it was downloaded. Delete it and download again."
            )


def fetch_release(
    url: str,
    dst: Path,
    what: str,
    loader: str,
    size: int | None = None,
    sha256_hex: str | None = None,
    alternatives=(),
    download: bool = True,
    progress: bool = True,
) -> Path:
    """The verified local copy ``dst`` of the official weights at ``url``, downloaded once.

    Used by every loader of official weights (DINO: ``$NBSUPPORT_CACHE/dino/...``, GroupViT:
    ``$NBSUPPORT_CACHE/groupvit/<release file>``). A missing file is downloaded with torch.hub (a temporary
    file renamed at the end: no half file is left behind) unless ``download=False`` or ``NBSUPPORT_OFFLINE=1``,
    which raise :class:`WeightsUnavailableError` naming the URL and ``dst``. Every use checks the size
    (when known) and the SHA-256: ``sha256_hex`` when pinned, else the hash recorded beside the file at its
    first download (:func:`sidecar`); a mismatch raises :class:`CheckpointError`. A random-weight fixture in
    the cache is accepted on its own marker and pin (:func:`verify`). ``what`` / ``loader`` /
    ``alternatives`` word the error (e.g. ``"Weights for 'dino_vits8'"``, ``"nbsupport.models.backbones.load"``)."""
    dst = Path(dst)
    if dst.is_file():
        verify(dst, url, size, sha256_hex)
        return dst
    msg = missing_message(what, url, dst, loader, alternatives)
    if not download or offline():
        raise WeightsUnavailableError(msg)
    for stale in (sidecar(dst), source_sidecar(dst)):  # left by a deleted file: they describe nothing now
        stale.unlink(missing_ok=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=progress)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise WeightsUnavailableError(msg + f"\n(download failed: {e})") from e
    verify(dst, url, size, sha256_hex)
    if sha256_hex is None:
        sidecar(dst).write_text(sha256(dst) + "\n")
    return dst


# ============================================================================================== weights
class _Inert:
    """Stand-in for every class a checkpoint names that is not a tensor or a plain container: it accepts
    any constructor arguments and state and keeps nothing, so no code from the file ever runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage, offset, size, stride, *args):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, *args):
    return data


def _inert_reconstructor(*args):
    return _Inert()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch zip checkpoint's ``data.pkl`` allowing only tensor rebuilding and plain containers;
    any other global (OmegaConf configs, optimiser classes, ``os.system`` ...) resolves to :class:`_Inert`."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix, self.storages, self.skipped = zf, prefix, {}, set()

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "copyreg" and name == "_reconstructor":
            return _inert_reconstructor
        self.skipped.add(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        dtype = storage_type if isinstance(storage_type, torch.dtype) else getattr(storage_type, "dtype", None)
        if dtype is None:
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if key not in self.storages:
            raw = bytearray(self.zf.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_checkpoint(path: str | Path) -> dict:
    """Read a PyTorch zip checkpoint without executing anything from it.

    Trusted: only the tensor bytes and the dict/list/OrderedDict structure. Every other object in the
    pickle (the official GroupViT file stores an OmegaConf config, optimiser and scheduler state) is replaced
    by an inert placeholder, so ``torch.load(weights_only=True)``'s failure on those classes is avoided
    without ever importing or calling them. Returns the top-level object (a dict)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch zip checkpoint (legacy pickled files are not read "
            "for safety; re-save it with torch>=1.6)"
        )
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: no data.pkl inside the zip checkpoint")
        prefix = pkl[0][: -len("/data.pkl")]
        up = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix)
        obj = up.load()
    return obj
